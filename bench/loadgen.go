package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// LoadConfig describes one load run. The zero value of every optional field
// selects the documented default.
type LoadConfig struct {
	// Addr is host:port of the SMTP server. Only loopback addresses are
	// accepted (127.0.0.0/8, ::1, or the name "localhost"); anything else
	// makes RunLoad fail with ErrNotLoopback. The address actually
	// connected to is checked again after each dial.
	Addr string
	// Sessions is the number of concurrent SMTP sessions (TCP connections).
	// Default 1; never more than Messages.
	Sessions int
	// Messages is the total number of messages to send across all sessions.
	// Must be > 0.
	Messages int
	// MessagesPerSession is the number of messages sent over one connection
	// before QUIT and reconnect; 0 = unlimited.
	MessagesPerSession int
	// Size is the approximate message size in bytes (headers+body, before
	// dot-stuffing), >= 200; 0 means 1024. The body is printable ASCII lines
	// of at most 76 characters with CRLF line endings; some lines start with
	// "." (and some are just "."), so dot-stuffing is exercised.
	Size int
	// SizeDist, if set, overrides Size: each message's size is picked by
	// weight, deterministically from Seed and the message's sequence number.
	SizeDist []SizeWeight
	// RecipientsPerMessage is the number of RCPT TO per message; default 1.
	// Recipient j (0-based) of a message is "user<j+1>@<domain>".
	RecipientsPerMessage int
	// Domains are the recipient domains, round-robin over messages (message
	// seq uses Domains[seq%len(Domains)]); default ["example.com"].
	Domains []string
	// From is the envelope sender and From: header; default
	// "loadgen@bench.test".
	From string
	// Pipelining: if true, send MAIL, all RCPTs and DATA in one write and
	// read the replies after (RFC 2920). The server must advertise
	// PIPELINING, otherwise RunLoad fails. If false, wait for each reply.
	Pipelining bool
	// EHLO is the EHLO argument; default "loadgen.bench.test".
	EHLO string
	// Timeout bounds each reply read (and the write before it) and each
	// dial; default 30s. (For efficiency the I/O deadline is only moved
	// when stale, so the effective bound is 90-100% of Timeout.)
	Timeout time.Duration
	// Seed makes the generated messages deterministic: the same Seed and
	// sequence number always give the same bytes.
	Seed int64
	// Progress, if set, is called at most ~10 times per second from a single
	// goroutine with the number of messages finished so far (any outcome) and
	// the number accepted so far, and once more with the final counts before
	// RunLoad returns.
	Progress func(sent, accepted int)
	// CollectIDs makes RunLoad fill LoadResult.QueueIDs.
	CollectIDs bool
	// OnAccepted, if set, is called for every message accepted with a 2xx at
	// end of DATA, with the queue ID parsed from the reply ("" if none) and
	// the exact message bytes as sent before dot-stuffing (what the server
	// should store after its own trace headers). Calls are serialized (never
	// concurrent) and made in acceptance order, but from the session
	// goroutines, so a slow callback slows the load. msg is reused after the
	// call returns: copy it to keep it.
	OnAccepted func(id string, msg []byte)
}

// SizeWeight is one entry of a message size distribution.
type SizeWeight struct {
	Size   int // message size in bytes, >= 200
	Weight int // relative weight, >= 0; entries of weight 0 are never picked
}

// LoadResult is what a run measured. Every attempted message is counted in
// exactly one of Accepted, TempFailed, PermFailed and Errors.
type LoadResult struct {
	// Attempted counts messages for which a MAIL FROM was sent.
	Attempted int
	// Accepted counts messages with a 2xx reply at end of DATA (even if
	// some of their recipients were refused; see RcptRejected).
	Accepted int
	// TempFailed counts messages refused with 4xx: at MAIL, at DATA, at end
	// of DATA, or at RCPT when no recipient was accepted and at least one
	// refusal was 4xx. A 421 also closes the connection.
	TempFailed int
	// PermFailed counts messages refused with 5xx at MAIL, DATA or end of
	// DATA, or whose recipients were all refused with 5xx.
	PermFailed int
	// Errors counts messages lost to I/O errors, timeouts, protocol errors
	// (malformed or unexpected replies) or cancellation of the context.
	Errors int
	// RcptRejected counts individual RCPT TO refused with 4xx or 5xx.
	RcptRejected int
	// Latency holds one sample per accepted message: the time from writing
	// the final "\r\n.\r\n" to reading the complete end-of-data reply. (For
	// messages over 64 KiB the last 8 KiB are written separately and timed.)
	Latency Durations
	// Elapsed is the wall time from first connect to the last final reply
	// of a message (normally the end-of-data reply; for a refused message,
	// the refusal; for an error, when it occurred).
	Elapsed time.Duration
	// Connections counts TCP connections opened.
	Connections int
	// Replies counts the codes of the end-of-DATA replies, e.g. "250",
	// "451", "552" (only for messages whose content was sent).
	Replies map[string]int
	// QueueIDs holds, if LoadConfig.CollectIDs, the ID from each 2xx
	// end-of-data reply whose text contains "queued as <ID>" (matched
	// case-insensitively; surrounding <>, () and a trailing period are
	// dropped), in order of acceptance. Replies without an ID contribute
	// nothing.
	QueueIDs []string
}

