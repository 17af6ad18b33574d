package smtpd

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
)

// Spooler stores accepted messages. Accept must return only once the
// message is durable; its error decides the reply (mta.ErrStorageFull:
// 452 4.3.1; anything else: 451 4.3.0).
type Spooler interface {
	// NewID returns a fresh queue ID, used in the Received: header.
	NewID() string
	// Accept stores the message: header followed by body.
	Accept(id string, env *mta.Envelope, header, body []byte) error
	// Room returns mta.ErrStorageFull if a message of size bytes would not
	// fit above the free-space reserve.
	Room(size int64) error
}

// Mailboxes answers for the addresses of local domains.
type Mailboxes interface {
	// Check returns nil if address has a mailbox with room for size more
	// octets (0: not known), else the refusal: 550 5.1.1 for an unknown
	// address (refused at RCPT, so nothing is accepted and then bounced),
	// 552 5.2.2 for a full mailbox.
	Check(address string, size int64) *mta.Reply
}

// Authenticator checks AUTH credentials and what an authenticated user may
// put in MAIL FROM.
type Authenticator interface {
	// Authenticate reports whether password is right for user.
	Authenticate(user, password string) bool
	// MaySend reports whether user may use the reverse-path from ("" is
	// the null sender).
	MaySend(user, from string) bool
}

// LineEndings is the policy for a bare CR or LF inside message data.
type LineEndings string

// Policies for bare line endings.
const (
	RejectBareLineEndings    LineEndings = "reject"    // 550 5.6.0 at the end of data
	NormalizeBareLineEndings LineEndings = "normalize" // store them as CRLF
)

// Policy is the part of a listener's options that a reload may change
// (Server.SetPolicy). A session takes the policy in force when it connects
// and keeps it to its end, so that what its EHLO advertised stays true.
type Policy struct {
	Trusted        func(netip.Addr) bool // trusted networks: may relay without AUTH
	MaxMessageSize int64
	MaxRecipients  int
	MaxLineLength  int
	// MaxHops refuses a message that already has this many Received:
	// fields (a mail loop); zero: no limit.
	MaxHops        int
	CommandTimeout time.Duration // waiting for a command
	DataTimeout    time.Duration // waiting for each block of message data
	// BareLineEndings applies to untrusted, unauthenticated clients;
	// BareLineEndingsTrusted to the others.
	BareLineEndings, BareLineEndingsTrusted LineEndings
	RejectEarlyData                         bool // refuse content sent before the 354 reply, from unauthenticated clients
	// AddMissingHeaders adds Date: and Message-ID: to messages from
	// trusted and authenticated clients that lack them (RFC 6409 §8.3).
	AddMissingHeaders bool
	// CleartextAuthFromLoopback allows AUTH without TLS from loopback
	// clients, where nobody can listen in.
	CleartextAuthFromLoopback bool
	// MaxAuthFailures closes a connection after this many failed AUTH
	// attempts; zero means 3.
	MaxAuthFailures int
}

// withDefaults fills in the zero values that have a default.
func (p Policy) withDefaults() *Policy {
	if p.Trusted == nil {
		p.Trusted = func(netip.Addr) bool { return false }
	}
	if p.MaxAuthFailures <= 0 {
		p.MaxAuthFailures = 3
	}
	return &p
}

// Options configure one SMTP listener.
type Options struct {
	Name         string // listener name in metrics and logs: "smtp", "submission"
	Hostname     string // our name in the banner and Received:
	Submission   bool   // require AUTH before MAIL (RFC 6409)
	LocalDomains []string
	// Policy holds the limits and policies a reload may change.
	Policy
	TLS   *tls.Config // nil: no STARTTLS
	Spool Spooler
	Auth  Authenticator // nil: no AUTH
	// Mailboxes checks recipients in LocalDomains; nil: every address
	// there is taken.
	Mailboxes Mailboxes
	// Suppressed, when set, may refuse a recipient of our users' mail
	// (trusted or authenticated clients) at RCPT: the suppression list.
	// It is given the session's AUTH user ("" for none).
	Suppressed func(authUser, rcpt string) *mta.Reply
	// OnAccepted, when set, is told of every message stored (after its
	// 250): its queue ID, envelope, size as stored and the session's TLS
	// version. For the accounting log; it must be quick.
	OnAccepted func(id string, env *mta.Envelope, size int, tls string)
	// AuthFailures counts failed AUTH per client address across
	// connections and listeners, and refuses AUTH from an address over its
	// limit; nil: no such limit.
	AuthFailures *AuthFailures
	// Memory bounds the bytes of message data held by all sessions (and
	// by delivery): past it a message is read to its end but refused with
	// 451 4.3.2; nil: unbounded.
	Memory  *mta.Budget
	Limits  *ConnLimits // shared between listeners
	Metrics *Metrics    // shared between listeners
	Logger  *zap.Logger
	// AuthFailureDelay is slept after a failed AUTH, to slow password
	// guessing; zero means one second.
	AuthFailureDelay time.Duration
}

// Server is one SMTP listener.
type Server struct {
	opts  Options
	local map[string]bool
	// postmaster is where RCPT TO:<Postmaster> goes (RFC 5321 §4.1.1.3).
	postmaster string
	log        *zap.Logger

	mu       sync.Mutex
	ln       net.Listener
	sessions map[*session]struct{}
	wg       sync.WaitGroup
	stopping atomic.Bool            // read by every session before each command: no lock
	forced   atomic.Bool            // the shutdown's grace is over: sessions in a transaction end too
	policy   atomic.Pointer[Policy] // what new sessions take (SetPolicy)

	// acceptMu is held for reading while a message is handed to the
	// spool; Shutdown takes it for writing to wait for those, then sets
	// acceptClosed so that no more are.
	acceptMu     sync.RWMutex
	acceptClosed bool

	// This listener's children of the per-message counters.
	acceptedMsgs, acceptedBytes prometheus.Counter
}

