package smtpd

import (
	"bytes"
	"encoding/base64"
	"net/netip"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
)

// Replies of AUTH (RFC 4954).
var (
	replyAuthOK        = mta.Reply{Code: 235, Enhanced: mta.Enhanced{2, 7, 0}, Text: "Authentication successful"}
	replyAuthFailed    = mta.Reply{Code: 535, Enhanced: mta.Enhanced{5, 7, 8}, Text: "Authentication credentials invalid"}
	replyAuthCancelled = mta.Reply{Code: 501, Enhanced: mta.Enhanced{5, 0, 0}, Text: "Authentication cancelled"}
	replyAuthBadBase64 = mta.Reply{Code: 501, Enhanced: mta.Enhanced{5, 5, 2}, Text: "Cannot decode the response"}
	replyAuthMech      = mta.Reply{Code: 504, Enhanced: mta.Enhanced{5, 5, 4}, Text: "Unrecognized authentication type"}
	replyAuthTwice     = mta.Reply{Code: 503, Enhanced: mta.Enhanced{5, 5, 1}, Text: "Error: already authenticated"}
	replyAuthInMail    = mta.Reply{Code: 503, Enhanced: mta.Enhanced{5, 5, 1}, Text: "Error: AUTH not allowed during a mail transaction"}
	replyAuthOff       = mta.Reply{Code: 502, Enhanced: mta.Enhanced{5, 5, 1}, Text: "Error: authentication not enabled"}
	replyAuthTooMany   = mta.Reply{Code: 421, Enhanced: mta.Enhanced{4, 7, 0}, Text: "Error: too many failed authentication attempts, closing connection"}
	replyAuthBlocked   = mta.Reply{Code: 454, Enhanced: mta.Enhanced{4, 7, 0}, Text: "Too many failed authentication attempts from your address; try again later"}
)

// authAllowed: AUTH only over TLS, or from loopback where nobody can listen.
func (s *session) authAllowed() bool {
	return s.srv.opts.Auth != nil && (s.tls != nil || s.pol.CleartextAuthFromLoopback && s.ip.IsLoopback())
}

// auth answers AUTH PLAIN and AUTH LOGIN, with their challenges.
func (s *session) auth(arg string) {
	switch {
	case s.helo == "":
		s.refuse("bad_sequence", &replyHELOFirst)
		return
	case s.srv.opts.Auth == nil:
		s.refuse("not_implemented", &replyAuthOff)
		return
	case s.authUser != "":
		s.refuse("bad_sequence", &replyAuthTwice)
		return
	case s.hasFrom:
		s.refuse("bad_sequence", &replyAuthInMail)
		return
	case !s.authAllowed():
		s.refuse("encryption_required", &mta.ReplyEncryptionRequired)
		return
	}
	mech, initial, hasInitial := strings.Cut(arg, " ")
	initial = strings.TrimSpace(initial)
	mech = strings.ToUpper(mech)
	if mech != "PLAIN" && mech != "LOGIN" {
		s.refuse("bad_parameter", &replyAuthMech)
		return
	}
	if s.srv.opts.AuthFailures.blocked(s.ip) {
		// The password is not even checked: guessing from this address
		// has to stop for a while.
		s.srv.opts.Metrics.auth.WithLabelValues("blocked").Inc()
		s.srv.log.Info("authentication refused: too many failures from this address", zap.String("client_ip", s.ip.String()))
		s.authFailed(&replyAuthBlocked)
		return
	}
	var user, pass string
	switch mech {
	case "PLAIN":
		resp, ok := s.saslResponse(initial, hasInitial, "")
		if !ok {
			return
		}
		authz, rest, ok1 := bytes.Cut(resp, []byte{0})
		authc, pw, ok2 := bytes.Cut(rest, []byte{0})
		if !ok1 || !ok2 || len(authz) > 0 && !bytes.Equal(authz, authc) {
			s.checkFailed("")
			return
		}
		user, pass = string(authc), string(pw)
	case "LOGIN":
		u, ok := s.saslResponse(initial, hasInitial, "Username:")
		if !ok {
			return
		}
		p, ok := s.saslResponse("", false, "Password:")
		if !ok {
			return
		}
		user, pass = string(u), string(p)
	}
	if !s.srv.opts.Auth.Authenticate(user, pass) {
		s.checkFailed(user)
		return
	}
	s.srv.opts.Metrics.auth.WithLabelValues("success").Inc()
	s.authUser = user
	s.reply(&replyAuthOK)
}