// Rate returns accepted messages per second over Elapsed.
func (r LoadResult) Rate() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Accepted) / r.Elapsed.Seconds()
}

// ErrNotLoopback is returned (wrapped) for a LoadConfig.Addr that is not a
// loopback address.
var ErrNotLoopback = errors.New("bench: address is not loopback")

// errProtocol marks malformed or out-of-sequence replies.
var errProtocol = errors.New("bench: SMTP protocol error")

// errFatal marks failures that stop the whole run (already recorded).
var errFatal = errors.New("bench: run aborted")

// Fixed commands, allocated once.
var (
	cmdData = []byte("DATA\r\n")
	cmdRset = []byte("RSET\r\n")
	cmdQuit = []byte("QUIT\r\n")
	cmdDot  = []byte(".\r\n")
)

const (
	defaultSize     = 1024
	minSize         = 200
	maxLineLen      = 76
	maxConnFailures = 10
	// Messages whose wire form exceeds splitWriteOver are written in two
	// parts so that the latency clock starts right before the last
	// splitTail bytes, not before the whole transfer.
	splitWriteOver = 64 << 10
	splitTail      = 8 << 10
)

// RunLoad runs one load test and returns what it measured. The result is
// meaningful even when the error is non-nil: the error reports a context
// cancellation, a run-stopping problem (e.g. PIPELINING requested but not
// offered) or sessions that gave up after maxConnFailures consecutive
// connection failures, and the result covers what was done until then.
// Configuration errors return a zero result.
func RunLoad(ctx context.Context, cfg LoadConfig) (LoadResult, error) {
	cfg, err := cfg.normalized()
	if err != nil {
		return LoadResult{}, err
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	r := &runner{
		cfg:    cfg,
		gen:    newGenerator(&cfg),
		ctx:    rctx,
		cancel: cancel,
		wantID: cfg.CollectIDs || cfg.OnAccepted != nil,
	}
	sessions := make([]*session, cfg.Sessions)
	for i := range sessions {
		sessions[i] = newSession(r)
	}

	var progressDone, progressStopped chan struct{}
	if cfg.Progress != nil {
		progressDone = make(chan struct{})
		progressStopped = make(chan struct{})
		go func() {
			defer close(progressStopped)
			t := time.NewTicker(100 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-t.C:
					cfg.Progress(int(r.done.Load()), int(r.accepted.Load()))
				case <-progressDone:
					cfg.Progress(int(r.done.Load()), int(r.accepted.Load()))
					return
				}
			}
		}()
	}

	start := time.Now()
	var wg sync.WaitGroup
	for _, s := range sessions {
		wg.Go(s.run)
	}
	wg.Wait()
	end := time.Now()
	if progressDone != nil {
		close(progressDone)
		<-progressStopped
	}

	res := LoadResult{Replies: make(map[string]int)}
	var last time.Time
	n := 0
	for _, s := range sessions {
		n += len(s.st.latency)
	}
	res.Latency = make(Durations, 0, n)
	var gaveUp int
	var gaveUpErr error
	for _, s := range sessions {
		st := &s.st
		res.Attempted += st.attempted
		res.Accepted += st.accepted
		res.TempFailed += st.temp
		res.PermFailed += st.perm
		res.Errors += st.errors
		res.RcptRejected += st.rcptRejected
		res.Connections += st.connections
		res.Latency = append(res.Latency, st.latency...)
		for code, c := range st.replies {
			if c > 0 {
				res.Replies[fmt.Sprintf("%03d", code)] += c
			}
		}
		if st.last.After(last) {
			last = st.last
		}
		if s.gaveUp {
			gaveUp++
			gaveUpErr = s.lastErr
		}
	}
	if last.IsZero() {
		last = end
	}
	res.Elapsed = last.Sub(start)
	res.QueueIDs = r.queueIDs

	switch {
	case r.fatal != nil:
		err = r.fatal
	case ctx.Err() != nil:
		err = fmt.Errorf("bench: load run interrupted: %w", ctx.Err())
		if cause := context.Cause(ctx); cause != ctx.Err() {
			err = fmt.Errorf("%w: %w", err, cause)
		}
	case gaveUp > 0:
		err = fmt.Errorf("bench: %d of %d sessions gave up after %d consecutive connection failures, last: %w",
			gaveUp, len(sessions), maxConnFailures, gaveUpErr)
	}
	return res, err
}

