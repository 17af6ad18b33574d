// Package pop3d is the POP3 edge (RFC 1939): mail clients log in with a
// user name and password and fetch and delete the messages of their local
// mailbox. It owns the protocol only — USER/PASS and SASL PLAIN (RFC 5034),
// CAPA (RFC 2449), STLS (RFC 2595), response codes (RFC 2449, RFC 3206),
// one session per mailbox, limits — and reaches users and mailboxes
// through the Backend interface it defines.
//
// Deletions take effect only in the UPDATE state, after QUIT: a session
// that ends any other way deletes nothing.
package pop3d

import (
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
)

// Message is one message of a mailbox as a session sees it.
type Message struct {
	UID  string // unique and stable, 1 to 70 printable characters
	Size int64  // octets as sent by RETR, CRLF line endings counted
}

// Backend is what the POP3 edge needs of users and mailboxes.
type Backend interface {
	// Authenticate reports whether password is right for user; the user
	// name is also the mailbox's.
	Authenticate(user, password string) bool
	// List returns the messages of user's mailbox, oldest first.
	List(user string) ([]Message, error)
	// Retrieve returns one message, with CRLF line endings.
	Retrieve(user, uid string) ([]byte, error)
	// Delete removes messages, all at once, durably.
	Delete(user string, uids []string) error
}

// FailureLimiter counts failed logins per client address (shared with SMTP
// AUTH) and blocks an address over its limit.
type FailureLimiter interface {
	IsBlocked(ip netip.Addr) bool
	Fail(ip netip.Addr) bool
}

// Options configure one POP3 listener.
type Options struct {
	Name     string // listener name in metrics and logs: "pop3", "pop3s"
	Hostname string
	Backend  Backend
	// TLS enables STLS; with ImplicitTLS the listener speaks TLS from the
	// first byte (port 995) instead.
	TLS         *tls.Config
	ImplicitTLS bool
	// CleartextFromLoopback allows USER/PASS and AUTH without TLS from
	// loopback clients; from anywhere else a login needs TLS.
	CleartextFromLoopback bool
	// IdleTimeout ends a session that sends no command for this long;
	// zero means 10 minutes (RFC 1939 §3: at least 10).
	IdleTimeout time.Duration
	// LoginTimeout is how long a session may take to log in, from the
	// connect, whatever it sends meanwhile (zero: 1 minute), so that
	// connections that never log in cannot hold every slot.
	LoginTimeout time.Duration
	// FailureDelay is slept before answering a failed login; zero: 1 s.
	FailureDelay time.Duration
	// MaxConnections and MaxPerIP bound concurrent sessions of this
	// listener; zero: 100 and 10. MaxPerIP counts an IPv6 client's /64
	// together (mta.ClientNetwork).
	MaxConnections, MaxPerIP int
	Failures                 FailureLimiter // nil: no per-address limit
	// Locks is the table of mailboxes in use, shared by every listener
	// (POP3 and POP3S) so that a mailbox has one session at a time
	// whichever port it came through; nil: one of this listener's own.
	Locks   *Locks
	Metrics *Metrics
	Logger  *zap.Logger
}

// Locks holds the mailboxes that have a session in TRANSACTION.
type Locks struct {
	mu     sync.Mutex
	locked map[string]bool
}

// NewLocks returns an empty lock table.
func NewLocks() *Locks { return &Locks{locked: map[string]bool{}} }

// Server is one POP3 listener.
type Server struct {
	opts Options
	log  *zap.Logger

	mu       sync.Mutex
	ln       net.Listener
	sessions map[*session]struct{}
	perIP    map[netip.Prefix]int // sessions by mta.ClientNetwork
	closed   bool
	wg       sync.WaitGroup
}

// New returns a listener ready to Serve.
func New(opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.IdleTimeout <= 0 {
		opts.IdleTimeout = 10 * time.Minute
	}
	if opts.LoginTimeout <= 0 {
		opts.LoginTimeout = time.Minute
	}
	opts.LoginTimeout = min(opts.LoginTimeout, opts.IdleTimeout)
	if opts.FailureDelay <= 0 {
		opts.FailureDelay = time.Second
	}
	if opts.MaxConnections <= 0 {
		opts.MaxConnections = 100
	}
	if opts.MaxPerIP <= 0 {
		opts.MaxPerIP = 10
	}
	if opts.Metrics == nil {
		opts.Metrics = NewMetrics(nil)
	}
	if opts.Locks == nil {
		opts.Locks = NewLocks()
	}
	return &Server{opts: opts, log: opts.Logger.With(zap.String("listener", opts.Name)),
		sessions: map[*session]struct{}{}, perIP: map[netip.Prefix]int{}}
}