// New returns a listener ready to Serve.
func New(opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.AuthFailureDelay == 0 {
		opts.AuthFailureDelay = time.Second
	}
	if opts.Limits == nil {
		opts.Limits = NewConnLimits(1000, 1000)
	}
	if opts.Metrics == nil {
		opts.Metrics = NewMetrics(nil)
	}
	s := &Server{opts: opts, local: map[string]bool{}, sessions: map[*session]struct{}{},
		log: opts.Logger.With(zap.String("listener", opts.Name))}
	s.policy.Store(opts.Policy.withDefaults())
	s.acceptedMsgs = opts.Metrics.accepted.WithLabelValues(opts.Name)
	s.acceptedBytes = opts.Metrics.bytes.WithLabelValues(opts.Name)
	for _, d := range opts.LocalDomains {
		s.local[strings.ToLower(d)] = true
	}
	s.postmaster = "postmaster@" + opts.Hostname
	if len(opts.LocalDomains) > 0 {
		s.postmaster = "postmaster@" + strings.ToLower(opts.LocalDomains[0])
	}
	return s
}

// SetPolicy replaces the limits and policies: sessions that connect from
// then on follow p, those already open keep theirs.
func (s *Server) SetPolicy(p Policy) { s.policy.Store(p.withDefaults()) }

// Serve accepts connections on l until Shutdown. It returns nil after a
// shutdown.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.stopping.Load() {
		s.mu.Unlock()
		l.Close()
		return nil
	}
	s.ln = l
	s.mu.Unlock()
	var delay time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if s.stopping.Load() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// EMFILE and friends: wait and go on rather than stop serving.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed, retrying", zap.Error(err), zap.Duration("in", delay))
			time.Sleep(delay)
			continue
		}
		delay = 0
		s.admit(c)
	}
}

// admit applies the connection limits and starts a session.
func (s *Server) admit(c net.Conn) {
	ip := remoteIP(c)
	if reply, reason := s.opts.Limits.acquire(ip); reply != nil {
		s.opts.Metrics.refused.WithLabelValues(s.opts.Name, reason).Inc()
		go refuse(c, reply)
		return
	}
	sess := newSession(s, c, ip)
	s.mu.Lock()
	if s.stopping.Load() {
		s.mu.Unlock()
		s.opts.Limits.release(ip)
		go refuse(c, &mta.ReplyShuttingDown)
		return
	}
	s.sessions[sess] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	s.opts.Metrics.connections.WithLabelValues(s.opts.Name).Inc()
	s.opts.Metrics.active.WithLabelValues(s.opts.Name).Inc()
	go func() {
		defer s.wg.Done()
		defer func() {
			if r := recover(); r != nil {
				// A bug outside a command handler: this connection ends,
				// the process and every other session go on.
				s.opts.Metrics.panics.Inc()
				s.log.Error("panic in SMTP session", zap.Any("panic", r), zap.String("client_ip", ip.String()),
					zap.ByteString("stack", debug.Stack()))
				_ = c.Close()
			}
			s.mu.Lock()
			delete(s.sessions, sess)
			s.mu.Unlock()
			s.opts.Limits.release(ip)
			s.opts.Metrics.active.WithLabelValues(s.opts.Name).Dec()
		}()
		sess.serve()
	}()
}

// Shutdown stops accepting connections, tells idle clients
// "421 4.3.2 Service shutting down" and closes their connections, and lets
// transactions in flight finish. When ctx ends first, it tells the
// clients still in a transaction 421 too (their messages are not taken),
// closes every connection still open within forcedGrace, and returns
// ctx's error. Either way, once it
// returns no message is being stored and none will be.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.stopping.Store(true)
	if s.ln != nil {
		s.ln.Close()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	var err error
wait:
	for {
		s.kickIdle()
		select {
		case <-done:
			break wait
		case <-ctx.Done():
			err = ctx.Err()
			s.endTransactions(done)
			s.closeSessions()
			<-done
			break wait
		case <-tick.C:
		}
	}
	// Wait for messages being stored, and store no more, so that the
	// spool can be closed after this returns.
	s.acceptMu.Lock()
	s.acceptClosed = true
	s.acceptMu.Unlock()
	return err
}

// kickIdle wakes every session waiting for a command outside a
// transaction; it sees the server stopping and says goodbye.
func (s *Server) kickIdle() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for sess := range s.sessions {
		if !sess.busy.Load() {
			_ = sess.raw.SetReadDeadline(time.Now())
		}
	}
}

// forcedGrace is how long sessions still in a transaction when the
// shutdown's grace ends get to tell their clients 421 (RFC 5321 §3.8)
// before their connections are closed under them.
const forcedGrace = 500 * time.Millisecond

// endTransactions wakes every session, those in a transaction too: a
// session waiting for its client sees the server stopping and says 421.
// It returns when they are done, or after forcedGrace (a session blocked
// on a client that reads nothing).
func (s *Server) endTransactions(done <-chan struct{}) {
	s.forced.Store(true)
	deadline := time.After(forcedGrace)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		s.mu.Lock()
		for sess := range s.sessions {
			_ = sess.raw.SetReadDeadline(time.Now())
		}
		s.mu.Unlock()
		select {
		case <-done:
			return
		case <-deadline:
			return
		case <-tick.C:
		}
	}
}

// closeSessions closes every open connection.
func (s *Server) closeSessions() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for sess := range s.sessions {
		_ = sess.raw.Close()
	}
}

// isStopping reports whether Shutdown has begun.
func (s *Server) isStopping() bool { return s.stopping.Load() }