// normalized validates cfg and fills in defaults. Slices are copied so that
// the caller may reuse them while the run is going on.
func (cfg LoadConfig) normalized() (LoadConfig, error) {
	if err := checkLoopback(cfg.Addr); err != nil {
		return cfg, err
	}
	bad := func(format string, args ...any) (LoadConfig, error) {
		return cfg, fmt.Errorf("bench: invalid LoadConfig: "+format, args...)
	}
	if cfg.Messages <= 0 {
		return bad("Messages = %d, want > 0", cfg.Messages)
	}
	if cfg.Sessions < 0 {
		return bad("Sessions = %d", cfg.Sessions)
	}
	cfg.Sessions = min(max(cfg.Sessions, 1), cfg.Messages)
	if cfg.MessagesPerSession < 0 {
		return bad("MessagesPerSession = %d", cfg.MessagesPerSession)
	}
	if cfg.RecipientsPerMessage < 0 {
		return bad("RecipientsPerMessage = %d", cfg.RecipientsPerMessage)
	}
	if cfg.RecipientsPerMessage == 0 {
		cfg.RecipientsPerMessage = 1
	}
	if cfg.Timeout < 0 {
		return bad("Timeout = %v", cfg.Timeout)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 30 * time.Second
	}
	if len(cfg.SizeDist) > 0 {
		total := 0
		for _, sw := range cfg.SizeDist {
			if sw.Size < minSize || sw.Weight < 0 {
				return bad("SizeDist entry %+v: want Size >= %d and Weight >= 0", sw, minSize)
			}
			total += sw.Weight
		}
		if total <= 0 {
			return bad("SizeDist has no positive weight")
		}
		cfg.SizeDist = append([]SizeWeight(nil), cfg.SizeDist...)
	} else {
		if cfg.Size == 0 {
			cfg.Size = defaultSize
		}
		if cfg.Size < minSize {
			return bad("Size = %d, want >= %d", cfg.Size, minSize)
		}
	}
	if len(cfg.Domains) == 0 {
		cfg.Domains = []string{"example.com"}
	} else {
		cfg.Domains = append([]string(nil), cfg.Domains...)
	}
	for _, d := range cfg.Domains {
		if !isToken(d) {
			return bad("domain %q", d)
		}
	}
	if cfg.From == "" {
		cfg.From = "loadgen@bench.test"
	}
	if !isToken(cfg.From) {
		return bad("From %q", cfg.From)
	}
	if cfg.EHLO == "" {
		cfg.EHLO = "loadgen.bench.test"
	}
	if !isToken(cfg.EHLO) {
		return bad("EHLO %q", cfg.EHLO)
	}
	return cfg, nil
}

// isToken reports whether s can be put into a command or header verbatim.
func isToken(s string) bool {
	return s != "" && !strings.ContainsAny(s, " \t\r\n<>,")
}

// checkLoopback refuses any address that is not literally loopback.
func checkLoopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%w: %q: %v", ErrNotLoopback, addr, err)
	}
	if strings.EqualFold(strings.TrimSuffix(host, "."), "localhost") {
		return nil
	}
	if ip, err := netip.ParseAddr(host); err == nil && ip.Unmap().IsLoopback() {
		return nil
	}
	return fmt.Errorf("%w: %q (use 127.0.0.1, [::1] or localhost)", ErrNotLoopback, addr)
}

// runner is the state shared by the sessions of one run.
type runner struct {
	cfg    LoadConfig
	gen    *generator
	ctx    context.Context
	cancel context.CancelFunc
	wantID bool // parse queue IDs from end-of-data replies

	next     atomic.Int64 // next message sequence number to hand out
	done     atomic.Int64 // messages finished (for Progress)
	accepted atomic.Int64 // messages accepted (for Progress)

	mu       sync.Mutex // guards queueIDs, fatal and OnAccepted calls
	queueIDs []string
	fatal    error
}

func (r *runner) setFatal(err error) {
	r.mu.Lock()
	if r.fatal == nil {
		r.fatal = err
	}
	r.mu.Unlock()
	r.cancel()
}

// outcome is the fate of one message.
type outcome int

const (
	outAccepted outcome = iota
	outTemp
	outPerm
	outError
)

// classOf maps a refusal code to an outcome.
func classOf(code int) outcome {
	switch code / 100 {
	case 2:
		return outAccepted
	case 4:
		return outTemp
	case 5:
		return outPerm
	}
	return outError
}

