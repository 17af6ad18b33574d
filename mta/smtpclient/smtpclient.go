// Package smtpclient speaks SMTP (RFC 5321) to one remote server over one
// connection, for the delivery scheduler: Dial opens and prepares a
// connection (greeting, EHLO, STARTTLS, AUTH), Send runs one mail transaction
// on it, and the scheduler keeps Conns in a cache to send many messages over
// each.
//
// Ownership: Dial owns the socket until it returns. On failure Dial closes
// everything it opened and returns a nil *Conn; on success the caller owns the
// *Conn and must call Close exactly when it is done with it (Close is
// idempotent, so calling it again is harmless). Close says QUIT when the
// protocol stream is in step and then closes the socket. Send never closes a
// Conn the caller could still use; when it does close the socket itself (a
// cancelled context, or the cases documented on Send), the Conn reports
// Usable() == false and the caller must still call Close to release it.
//
// A Conn is not safe for concurrent use: one goroutine at a time may call
// its methods. To abandon a Send in progress, cancel its context; do not call
// Close from another goroutine.
//
// A Conn whose protocol stream is out of step with the server (any I/O
// error or timeout, a malformed or unexpected reply, a 421 reply, a cancelled
// context, a failure in the middle of a transaction) is marked unusable:
// Usable reports false from then on, and the caller must Close it and never
// reuse it. A Conn that reports Usable() == true after Send returned, whatever
// the outcome of the message, is in step and may carry the next message.
package smtpclient

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"maps"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/mtaproject/mta/mta"
)

// TLSPolicy says whether and how to use STARTTLS (RFC 3207).
type TLSPolicy string

// TLS policies.
const (
	// TLSNone never uses STARTTLS.
	TLSNone TLSPolicy = "none"
	// TLSOpportunistic uses STARTTLS when the server offers it, without
	// verifying the certificate (like Postfix's "may" level): encryption
	// against passive eavesdropping, nothing more. If the server refuses
	// STARTTLS with a reply, the session continues in plaintext; if the TLS
	// handshake fails, Dial connects again once and stays in plaintext.
	TLSOpportunistic TLSPolicy = "opportunistic"
	// TLSRequired refuses to go on without TLS and verifies the server's
	// certificate against the server name given to Dial (unless the caller's
	// TLSConfig sets InsecureSkipVerify). Every failure to get TLS is a
	// temporary *Error with Stage "starttls" and no Reply.
	TLSRequired TLSPolicy = "required"
)

// Auth holds SMTP AUTH credentials (RFC 4954).
type Auth struct {
	Username, Password string
}

// Timeouts bounds each step of the protocol. A zero field takes the RFC 5321
// §4.5.3.2 default shown in parentheses.
type Timeouts struct {
	Connect   time.Duration // TCP connect (30s)
	Greeting  time.Duration // the 220 greeting (5m)
	Command   time.Duration // EHLO, STARTTLS and the TLS handshake, AUTH, MAIL, RCPT, RSET (5m)
	DataInit  time.Duration // the reply to DATA (2m)
	DataBlock time.Duration // each write of up to 64 KiB of message data (3m)
	DataDone  time.Duration // the reply to the final "." (10m)
}

// Default timeouts, from RFC 5321 §4.5.3.2.
const (
	DefaultConnectTimeout   = 30 * time.Second
	DefaultGreetingTimeout  = 5 * time.Minute
	DefaultCommandTimeout   = 5 * time.Minute
	DefaultDataInitTimeout  = 2 * time.Minute
	DefaultDataBlockTimeout = 3 * time.Minute
	DefaultDataDoneTimeout  = 10 * time.Minute
)

// quitTimeout bounds the QUIT exchange in Close.
const quitTimeout = 5 * time.Second

func (t Timeouts) withDefaults() Timeouts {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&t.Connect, DefaultConnectTimeout)
	def(&t.Greeting, DefaultGreetingTimeout)
	def(&t.Command, DefaultCommandTimeout)
	def(&t.DataInit, DefaultDataInitTimeout)
	def(&t.DataBlock, DefaultDataBlockTimeout)
	def(&t.DataDone, DefaultDataDoneTimeout)
	return t
}

// Dialer opens network connections; *net.Dialer is one.
type Dialer interface {
	DialContext(ctx context.Context, network, addr string) (net.Conn, error)
}