// saslResponse returns the client's decoded response: the initial one when
// the command carried it, else the answer to a 334 challenge. On a
// cancellation or bad base64 it has replied and returns false.
func (s *session) saslResponse(initial string, hasInitial bool, challenge string) ([]byte, bool) {
	enc := initial
	if !hasInitial {
		s.replyText(334, mta.Enhanced{}, base64.StdEncoding.EncodeToString([]byte(challenge)))
		line, err := s.readLine(s.pol.CommandTimeout)
		if err != nil {
			s.readFailed(err, false)
			return nil, false
		}
		enc = string(line)
	}
	switch enc {
	case "*":
		s.refuse("auth_cancelled", &replyAuthCancelled)
		return nil, false
	case "=":
		return []byte{}, true
	}
	b, err := base64.StdEncoding.DecodeString(enc)
	if err != nil {
		s.refuse("bad_syntax", &replyAuthBadBase64)
		return nil, false
	}
	return b, true
}

// checkFailed answers wrong credentials: slowly, counted per connection
// and per client address.
func (s *session) checkFailed(user string) {
	s.srv.opts.Metrics.auth.WithLabelValues("failure").Inc()
	s.srv.log.Info("authentication failed", zap.String("client_ip", s.ip.String()), zap.String("user", sanitizeName(user)))
	if s.srv.opts.AuthFailures.fail(s.ip) {
		s.srv.opts.Metrics.authBlocks.Inc()
		s.srv.log.Warn("client address blocked from AUTH after repeated failures", zap.String("client_ip", s.ip.String()))
	}
	time.Sleep(s.srv.opts.AuthFailureDelay)
	s.authFailed(&replyAuthFailed)
}

// authFailed replies to a failed AUTH and closes the connection after too
// many.
func (s *session) authFailed(r *mta.Reply) {
	s.reply(r)
	if s.authFailures++; s.authFailures >= s.pol.MaxAuthFailures {
		s.reply(&replyAuthTooMany)
		s.closing = true
	}
}

// AuthFailures counts failed AUTH attempts per client address over a
// sliding window and blocks an address that reaches the limit until its
// failures age out of the window: the connection limit stops one
// session's guessing, this stops a client that reconnects. IPv6 clients
// are counted per /64, which one host usually holds whole. Safe for
// concurrent use; its memory is bounded by maxTracked addresses.
type AuthFailures struct {
	limit  int
	window time.Duration
	now    func() time.Time

	mu      sync.Mutex
	clients map[netip.Prefix]*failureCount
}

type failureCount struct {
	n     int       // failures since start
	start time.Time // the window began
	until time.Time // blocked until, when n reached the limit
}

// maxTracked bounds the addresses remembered; past it the oldest entries
// are forgotten first.
const maxTracked = 100_000

// NewAuthFailures returns a tracker that blocks an address after limit
// failures within window, for window.
func NewAuthFailures(limit int, window time.Duration) *AuthFailures {
	return &AuthFailures{limit: limit, window: window, now: time.Now, clients: map[netip.Prefix]*failureCount{}}
}

// SetLimit changes the limit and the window (a reload); the counts so far
// stay, and blocks in force run to their end.
func (a *AuthFailures) SetLimit(limit int, window time.Duration) {
	a.mu.Lock()
	a.limit, a.window = limit, window
	a.mu.Unlock()
}

// blocked reports whether ip may not try AUTH now.
func (a *AuthFailures) blocked(ip netip.Addr) bool {
	if a == nil {
		return false
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	c := a.clients[mta.ClientNetwork(ip)]
	return c != nil && a.now().Before(c.until)
}

// fail records a failure of ip and reports whether it blocked the address.
func (a *AuthFailures) fail(ip netip.Addr) bool {
	if a == nil {
		return false
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.limit <= 0 {
		return false
	}
	now, key := a.now(), mta.ClientNetwork(ip)
	c := a.clients[key]
	if c == nil || now.Sub(c.start) > a.window && !now.Before(c.until) {
		if len(a.clients) >= maxTracked {
			a.forgetOld(now)
		}
		c = &failureCount{start: now}
		a.clients[key] = c
	}
	c.n++
	if c.n >= a.limit && !now.Before(c.until) {
		c.until = now.Add(a.window)
		c.n, c.start = 0, now
		return true
	}
	return false
}

// forgetOld drops entries whose window and block are over, or, if none
// are, every entry: a flood of addresses must not grow the map forever.
func (a *AuthFailures) forgetOld(now time.Time) {
	for k, c := range a.clients {
		if now.Sub(c.start) > a.window && !now.Before(c.until) {
			delete(a.clients, k)
		}
	}
	if len(a.clients) >= maxTracked {
		clear(a.clients)
	}
}

// Blocked returns how many client addresses are blocked now.
func (a *AuthFailures) Blocked() int {
	if a == nil {
		return 0
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	n, now := 0, a.now()
	for _, c := range a.clients {
		if now.Before(c.until) {
			n++
		}
	}
	return n
}

// IsBlocked reports whether ip may not try to log in now: the same count
// serves POP3 logins, so a guesser cannot switch protocols to go on.
func (a *AuthFailures) IsBlocked(ip netip.Addr) bool { return a.blocked(ip) }

// Fail records a failed login of ip and reports whether it blocked it.
func (a *AuthFailures) Fail(ip netip.Addr) bool { return a.fail(ip) }