// sessionStats are one session's counters, merged after the run.
type sessionStats struct {
	attempted, accepted, temp, perm, errors int
	rcptRejected, connections               int
	latency                                 []time.Duration
	replies                                 [1000]int // end-of-data reply codes
	last                                    time.Time // last final reply
}

// session is one SMTP client, reconnecting as needed.
type session struct {
	r   *runner
	cfg *LoadConfig

	conn     net.Conn
	br       *bufio.Reader
	stopConn func() bool // unregisters the close-on-cancel hook
	onConn   int         // messages finished on the current connection

	deadline time.Time // current deadline of conn

	fails   int   // consecutive connection-level failures
	lastErr error // the latest of them
	gaveUp  bool

	// Reply parsing side channels, set by readReply.
	inEHLO     bool   // look for the PIPELINING keyword
	pipelining bool   // the server advertised PIPELINING
	scanID     bool   // look for "queued as <ID>" in a 2xx reply
	id         string // queue ID found by the last readReply

	raw  []byte // the current message, unstuffed
	wire []byte // the current message, dot-stuffed and terminated
	cmd  []byte // command buffer

	st sessionStats
}

func newSession(r *runner) *session {
	cfg := &r.cfg
	maxSize := cfg.Size
	for _, sw := range cfg.SizeDist {
		maxSize = max(maxSize, sw.Size)
	}
	rawCap := maxSize + 256 + cfg.RecipientsPerMessage*(len("user, @")+8+maxDomainLen(cfg.Domains))
	return &session{
		r:    r,
		cfg:  cfg,
		br:   bufio.NewReaderSize(nil, 4096),
		raw:  make([]byte, 0, rawCap),
		wire: make([]byte, 0, rawCap+rawCap/16+8),
		cmd:  make([]byte, 0, 512),
		st: sessionStats{
			latency: make([]time.Duration, 0, min(cfg.Messages/cfg.Sessions+1, 1<<20)),
		},
	}
}

func maxDomainLen(ds []string) int {
	n := 0
	for _, d := range ds {
		n = max(n, len(d))
	}
	return n
}

// run is the session's main loop: take message numbers until none are left.
func (s *session) run() {
	ctx := s.r.ctx
	defer s.hangup(true)
	for ctx.Err() == nil {
		if s.conn == nil {
			if s.r.next.Load() >= int64(s.cfg.Messages) {
				return
			}
			if !s.connect() {
				return
			}
		}
		seq := s.r.next.Add(1) - 1
		if seq >= int64(s.cfg.Messages) {
			return
		}
		out, connErr := s.message(int(seq))
		s.record(out)
		if connErr != nil {
			s.fails++
			s.lastErr = connErr
			s.hangup(false)
			continue
		}
		s.fails = 0
		s.onConn++
		if s.cfg.MessagesPerSession > 0 && s.onConn >= s.cfg.MessagesPerSession {
			s.hangup(true)
		}
	}
}

func (s *session) record(out outcome) {
	switch out {
	case outAccepted:
		s.st.accepted++
		s.r.accepted.Add(1)
	case outTemp:
		s.st.temp++
	case outPerm:
		s.st.perm++
	default:
		s.st.errors++
	}
	s.st.last = time.Now()
	s.r.done.Add(1)
}

// connect opens a connection and does the greeting and EHLO, retrying with
// a short backoff. It returns false if the session must stop.
func (s *session) connect() bool {
	ctx := s.r.ctx
	for {
		if s.fails >= maxConnFailures {
			s.gaveUp = true
			return false
		}
		if s.fails > 0 {
			t := time.NewTimer(min(time.Millisecond<<(s.fails-1), 50*time.Millisecond))
			select {
			case <-ctx.Done():
				t.Stop()
				return false
			case <-t.C:
			}
		}
		err := s.dial()
		if err == nil {
			return true
		}
		if errors.Is(err, errFatal) || ctx.Err() != nil {
			return false
		}
		s.fails++
		s.lastErr = err
	}
}