// Serve accepts connections on ln until Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.ln = ln
	s.mu.Unlock()
	for {
		c, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				time.Sleep(50 * time.Millisecond)
				continue
			}
			return err
		}
		s.handle(c)
	}
}

// handle starts a session for c, or refuses it past the limits.
func (s *Server) handle(c net.Conn) {
	ip := remoteIP(c)
	network := mta.ClientNetwork(ip)
	s.mu.Lock()
	if s.closed || len(s.sessions) >= s.opts.MaxConnections || s.perIP[network] >= s.opts.MaxPerIP {
		s.mu.Unlock()
		s.opts.Metrics.refused.WithLabelValues(s.opts.Name).Inc()
		if !s.opts.ImplicitTLS { // a TLS client could not read a cleartext reply: it just sees the close
			c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			c.Write([]byte("-ERR [SYS/TEMP] too many connections, try again later\r\n"))
		}
		c.Close()
		return
	}
	sess := newSession(s, c, ip)
	s.sessions[sess] = struct{}{}
	s.perIP[network]++
	s.wg.Add(1)
	s.mu.Unlock()
	s.opts.Metrics.sessions.WithLabelValues(s.opts.Name).Inc()
	go func() {
		defer s.wg.Done()
		sess.run()
		s.mu.Lock()
		delete(s.sessions, sess)
		if s.perIP[network]--; s.perIP[network] <= 0 {
			delete(s.perIP, network)
		}
		s.mu.Unlock()
	}()
}

// lock takes the mailbox for one session (RFC 1939 §8: exclusive access).
func (s *Server) lock(user string) bool {
	l := s.opts.Locks
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.locked[user] {
		return false
	}
	l.locked[user] = true
	return true
}

func (s *Server) unlock(user string) {
	l := s.opts.Locks
	l.mu.Lock()
	delete(l.locked, user)
	l.mu.Unlock()
}

// Shutdown stops accepting, tells idle sessions the server is going away
// and waits for every session until the deadline, then closes the rest.
func (s *Server) Shutdown(deadline time.Time) {
	s.mu.Lock()
	s.closed = true
	if s.ln != nil {
		s.ln.Close()
	}
	for sess := range s.sessions {
		sess.stop()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(time.Until(deadline)):
		s.mu.Lock()
		for sess := range s.sessions {
			sess.raw.Close() // the TCP connection: the TLS one above it dies with it
		}
		s.mu.Unlock()
		<-done
	}
}

func remoteIP(c net.Conn) netip.Addr {
	if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}

// Metrics are the POP3 edge's Prometheus metrics, shared by its listeners.
type Metrics struct {
	sessions, refused, retrieved, deleted, bytes *prometheus.CounterVec
	logins                                       *prometheus.CounterVec
}

// NewMetrics creates the metrics and registers them with reg (nil: not
// registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	vec := func(name, help string, labels ...string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labels)
	}
	m := &Metrics{
		sessions:  vec("mta_pop3_sessions_total", "POP3 sessions started, by listener.", "listener"),
		refused:   vec("mta_pop3_connections_refused_total", "POP3 connections refused over the connection limits, by listener.", "listener"),
		logins:    vec("mta_pop3_logins_total", "POP3 logins by listener and result (success, failure, blocked, in_use).", "listener", "result"),
		retrieved: vec("mta_pop3_messages_retrieved_total", "Messages sent by RETR, by listener.", "listener"),
		deleted:   vec("mta_pop3_messages_deleted_total", "Messages deleted at QUIT, by listener.", "listener"),
		bytes:     vec("mta_pop3_bytes_sent_total", "Octets of messages sent by RETR and TOP, by listener.", "listener"),
	}
	for _, l := range []string{"pop3", "pop3s"} {
		for _, r := range []string{"success", "failure", "blocked", "in_use"} {
			m.logins.WithLabelValues(l, r)
		}
		for _, v := range []*prometheus.CounterVec{m.sessions, m.refused, m.retrieved, m.deleted, m.bytes} {
			v.WithLabelValues(l)
		}
	}
	if reg != nil {
		reg.MustRegister(m.sessions, m.refused, m.logins, m.retrieved, m.deleted, m.bytes)
	}
	return m
}