// Options configures Dial.
type Options struct {
	// LocalName is the name given in EHLO/HELO; required.
	LocalName string
	// TLS is the STARTTLS policy; "" means TLSOpportunistic.
	TLS TLSPolicy
	// TLSConfig is the base TLS configuration; it is cloned, and its
	// ServerName is replaced by Dial's serverName (or the address's host when
	// serverName is empty). With TLSOpportunistic, InsecureSkipVerify is
	// forced on; with TLSRequired it is left as the caller set it.
	TLSConfig *tls.Config
	// Auth, when set, makes Dial authenticate with AUTH PLAIN, or LOGIN when
	// the server does not offer PLAIN. Credentials are only sent over TLS or
	// to a loopback address; otherwise Dial fails with Stage "auth".
	Auth *Auth
	// Timeouts bounds each protocol step.
	Timeouts Timeouts
	// Dialer opens the TCP connection; nil means a zero net.Dialer.
	Dialer Dialer
	// NoChunking keeps Send from using BDAT (RFC 3030) when the server
	// offers CHUNKING and PIPELINING. With BDAT the whole transaction,
	// message included, goes in one write and costs one round trip
	// instead of two.
	NoChunking bool
}

// Conn is one SMTP client connection. See the package documentation for
// ownership and concurrency rules.
type Conn struct {
	raw  net.Conn // the TCP connection; closed to abort
	conn net.Conn // raw, or the TLS connection over it
	tw   timedWriter
	br   *bufio.Reader
	bw   *bufio.Writer

	opts     Options
	t        Timeouts
	host     string // server name, or addr when none was given
	tlsInfo  string // TLS version and cipher after STARTTLS
	addr     string
	greeting string

	ext        map[string]string
	pipelining bool
	chunking   bool // CHUNKING offered and allowed: send with BDAT
	hasSize    bool
	sizeLimit  int64
	tlsOutcome string // see TLSOutcome
	has8bit    bool
	hasUTF8    bool
	hasDSN     bool

	isTLS    bool
	messages int
	broken   bool
	closed   bool

	lines   []string      // the lines of the last reply, for EHLO
	scratch []byte        // command buffer reused by Send
	begun   *begunMessage // a transaction begun behind the last message's data
}

// Dial connects to addr ("ip:port"), reads the greeting, says EHLO (HELO
// when EHLO is refused with a 5xx reply), does STARTTLS as the policy says
// (and EHLO again after it), and authenticates when Options.Auth is set.
// serverName is the host name used for TLS SNI and verification and in
// errors. ctx bounds the whole of Dial. Failures to talk to the server are
// returned as *Error; invalid Options as other errors.
func Dial(ctx context.Context, addr, serverName string, opts Options) (*Conn, error) {
	if opts.LocalName == "" || strings.ContainsAny(opts.LocalName, " \t\r\n") {
		return nil, fmt.Errorf("smtpclient: invalid LocalName %q", opts.LocalName)
	}
	switch opts.TLS {
	case "":
		opts.TLS = TLSOpportunistic
	case TLSNone, TLSOpportunistic, TLSRequired:
	default:
		return nil, fmt.Errorf("smtpclient: unknown TLS policy %q", opts.TLS)
	}
	c, err := dial(ctx, addr, serverName, opts)
	var e *Error
	if err != nil && opts.TLS == TLSOpportunistic && errors.As(err, &e) &&
		e.Stage == "starttls" && e.Reply == nil && ctx.Err() == nil {
		// The handshake failed after the server agreed to STARTTLS: the
		// stream is lost, so try once more without TLS.
		opts.TLS = TLSNone
		c, err = dial(ctx, addr, serverName, opts)
		if c != nil {
			c.tlsOutcome = TLSFellBack
		}
	}
	return c, err
}