func (s *session) dial() error {
	ctx := s.r.ctx
	d := net.Dialer{Timeout: s.cfg.Timeout}
	c, err := d.DialContext(ctx, "tcp", s.cfg.Addr)
	if err != nil {
		return err
	}
	if ta, ok := c.RemoteAddr().(*net.TCPAddr); !ok || !ta.IP.IsLoopback() {
		c.Close()
		s.r.setFatal(fmt.Errorf("%w: %s connected to %v", ErrNotLoopback, s.cfg.Addr, c.RemoteAddr()))
		return errFatal
	}
	s.st.connections++
	s.conn = c
	s.deadline = time.Time{}
	s.br.Reset(c)
	s.onConn = 0
	s.stopConn = context.AfterFunc(ctx, func() { c.Close() })

	s.arm()
	code, err := s.readReply()
	if err == nil && code != 220 {
		err = fmt.Errorf("bench: greeting %d", code)
	}
	if err != nil {
		s.hangup(false)
		return err
	}
	s.cmd = append(append(append(s.cmd[:0], "EHLO "...), s.cfg.EHLO...), "\r\n"...)
	s.inEHLO, s.pipelining = true, false
	code, err = s.roundTrip(s.cmd)
	s.inEHLO = false
	if err == nil && code != 250 {
		err = fmt.Errorf("bench: EHLO answered %d", code)
	}
	if err != nil {
		s.hangup(code/100 == 5)
		return err
	}
	if s.cfg.Pipelining && !s.pipelining {
		s.hangup(true)
		s.r.setFatal(fmt.Errorf("bench: Pipelining requested but %s does not advertise PIPELINING", s.cfg.Addr))
		return errFatal
	}
	return nil
}

// hangup closes the connection, after a QUIT exchange if quit is set and the
// run has not been cancelled.
func (s *session) hangup(quit bool) {
	if s.conn == nil {
		return
	}
	if quit && s.r.ctx.Err() == nil {
		if _, err := s.roundTrip(cmdQuit); err != nil {
			s.lastErr = err
		}
	}
	s.stopConn()
	s.conn.Close()
	s.conn = nil
}

// arm sets the deadline for the next write and reply read. Setting a
// deadline costs timer work in the runtime, so it is only moved when it has
// become more than a tenth of Timeout stale: the effective bound on each
// write and reply is between 90% and 100% of Timeout.
func (s *session) arm() {
	now := time.Now()
	if s.deadline.Sub(now) >= s.cfg.Timeout-s.cfg.Timeout/10 {
		return
	}
	s.deadline = now.Add(s.cfg.Timeout)
	s.conn.SetDeadline(s.deadline)
}

func (s *session) write(b []byte) error {
	_, err := s.conn.Write(b)
	return err
}

// roundTrip writes one command and reads its reply.
func (s *session) roundTrip(b []byte) (int, error) {
	s.arm()
	if err := s.write(b); err != nil {
		return 0, err
	}
	return s.readReply()
}

// message runs one mail transaction. A non-nil error means the connection
// is unusable (I/O error, protocol error or 421) and must be dropped.
func (s *session) message(seq int) (outcome, error) {
	s.raw = s.r.gen.build(s.raw[:0], seq)
	s.wire = appendDotStuffed(s.wire[:0], s.raw)
	s.st.attempted++
	if s.cfg.Pipelining {
		return s.pipelined(seq)
	}
	return s.stepwise(seq)
}

func (s *session) appendMail(b []byte) []byte {
	b = append(b, "MAIL FROM:<"...)
	b = append(b, s.cfg.From...)
	return append(b, ">\r\n"...)
}

func (s *session) appendRcpt(b []byte, seq, j int) []byte {
	b = append(b, "RCPT TO:<"...)
	b = s.r.gen.appendRcpt(b, seq, j)
	return append(b, ">\r\n"...)
}

// closing reports a 421, after which the server closes the connection.
func closing(code int) error {
	if code == 421 {
		return errors.New("bench: server closing connection (421)")
	}
	return nil
}

func protoErr(what string, code int) error {
	return fmt.Errorf("%w: unexpected reply %d to %s", errProtocol, code, what)
}

// refused handles a 4xx/5xx to MAIL, RCPT or DATA: RSET (unless the server
// is closing) and classify.
func (s *session) refused(out outcome, code int) (outcome, error) {
	if err := closing(code); err != nil {
		return outTemp, err
	}
	return out, s.rset()
}

func (s *session) rset() error {
	code, err := s.roundTrip(cmdRset)
	if err == nil && code/100 != 2 {
		err = closing(code)
		if err == nil {
			err = protoErr("RSET", code)
		}
	}
	return err
}

// stepwise sends the transaction waiting for each reply.
func (s *session) stepwise(seq int) (outcome, error) {
	s.cmd = s.appendMail(s.cmd[:0])
	code, err := s.roundTrip(s.cmd)
	if err != nil {
		return outError, err
	}
	switch code / 100 {
	case 2:
	case 4, 5:
		return s.refused(classOf(code), code)
	default:
		return outError, protoErr("MAIL", code)
	}
	ok, anyTemp := 0, false
	for j := range s.cfg.RecipientsPerMessage {
		s.cmd = s.appendRcpt(s.cmd[:0], seq, j)
		code, err = s.roundTrip(s.cmd)
		if err != nil {
			return outError, err
		}
		switch code / 100 {
		case 2:
			ok++
		case 4, 5:
			s.st.rcptRejected++
			if err := closing(code); err != nil {
				return outTemp, err
			}
			anyTemp = anyTemp || code/100 == 4
		default:
			return outError, protoErr("RCPT", code)
		}
	}
	if ok == 0 {
		return s.refused(rcptOutcome(anyTemp), 0)
	}
	code, err = s.roundTrip(cmdData)
	if err != nil {
		return outError, err
	}
	switch code / 100 {
	case 3:
		if code == 354 {
			return s.content()
		}
	case 4, 5:
		return s.refused(classOf(code), code)
	}
	return outError, protoErr("DATA", code)
}

