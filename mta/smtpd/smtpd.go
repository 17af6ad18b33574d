package smtpd

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-smtp"
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

// Authenticator checks AUTH credentials.
type Authenticator interface {
	// Authenticate reports whether password is right for user.
	Authenticate(user, password string) bool
}

// LineEndings is the policy for a bare CR or LF inside message data.
type LineEndings string

// Policies for bare line endings.
const (
	RejectBareLineEndings    LineEndings = "reject"    // 550 5.6.0 at the end of data
	NormalizeBareLineEndings LineEndings = "normalize" // store them as CRLF
)

// Options configure one SMTP listener.
type Options struct {
	Name           string // listener name in metrics and logs: "smtp", "submission"
	Hostname       string // our name in the banner and Received:
	Submission     bool   // require AUTH before MAIL (RFC 6409)
	LocalDomains   []string
	Trusted        func(netip.Addr) bool // trusted networks: may relay without AUTH
	MaxMessageSize int64
	MaxRecipients  int
	MaxLineLength  int
	CommandTimeout time.Duration // waiting for a command
	DataTimeout    time.Duration // waiting for each block of message data
	// BareLineEndings applies to untrusted, unauthenticated clients;
	// BareLineEndingsTrusted to the others.
	BareLineEndings, BareLineEndingsTrusted LineEndings
	RejectEarlyData                         bool        // refuse content sent before the 354 reply (cleartext only)
	TLS                                     *tls.Config // nil: no STARTTLS
	Spool                                   Spooler
	Auth                                    Authenticator // nil: no AUTH
	// CleartextAuthFromLoopback allows AUTH without TLS from loopback
	// clients, where nobody can listen in.
	CleartextAuthFromLoopback bool
	Limits                    *ConnLimits // shared between listeners
	Metrics                   *Metrics    // shared between listeners
	Logger                    *zap.Logger
	// AuthFailureDelay is slept after a failed AUTH, to slow password
	// guessing; zero means one second.
	AuthFailureDelay time.Duration
}

// Server is one SMTP listener.
type Server struct {
	opts  Options
	smtp  *smtp.Server
	local map[string]bool
	log   *zap.Logger

	mu       sync.Mutex
	conns    map[*trackedConn]struct{}
	stopping bool

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
	if opts.Trusted == nil {
		opts.Trusted = func(netip.Addr) bool { return false }
	}
	if opts.AuthFailureDelay == 0 {
		opts.AuthFailureDelay = time.Second
	}
	s := &Server{opts: opts, local: map[string]bool{}, conns: map[*trackedConn]struct{}{},
		log: opts.Logger.With(zap.String("listener", opts.Name))}
	s.acceptedMsgs = opts.Metrics.accepted.WithLabelValues(opts.Name)
	s.acceptedBytes = opts.Metrics.bytes.WithLabelValues(opts.Name)
	for _, d := range opts.LocalDomains {
		s.local[strings.ToLower(d)] = true
	}
	srv := smtp.NewServer(backend{s})
	srv.Domain = opts.Hostname
	srv.MaxMessageBytes = opts.MaxMessageSize
	srv.MaxLineLength = opts.MaxLineLength
	srv.MaxRecipients = 0 // enforced in Rcpt, so that it is counted
	srv.ReadTimeout = opts.CommandTimeout
	srv.WriteTimeout = opts.CommandTimeout
	srv.TLSConfig = opts.TLS
	srv.AllowInsecureAuth = true // decided per connection in AuthMechanisms
	srv.EnableSMTPUTF8 = true
	srv.EnableDSN = true
	srv.ErrorLog = zapErrorLog{s.log}
	s.smtp = srv
	return s
}

// Serve accepts connections on l until Shutdown. It returns nil after a
// shutdown.
func (s *Server) Serve(l net.Listener) error {
	err := s.smtp.Serve(&listener{Listener: l, srv: s})
	if errors.Is(err, smtp.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// Shutdown stops accepting connections, lets transactions in flight finish,
// and closes idle connections (go-smtp tells them "421 4.4.2"). When ctx
// ends first, it closes every connection still open.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.stopping = true
	s.mu.Unlock()
	done := make(chan error, 1)
	go func() { done <- s.smtp.Shutdown(ctx) }()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		s.kickIdle()
		select {
		case err := <-done:
			if err != nil {
				// Out of time: close what is still open. (go-smtp's own
				// Close does nothing once Shutdown has begun.)
				s.closeConns()
			}
			// Wait for messages being stored, and store no more, so
			// that the spool can be closed after this returns.
			s.acceptMu.Lock()
			s.acceptClosed = true
			s.acceptMu.Unlock()
			if errors.Is(err, smtp.ErrServerClosed) {
				return nil
			}
			return err
		case <-tick.C:
		}
	}
}

// closeConns closes every open connection.
func (s *Server) closeConns() {
	s.mu.Lock()
	conns := make([]*trackedConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		_ = c.Conn.Close() // the raw connection: trackedConn.Close would flush
	}
}

// kickIdle makes every connection that is not inside a transaction time
// out now.
func (s *Server) kickIdle() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		if !c.busy.Load() {
			_ = c.SetReadDeadline(time.Now())
		}
	}
}

func (s *Server) track(c *trackedConn, open bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if open {
		s.conns[c] = struct{}{}
		if s.stopping {
			_ = c.SetReadDeadline(time.Now())
		}
	} else {
		delete(s.conns, c)
	}
}

type backend struct{ s *Server }

func (b backend) NewSession(c *smtp.Conn) (smtp.Session, error) {
	tc := connOf(c.Conn())
	if tc == nil {
		return nil, toSMTP(&mta.ReplyInternal)
	}
	_, isTLS := c.TLSConnectionState()
	return &session{
		srv:     b.s,
		conn:    tc,
		helo:    c.Hostname(),
		ip:      tc.ip,
		tls:     isTLS,
		trusted: b.s.opts.Trusted(tc.ip),
	}, nil
}

// toSMTP converts our reply type into go-smtp's error type, which go-smtp
// writes verbatim.
func toSMTP(r *mta.Reply) *smtp.SMTPError {
	ec := smtp.EnhancedCode(r.Enhanced)
	if r.Enhanced == (mta.Enhanced{}) {
		ec = smtp.EnhancedCodeNotSet
	}
	return &smtp.SMTPError{Code: r.Code, EnhancedCode: ec, Message: r.Text}
}

// zapErrorLog adapts go-smtp's logger, which reports connection-level
// errors, to zap at debug level: a client hanging up is not our error.
type zapErrorLog struct{ log *zap.Logger }

func (l zapErrorLog) Printf(format string, v ...any) { l.log.Sugar().Debugf(format, v...) }
func (l zapErrorLog) Println(v ...any)               { l.log.Sugar().Debug(v...) }