func dial(ctx context.Context, addr, serverName string, opts Options) (*Conn, error) {
	host := strings.TrimSuffix(serverName, ".")
	if host == "" {
		host = addr
	}
	t := opts.Timeouts.withDefaults()
	var d Dialer = opts.Dialer
	if d == nil {
		d = &net.Dialer{}
	}
	dctx, cancel := context.WithTimeout(ctx, t.Connect)
	raw, err := d.DialContext(dctx, "tcp", addr)
	cancel()
	if err != nil {
		return nil, &Error{Stage: "connect", Host: host, Addr: addr, Err: err}
	}
	c := &Conn{raw: raw, conn: raw, opts: opts, t: t, host: host, addr: addr}
	c.tw = timedWriter{conn: raw, timeout: t.Command}
	c.br = bufio.NewReaderSize(raw, 4096)
	c.bw = bufio.NewWriterSize(&c.tw, blockSize)
	c.ext = map[string]string{}

	stop := context.AfterFunc(ctx, c.abort)
	err = c.setup(serverName)
	if !stop() {
		c.broken = true
		err = c.cancelled(ctx, err, "connect")
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// abort closes the socket under any I/O in progress; it is the only method
// that may run concurrently with the others.
func (c *Conn) abort() { c.raw.Close() }

// cancelled adjusts err after ctx closed the socket during a call.
func (c *Conn) cancelled(ctx context.Context, err error, stage string) error {
	cause := context.Cause(ctx)
	if err == nil {
		return c.ioFail(stage, cause)
	}
	var e *Error
	if errors.As(err, &e) && e.Reply == nil {
		if e.Err == nil {
			e.Err = cause
		} else if !errors.Is(e.Err, cause) {
			e.Err = fmt.Errorf("%w (%v)", cause, e.Err)
		}
	}
	return err
}

func (c *Conn) setup(serverName string) error {
	r, err := c.readReply(c.t.Greeting)
	if err != nil {
		return c.ioFail("greeting", err)
	}
	c.greeting = r.Text
	if r.Code != 220 {
		return c.replyFail("greeting", r)
	}
	if err := c.hello(); err != nil {
		return err
	}
	_, offered := c.ext["STARTTLS"]
	c.tlsOutcome = TLSDisabled
	switch c.opts.TLS {
	case TLSOpportunistic:
		c.tlsOutcome = TLSNotOffered
		if offered {
			if err := c.startTLS(serverName, false); err != nil {
				return err
			}
			c.tlsOutcome = TLSRefused
			if c.isTLS {
				c.tlsOutcome = TLSUsed
			}
		}
	case TLSRequired:
		if !offered {
			return &Error{Stage: "starttls", Host: c.host, Addr: c.addr,
				Err: fmt.Errorf("%w: server does not offer STARTTLS", ErrTLSUnavailable)}
		}
		if err := c.startTLS(serverName, true); err != nil {
			return err
		}
		c.tlsOutcome = TLSUsed
	}
	if c.opts.Auth != nil {
		return c.auth()
	}
	return nil
}

// hello says EHLO, or HELO when EHLO is refused, and records the extensions.
func (c *Conn) hello() error {
	c.resetExtensions()
	r, err := c.command("ehlo", c.t.Command, "EHLO ", c.opts.LocalName)
	if err != nil {
		return err
	}
	if r.Code/100 == 2 {
		c.parseEHLO()
		return nil
	}
	if r.Code/100 != 5 {
		return c.replyFail("ehlo", r)
	}
	r, err = c.command("ehlo", c.t.Command, "HELO ", c.opts.LocalName)
	if err != nil {
		return err
	}
	if r.Code/100 != 2 {
		return c.replyFail("ehlo", r)
	}
	return nil
}

// resetExtensions forgets everything the last EHLO said, so that a server
// that answers only HELO (after STARTTLS, say) is not sent BDAT or
// pipelined commands it never offered this time.
func (c *Conn) resetExtensions() {
	c.ext = map[string]string{}
	c.pipelining, c.chunking, c.hasSize, c.has8bit, c.hasUTF8, c.hasDSN = false, false, false, false, false, false
	c.sizeLimit = 0
}

// parseEHLO reads the extensions from the lines of the last reply. The first
// line is the server's greeting; each further line is "KEYWORD params".
func (c *Conn) parseEHLO() {
	for _, line := range c.lines[1:] {
		kw, params, _ := strings.Cut(strings.TrimSpace(line), " ")
		if k, p, ok := strings.Cut(kw, "="); ok { // old "AUTH=LOGIN PLAIN"
			kw, params = k, strings.TrimSpace(p+" "+params)
		}
		kw = strings.ToUpper(kw)
		if kw == "" {
			continue
		}
		if _, dup := c.ext[kw]; !dup {
			c.ext[kw] = strings.TrimSpace(params)
		}
	}
	_, c.pipelining = c.ext["PIPELINING"]
	_, c.chunking = c.ext["CHUNKING"]
	c.chunking = c.chunking && c.pipelining && !c.opts.NoChunking
	_, c.has8bit = c.ext["8BITMIME"]
	_, c.hasUTF8 = c.ext["SMTPUTF8"]
	_, c.hasDSN = c.ext["DSN"]
	var size string
	if size, c.hasSize = c.ext["SIZE"]; c.hasSize {
		if n, err := strconv.ParseInt(size, 10, 64); err == nil && n > 0 {
			c.sizeLimit = n
		}
	}
}

func (c *Conn) startTLS(serverName string, required bool) error {
	r, err := c.command("starttls", c.t.Command, "STARTTLS")
	if err != nil {
		return err
	}
	if r.Code != 220 {
		if r.Code == 421 {
			return c.replyFail("starttls", r)
		}
		if r.Code/100 == 2 || r.Code/100 == 3 {
			return c.outOfStep("starttls", r)
		}
		if !required {
			return nil // stay in plaintext; the stream is in step
		}
		return &Error{Stage: "starttls", Host: c.host, Addr: c.addr,
			Err: fmt.Errorf("%w: STARTTLS refused: %s", ErrTLSUnavailable, r.Error())}
	}
	if c.br.Buffered() > 0 {
		// Bytes sent before the handshake would be taken as if they came
		// over TLS (the STARTTLS injection of CVE-2011-0411).
		return c.ioFail("starttls", errors.New("server sent data after its STARTTLS reply"))
	}
	cfg := &tls.Config{}
	if c.opts.TLSConfig != nil {
		cfg = c.opts.TLSConfig.Clone()
	}
	cfg.ServerName = strings.TrimSuffix(serverName, ".")
	if cfg.ServerName == "" {
		cfg.ServerName, _, _ = net.SplitHostPort(c.addr)
	}
	if !required {
		cfg.InsecureSkipVerify = true
	}
	tc := tls.Client(c.raw, cfg)
	c.raw.SetDeadline(time.Now().Add(c.t.Command))
	if err := tc.Handshake(); err != nil {
		return c.ioFail("starttls", err)
	}
	c.conn, c.tw.conn = tc, tc
	c.br.Reset(tc)
	c.isTLS = true
	st := tc.ConnectionState()
	c.tlsInfo = tls.VersionName(st.Version) + " " + tls.CipherSuiteName(st.CipherSuite)
	return c.hello()
}

func (c *Conn) auth() error {
	a := c.opts.Auth
	if !c.isTLS && !isLoopback(c.raw.RemoteAddr()) {
		return &Error{Stage: "auth", Host: c.host, Addr: c.addr, Err: ErrAuthNeedsTLS}
	}
	params, ok := c.ext["AUTH"]
	if !ok {
		return &Error{Stage: "auth", Host: c.host, Addr: c.addr,
			Err: fmt.Errorf("%w: server does not offer AUTH", ErrAuthFailed)}
	}
	var plain, login bool
	for _, m := range strings.Fields(strings.ToUpper(params)) {
		plain = plain || m == "PLAIN"
		login = login || m == "LOGIN"
	}
	var r *mta.Reply
	var err error
	switch {
	case plain:
		resp := b64("\x00" + a.Username + "\x00" + a.Password)
		r, err = c.command("auth", c.t.Command, "AUTH PLAIN ", resp)
	case login:
		r, err = c.command("auth", c.t.Command, "AUTH LOGIN")
		for _, s := range []string{a.Username, a.Password} {
			if err != nil || r.Code != 334 {
				break
			}
			r, err = c.command("auth", c.t.Command, b64(s))
		}
	default:
		return &Error{Stage: "auth", Host: c.host, Addr: c.addr,
			Err: fmt.Errorf("%w: no supported mechanism in %q", ErrAuthFailed, params)}
	}
	switch {
	case err != nil:
		return err
	case r.Code == 235:
		return nil
	case r.Code == 421:
		return c.replyFail("auth", r)
	case r.Code/100 == 2 || r.Code/100 == 3:
		// A 334 here means the server wants more than we have: the
		// exchange cannot be finished in step.
		return c.outOfStep("auth", r)
	}
	return &Error{Stage: "auth", Host: c.host, Addr: c.addr,
		Err: fmt.Errorf("%w: %s", ErrAuthFailed, r.Error())}
}

func isLoopback(a net.Addr) bool {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.IP.IsLoopback()
	}
	if a == nil {
		return false
	}
	host, _, err := net.SplitHostPort(a.String())
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// command writes one command line, flushes it and reads the reply.
func (c *Conn) command(stage string, timeout time.Duration, parts ...string) (*mta.Reply, error) {
	c.tw.timeout = c.t.Command
	for _, p := range parts {
		c.bw.WriteString(p)
	}
	c.bw.WriteString("\r\n")
	if err := c.bw.Flush(); err != nil {
		return nil, c.ioFail(stage, err)
	}
	r, err := c.readReply(timeout)
	if err != nil {
		return nil, c.ioFail(stage, err)
	}
	return r, nil
}

// Close says QUIT (when the stream is in step; with a short timeout, errors
// ignored) and closes the connection. It is idempotent and always returns
// nil.
func (c *Conn) Close() error {
	if c.closed {
		return nil
	}
	c.closed = true
	if c.begun != nil {
		// The server waits inside a transaction (perhaps for data after
		// 354): QUIT would be read as part of the message.
		c.broken = true
	}
	if !c.broken {
		c.tw.timeout = quitTimeout
		c.bw.WriteString("QUIT\r\n")
		if c.bw.Flush() == nil {
			c.readReply(quitTimeout)
		}
	}
	c.broken = true
	c.conn.Close()
	c.raw.Close()
	return nil
}

// Usable reports whether the Conn is open and in step, that is whether it may
// carry another message. Once false it stays false.
func (c *Conn) Usable() bool { return !c.broken && !c.closed }

// Messages reports how many transactions were attempted (MAIL commands
// sent) over this Conn. Messages refused before anything was sent (size over
// the server's limit, SMTPUTF8 not offered) do not count.
func (c *Conn) Messages() int { return c.messages }

// Extensions returns a copy of the EHLO keywords (upper case) with their
// parameters; it is empty when the server only spoke HELO.
func (c *Conn) Extensions() map[string]string { return maps.Clone(c.ext) }

// TLS reports whether the session runs over TLS.
func (c *Conn) TLS() bool { return c.isTLS }

// TLSInfo describes the TLS session, "TLS 1.3 TLS_AES_128_GCM_SHA256", or
// is "" without TLS.
func (c *Conn) TLSInfo() string { return c.tlsInfo }

// Outcomes of STARTTLS on a connection, for metrics.
const (
	TLSUsed       = "used"        // the session is encrypted
	TLSNotOffered = "not_offered" // opportunistic, and the server did not offer STARTTLS
	TLSRefused    = "refused"     // opportunistic: the server offered STARTTLS but refused it (4xx/5xx)
	TLSFellBack   = "fell_back"   // opportunistic: the handshake failed, the connection went on without TLS
	TLSDisabled   = "disabled"    // the policy is none
)

// TLSOutcome says how STARTTLS went on this connection.
func (c *Conn) TLSOutcome() string { return c.tlsOutcome }

// OffersDSN reports whether the server offered DSN (RFC 3461), so that
// NOTIFY, ORCPT, RET and ENVID go on with the message.
func (c *Conn) OffersDSN() bool { return c.hasDSN }

// Host returns the server name given to Dial (the MX host), or the address.
func (c *Conn) Host() string { return c.host }

// RemoteAddr returns the server's address as "ip:port".
func (c *Conn) RemoteAddr() string { return c.raw.RemoteAddr().String() }

// Greeting returns the text of the server's 220 greeting.
func (c *Conn) Greeting() string { return c.greeting }

// blockSize is the largest single write to the socket, and the size of the
// write buffer.
const blockSize = 64 << 10

// timedWriter writes to the connection in blocks of at most blockSize, each
// with a fresh write deadline.
type timedWriter struct {
	conn    net.Conn
	timeout time.Duration
}

func (w *timedWriter) Write(p []byte) (n int, err error) {
	for len(p) > 0 {
		chunk := p
		if len(chunk) > blockSize {
			chunk = chunk[:blockSize]
		}
		if err := w.conn.SetWriteDeadline(time.Now().Add(w.timeout)); err != nil {
			return n, err
		}
		m, err := w.conn.Write(chunk)
		n += m
		if err != nil {
			return n, err
		}
		p = p[m:]
	}
	return n, nil
}