func rcptOutcome(anyTemp bool) outcome {
	if anyTemp {
		return outTemp
	}
	return outPerm
}

// pipelined sends MAIL, the RCPTs and DATA in one write (RFC 2920), then
// reads all their replies.
func (s *session) pipelined(seq int) (outcome, error) {
	b := s.appendMail(s.cmd[:0])
	for j := range s.cfg.RecipientsPerMessage {
		b = s.appendRcpt(b, seq, j)
	}
	b = append(b, "DATA\r\n"...)
	s.cmd = b
	s.arm()
	if err := s.write(b); err != nil {
		return outError, err
	}
	mail, err := s.readReply()
	if err != nil {
		return outError, err
	}
	if err := closing(mail); err != nil {
		return outTemp, err
	}
	if c := mail / 100; c != 2 && c != 4 && c != 5 {
		return outError, protoErr("MAIL", mail)
	}
	ok, anyTemp := 0, false
	for range s.cfg.RecipientsPerMessage {
		s.arm()
		code, err := s.readReply()
		if err != nil {
			return outError, err
		}
		if err := closing(code); err != nil {
			return outTemp, err
		}
		switch code / 100 {
		case 2:
			ok++
		case 4, 5:
			if mail/100 == 2 {
				s.st.rcptRejected++
			}
			anyTemp = anyTemp || code/100 == 4
		default:
			return outError, protoErr("RCPT", code)
		}
	}
	s.arm()
	data, err := s.readReply()
	if err != nil {
		return outError, err
	}
	if err := closing(data); err != nil {
		return outTemp, err
	}
	// What the message's fate is if the envelope failed.
	envOut := outAccepted
	switch {
	case mail/100 != 2:
		envOut = classOf(mail)
	case ok == 0:
		envOut = rcptOutcome(anyTemp)
	}
	switch {
	case data == 354 && envOut == outAccepted:
		return s.content()
	case data == 354:
		// The server started DATA although the envelope failed: end it
		// empty. The transaction is over after the reply, whatever it is.
		s.arm()
		if err := s.write(cmdDot); err != nil {
			return outError, err
		}
		code, err := s.readReply()
		if err != nil {
			return outError, err
		}
		if err := closing(code); err != nil {
			return outTemp, err
		}
		return envOut, nil
	case data/100 == 4 || data/100 == 5:
		if envOut == outAccepted {
			envOut = classOf(data)
		}
		return envOut, s.rset()
	}
	return outError, protoErr("DATA", data)
}

// content writes the dot-stuffed message and its terminator, times the
// end-of-data reply and accounts for it.
func (s *session) content() (outcome, error) {
	w := s.wire
	s.arm()
	if len(w) > splitWriteOver {
		if err := s.write(w[:len(w)-splitTail]); err != nil {
			return outError, err
		}
		w = w[len(w)-splitTail:]
	}
	s.scanID = s.r.wantID
	t0 := time.Now()
	if err := s.write(w); err != nil {
		return outError, err
	}
	code, err := s.readReply()
	t1 := time.Now()
	s.scanID = false
	if err != nil {
		return outError, err
	}
	s.st.replies[code]++
	switch code / 100 {
	case 2:
		s.st.latency = append(s.st.latency, t1.Sub(t0))
		if s.r.wantID {
			s.accepted()
		}
		return outAccepted, nil
	case 4:
		return outTemp, closing(code)
	case 5:
		return outPerm, nil
	}
	return outError, protoErr("end of data", code)
}

// accepted records the queue ID and calls OnAccepted.
func (s *session) accepted() {
	r := s.r
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cfg.CollectIDs && s.id != "" {
		r.queueIDs = append(r.queueIDs, s.id)
	}
	if r.cfg.OnAccepted != nil {
		r.cfg.OnAccepted(s.id, s.raw)
	}
}

// readReply reads one complete, possibly multi-line reply and returns its
// code. The caller sets the deadline. Lines longer than the read buffer are
// tolerated (their tail is skipped).
func (s *session) readReply() (int, error) {
	code := -1
	s.id = ""
	for {
		line, err := s.br.ReadSlice('\n')
		complete := err == nil
		if err != nil && err != bufio.ErrBufferFull {
			return 0, err
		}
		if len(line) < 3 || !isDigit(line[0]) || !isDigit(line[1]) || !isDigit(line[2]) {
			return 0, fmt.Errorf("%w: malformed reply line %q", errProtocol, trimEOL(line))
		}
		c := int(line[0]-'0')*100 + int(line[1]-'0')*10 + int(line[2]-'0')
		if code >= 0 && c != code {
			return 0, fmt.Errorf("%w: reply code changed from %d to %d within a reply", errProtocol, code, c)
		}
		code = c
		rest := trimEOL(line[3:])
		more := false
		if len(rest) > 0 {
			switch rest[0] {
			case '-':
				more = true
			case ' ':
			default:
				return 0, fmt.Errorf("%w: malformed reply line %q", errProtocol, trimEOL(line))
			}
			rest = rest[1:]
		}
		if s.inEHLO && c == 250 {
			kw := rest
			if i := bytes.IndexByte(kw, ' '); i >= 0 {
				kw = kw[:i]
			}
			if bytes.EqualFold(kw, []byte("PIPELINING")) {
				s.pipelining = true
			}
		}
		if s.scanID && c/100 == 2 && s.id == "" {
			s.id = queueID(rest)
		}
		for !complete { // skip the tail of an overlong line
			_, err = s.br.ReadSlice('\n')
			complete = err == nil
			if err != nil && err != bufio.ErrBufferFull {
				return 0, err
			}
		}
		if !more {
			return code, nil
		}
	}
}

func isDigit(b byte) bool { return '0' <= b && b <= '9' }

func trimEOL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}

// queueID extracts the token after "queued as" (case-insensitive) in text,
// without surrounding <>, () or [] and a trailing period, comma or semicolon.
func queueID(text []byte) string {
	const key = "queued as "
	for i := 0; i+len(key) <= len(text); i++ {
		if text[i] != 'q' && text[i] != 'Q' {
			continue
		}
		if !bytes.EqualFold(text[i:i+len(key)], []byte(key)) {
			continue
		}
		tok := bytes.TrimLeft(text[i+len(key):], " ")
		if j := bytes.IndexAny(tok, " \t"); j >= 0 {
			tok = tok[:j]
		}
		tok = bytes.TrimRight(tok, ".,;")
		tok = bytes.Trim(tok, "<>()[]")
		return string(tok)
	}
	return ""
}

// appendDotStuffed appends msg to dst in DATA wire form: every line that
// starts with "." gets another "." (RFC 5321 §4.5.2), a final CRLF is added
// if msg does not end with one, and the terminating ".\r\n" follows. msg is
// expected to use CRLF line endings.
func appendDotStuffed(dst, msg []byte) []byte {
	for len(msg) > 0 {
		if msg[0] == '.' {
			dst = append(dst, '.')
		}
		i := bytes.IndexByte(msg, '\n')
		if i < 0 {
			dst = append(dst, msg...)
			dst = append(dst, '\r', '\n')
			break
		}
		dst = append(dst, msg[:i+1]...)
		msg = msg[i+1:]
	}
	return append(dst, '.', '\r', '\n')
}

// generator builds the deterministic messages of a run. The body text comes
// from a pool of pre-generated lines (built once from Seed) starting at a
// line picked per message, so building a message is mostly copying.
type generator struct {
	seed     int64
	from     string
	domains  []string
	rcpts    int
	size     int
	dist     []SizeWeight
	totalW   uint64
	pool     []byte // CRLF-terminated lines
	starts   []int  // offsets of the lines a body may start at
	seedText []byte // seed in hex, for Message-ID
}

const (
	poolSpread = 64 << 10 // bodies start within the first poolSpread bytes
	printable  = "!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~"
)

func newGenerator(cfg *LoadConfig) *generator {
	g := &generator{
		seed:    cfg.Seed,
		from:    cfg.From,
		domains: cfg.Domains,
		rcpts:   cfg.RecipientsPerMessage,
		size:    cfg.Size,
	}
	maxSize := cfg.Size
	for _, sw := range cfg.SizeDist {
		if sw.Weight > 0 {
			g.dist = append(g.dist, sw)
			g.totalW += uint64(sw.Weight)
			maxSize = max(maxSize, sw.Size)
		}
	}
	g.seedText = strconv.AppendUint(nil, uint64(cfg.Seed), 16)
	g.pool, g.starts = buildPool(uint64(cfg.Seed), poolSpread+maxSize+2*(maxLineLen+2))
	return g
}

// splitmix64 step: a tiny, good-enough deterministic generator.
func splitmix(x *uint64) uint64 {
	*x += 0x9e3779b97f4a7c15
	z := *x
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// buildPool generates at least n bytes of body lines: printable ASCII of at
// most maxLineLen characters, no leading or trailing space, CRLF endings,
// including some empty lines, lines starting with "." and lines that are
// only dots.
func buildPool(seed uint64, n int) (pool []byte, starts []int) {
	st := seed ^ 0x5deece66d1234567
	pool = make([]byte, 0, n+maxLineLen+2)
	for len(pool) < n {
		if len(pool) < poolSpread {
			starts = append(starts, len(pool))
		}
		r := splitmix(&st)
		switch {
		case r%97 == 0:
			pool = append(pool, '.')
		case r%89 == 0:
			pool = append(pool, '.', '.')
		case r%53 == 0:
			// empty line
		default:
			length := 20 + int((r>>8)%(maxLineLen-20+1))
			lead := (r>>20)%11 == 0
			var bits uint64
			for i := range length {
				if i%8 == 0 {
					bits = splitmix(&st)
				}
				b := byte(bits)
				bits >>= 8
				c := printable[int(b)%len(printable)]
				switch {
				case i == 0 && lead:
					c = '.'
				case i > 0 && i < length-1 && b%7 == 0:
					c = ' '
				}
				pool = append(pool, c)
			}
		}
		pool = append(pool, '\r', '\n')
	}
	return pool, starts
}

// mix gives the per-message random state.
func (g *generator) mix(seq int) uint64 {
	st := uint64(g.seed) ^ (uint64(seq)+1)*0xd1b54a32d192ed03
	splitmix(&st)
	return st
}

// msgSize picks the size of message seq.
func (g *generator) msgSize(st *uint64) int {
	if len(g.dist) == 0 {
		return g.size
	}
	x := splitmix(st) % g.totalW
	for _, sw := range g.dist {
		if x < uint64(sw.Weight) {
			return sw.Size
		}
		x -= uint64(sw.Weight)
	}
	return g.dist[len(g.dist)-1].Size // unreachable
}

// appendRcpt appends recipient j of message seq.
func (g *generator) appendRcpt(b []byte, seq, j int) []byte {
	b = append(b, "user"...)
	b = strconv.AppendInt(b, int64(j+1), 10)
	b = append(b, '@')
	return append(b, g.domains[seq%len(g.domains)]...)
}

// rcptLen is the length of recipient j of message seq.
func (g *generator) rcptLen(seq, j int) int {
	n := len("user@") + len(g.domains[seq%len(g.domains)])
	for k := j + 1; k > 0; k /= 10 {
		n++
	}
	return n
}

// build appends message seq (headers and body, CRLF line endings, ending in
// CRLF, not dot-stuffed) to dst. A long To: header is folded. Its size is the configured size unless the
// headers alone exceed it (then the body is one short line) or the last body
// line would be shorter than one character (then it is 1 or 2 bytes short).
func (g *generator) build(dst []byte, seq int) []byte {
	st := g.mix(seq)
	size := g.msgSize(&st)
	start := len(dst)
	dst = append(dst, "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nFrom: "...)
	dst = append(dst, g.from...)
	dst = append(dst, "\r\nTo: "...)
	lineStart := len(dst) - len("To: ")
	for j := range g.rcpts {
		if j > 0 {
			// Fold before a recipient that would not fit in the line.
			if len(dst)-lineStart+len(", ")+g.rcptLen(seq, j) > maxLineLen {
				dst = append(dst, ",\r\n "...)
				lineStart = len(dst) - 1
			} else {
				dst = append(dst, ", "...)
			}
		}
		dst = g.appendRcpt(dst, seq, j)
	}
	dst = append(dst, "\r\nSubject: bench message "...)
	dst = strconv.AppendInt(dst, int64(seq), 10)
	dst = append(dst, "\r\nMessage-ID: <"...)
	dst = strconv.AppendInt(dst, int64(seq), 10)
	dst = append(dst, '.')
	dst = append(dst, g.seedText...)
	dst = append(dst, "@loadgen.bench.test>\r\nX-Load-Seq: "...)
	dst = strconv.AppendInt(dst, int64(seq), 10)
	dst = append(dst, "\r\n\r\n"...)

	remaining := max(size-(len(dst)-start), 3)
	p := g.pool[g.starts[splitmix(&st)%uint64(len(g.starts))]:]
	for remaining > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 || i+1 > remaining { // i < 0 cannot happen: the pool is long enough
			break
		}
		dst = append(dst, p[:i+1]...)
		remaining -= i + 1
		p = p[i+1:]
	}
	if remaining >= 3 && remaining-2 <= len(p) {
		// A prefix of the next line, which is longer than remaining-2.
		dst = append(dst, p[:remaining-2]...)
		if dst[len(dst)-1] == ' ' {
			dst[len(dst)-1] = '~'
		}
		dst = append(dst, '\r', '\n')
	}
	return dst
}
