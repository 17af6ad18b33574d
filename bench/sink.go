package bench

import (
	"bufio"
	"cmp"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Faults are the fault injection settings of a Sink. Each rate is a
// probability in [0,1]; the temporary and permanent rates of one stage
// together must not exceed 1. The zero value injects nothing.
type Faults struct {
	MailTempFail float64 // reply to MAIL with 451 4.3.0
	MailPermFail float64 // reply to MAIL with 550 5.7.1
	RcptTempFail float64 // reply to a RCPT with 452 4.2.2
	RcptPermFail float64 // reply to a RCPT with 550 5.1.1
	DataTempFail float64 // reply to the final "." with 451 4.3.0
	DataPermFail float64 // reply to the final "." with 554 5.6.0
	// DropInData closes the connection, without a reply, after reading the
	// first part of a message's content.
	DropInData float64
	// Latency is added before each write of replies: before every reply of
	// a client that waits for each one, and once per pipelined group of
	// replies (so it models a round-trip time, as a distant receiver).
	Latency time.Duration
}

func (f Faults) validate() error {
	stages := []struct {
		name       string
		temp, perm float64
	}{
		{"Mail", f.MailTempFail, f.MailPermFail},
		{"Rcpt", f.RcptTempFail, f.RcptPermFail},
		{"Data", f.DataTempFail, f.DataPermFail},
		{"DropInData", f.DropInData, 0},
	}
	for _, st := range stages {
		if !(st.temp >= 0 && st.temp <= 1 && st.perm >= 0 && st.perm <= 1 && st.temp+st.perm <= 1) {
			return fmt.Errorf("bench: invalid %s fault rates %v/%v: want probabilities with a sum <= 1", st.name, st.temp, st.perm)
		}
	}
	if f.Latency < 0 {
		return fmt.Errorf("bench: invalid Latency %v", f.Latency)
	}
	return nil
}

// SinkConfig configures a Sink. The zero value is a fault-free sink on
// 127.0.0.1 with a random port.
type SinkConfig struct {
	Addr     string // listen address, loopback only; default "127.0.0.1:0"
	Hostname string // name in the banner and EHLO reply; default "sink.test"
	// Seed makes fault injection deterministic: connection n draws from
	// its own random stream derived from Seed and n, one draw per MAIL, per
	// RCPT, per DATA (drop) and per end of data, whatever the rates.
	Seed int64
	Faults
	// MaxConns limits concurrent connections; past it a connection is
	// greeted with "421 4.7.0 Too many connections" and closed. 0 = no limit.
	MaxConns int
	// ReplyStyle selects the texts of injected failures: "" (generic) or
	// "gmail", "outlook", "yahoo" for provider-like replies (multi-line,
	// other enhanced codes, and 421 + close where those providers do that).
	// The reply class (4xx or 5xx) of each fault never changes.
	ReplyStyle string
	// NoPipelining stops the sink from advertising PIPELINING (pipelined
	// input is still handled).
	NoPipelining bool
	// Chunking makes the sink advertise and accept BDAT (RFC 3030), as
	// the big providers do.
	Chunking bool
	// No8BitMIME stops the sink from advertising 8BITMIME, like an old
	// server that only takes 7-bit messages.
	No8BitMIME bool
	// NoDSN stops the sink from advertising DSN (RFC 3461).
	NoDSN bool
	// RcptReplies answers RCPT for the given addresses (lower case) with
	// the given reply line, e.g. "550 5.1.1 User unknown", instead of 250.
	RcptReplies map[string]string
	// MaxRcpts is the recipients one transaction takes (default 1000);
	// RCPTs past it get TooManyRcptsReply (default "452 4.5.3 Error: too
	// many recipients").
	MaxRcpts          int
	TooManyRcptsReply string
	// Keep stores every accepted message (see Messages).
	Keep bool
	// Down starts the sink down: see SetDown.
	Down bool
}

// SinkStats are a Sink's counters since it started.
type SinkStats struct {
	Connections        int64 // connections served (not refused)
	ConnectionsRefused int64 // connections refused with 421 because of MaxConns or Down
	Messages           int64 // messages accepted (250 at end of data)
	Recipients         int64 // recipients accepted in accepted messages
	Bytes              int64 // bytes of accepted messages, dot-stuffing undone
	TempFails          int64 // injected 4xx replies
	PermFails          int64 // injected 5xx replies
	Drops              int64 // injected connection drops in DATA
	MaxMessagesPerConn int64 // most messages accepted on one connection
	Resets             int64 // RSET commands
	// CommandsAfterData counts the ends of message data (DATA's ".") that
	// already had the client's next commands behind them in the same read:
	// a client that begins its next transaction without waiting for the
	// reply to "." (RFC 2920 §3.1).
	CommandsAfterData int64
}

// SinkMessage is one accepted message.
type SinkMessage struct {
	From     string   // reverse path, without <>
	To       []string // accepted forward paths, without <>
	Data     []byte   // content with dot-stuffing undone, ending in CRLF (empty for an empty message)
	ConnID   int64    // connection number, from 1 in accept order
	Received time.Time
}

// Sink is a fast SMTP receiver on loopback, the destination of an MTA under
// test. It keeps no message content unless SinkConfig.Keep or OnMessage
// asks for it.
type Sink struct {
	cfg          SinkConfig
	maxRcpts     int    // per transaction
	tooManyRcpts string // the reply past it, with CRLF
	ln           net.Listener
	replies      *sinkReplies
	greeting     string
	ehlo         string
	helo         string
	wrap         func(net.Conn) net.Conn // test hook: wraps accepted connections

	faults atomic.Pointer[Faults]
	down   atomic.Bool
	onMsg  atomic.Pointer[func(SinkMessage)]

	done      chan struct{}
	closeOnce sync.Once
	closeErr  error
	wg        sync.WaitGroup

	mu     sync.Mutex // guards conns, closed, msgs
	conns  map[net.Conn]struct{}
	closed bool
	msgs   []SinkMessage

	active atomic.Int64 // connections being served
	nextID atomic.Int64

	connections, refused, messages, recipients, bytes atomic.Int64
	tempFails, permFails, drops, maxPerConn           atomic.Int64
	resets, commandsAfterData                         atomic.Int64
}

const (
	sinkMaxSize     = 52428800 // advertised SIZE
	sinkMaxRcpts    = 1000
	sinkIdleTimeout = 5 * time.Minute
	sinkLingerTime  = time.Second // how long to wait for the client's close after a 421
	sinkReadBuf     = 32 << 10
	sinkWriteBuf    = 4 << 10
)

var (
	errSinkDrop   = errors.New("bench: sink dropped the connection in DATA")
	errSinkClosed = errors.New("bench: sink closed")
)

// StartSink starts a sink and returns once it is listening.
func StartSink(cfg SinkConfig) (*Sink, error) { return startSink(cfg, nil) }

func startSink(cfg SinkConfig, wrap func(net.Conn) net.Conn) (*Sink, error) {
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:0"
	}
	if cfg.Hostname == "" {
		cfg.Hostname = "sink.test"
	}
	if strings.ContainsAny(cfg.Hostname, " \t\r\n") {
		return nil, fmt.Errorf("bench: invalid sink Hostname %q", cfg.Hostname)
	}
	if err := cfg.Faults.validate(); err != nil {
		return nil, err
	}
	if cfg.MaxConns < 0 {
		return nil, fmt.Errorf("bench: invalid MaxConns %d", cfg.MaxConns)
	}
	if cfg.MaxRcpts < 0 || cfg.MaxRcpts > sinkMaxRcpts {
		return nil, fmt.Errorf("bench: invalid MaxRcpts %d (0 to %d)", cfg.MaxRcpts, sinkMaxRcpts)
	}
	if strings.ContainsAny(cfg.TooManyRcptsReply, "\r\n") {
		return nil, fmt.Errorf("bench: invalid TooManyRcptsReply %q", cfg.TooManyRcptsReply)
	}
	replies, ok := sinkReplyStyles[strings.ToLower(cfg.ReplyStyle)]
	if !ok {
		return nil, fmt.Errorf("bench: unknown ReplyStyle %q (want \"\", gmail, outlook or yahoo)", cfg.ReplyStyle)
	}
	if err := checkLoopback(cfg.Addr); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, err
	}
	if ta, ok := ln.Addr().(*net.TCPAddr); !ok || !ta.IP.IsLoopback() {
		ln.Close()
		return nil, fmt.Errorf("%w: sink bound to %v", ErrNotLoopback, ln.Addr())
	}
	s := &Sink{
		cfg:          cfg,
		maxRcpts:     cmp.Or(cfg.MaxRcpts, sinkMaxRcpts),
		tooManyRcpts: cmp.Or(cfg.TooManyRcptsReply, "452 4.5.3 Error: too many recipients") + "\r\n",
		ln:           ln,
		replies:      replies,
		greeting:     "220 " + cfg.Hostname + " ESMTP bench sink\r\n",
		helo:         "250 " + cfg.Hostname + "\r\n",
		wrap:         wrap,
		done:         make(chan struct{}),
		conns:        make(map[net.Conn]struct{}),
	}
	var b strings.Builder
	b.WriteString("250-" + cfg.Hostname + "\r\n")
	if cfg.Chunking {
		b.WriteString("250-CHUNKING\r\n")
	}
	if !cfg.NoPipelining {
		b.WriteString("250-PIPELINING\r\n")
	}
	b.WriteString("250-SIZE " + strconv.Itoa(sinkMaxSize) + "\r\n")
	if !cfg.No8BitMIME {
		b.WriteString("250-8BITMIME\r\n")
	}
	if cfg.NoDSN {
		b.WriteString("250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n")
	} else {
		b.WriteString("250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250 DSN\r\n")
	}
	s.ehlo = b.String()
	f := cfg.Faults
	s.faults.Store(&f)
	s.down.Store(cfg.Down)
	s.wg.Add(1)
	go s.acceptLoop()
	return s, nil
}

// Addr returns the address the sink listens on, "127.0.0.1:port".
func (s *Sink) Addr() string { return s.ln.Addr().String() }

// Close stops the sink: it closes the listener and every connection and
// waits for the connection goroutines (including OnMessage callbacks).
func (s *Sink) Close() error {
	s.closeOnce.Do(func() {
		close(s.done)
		s.closeErr = s.ln.Close()
		s.mu.Lock()
		s.closed = true
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
	return s.closeErr
}

// SetDown makes the sink down (every new connection is greeted with
// "421 4.3.2" and closed, and open connections get that reply to their
// next command) or up again.
func (s *Sink) SetDown(down bool) { s.down.Store(down) }

// SetFaults changes the fault rates and latency for the events that follow.
// It panics if a rate is invalid (see Faults).
func (s *Sink) SetFaults(f Faults) {
	if err := f.validate(); err != nil {
		panic(err)
	}
	s.faults.Store(&f)
}

// OnMessage sets (or, with nil, removes) a callback called for every
// accepted message, from the connection's goroutine, before the 250 reply
// is sent. Without Keep, m.Data is reused after the call: copy it to keep it.
func (s *Sink) OnMessage(fn func(m SinkMessage)) {
	if fn == nil {
		s.onMsg.Store(nil)
		return
	}
	s.onMsg.Store(&fn)
}

// Messages returns the accepted messages in acceptance order (only with
// SinkConfig.Keep). The messages are shared: do not modify them.
func (s *Sink) Messages() []SinkMessage {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.msgs)
}

// Stats returns the counters. They are read one by one, so a snapshot taken
// while messages flow may be slightly inconsistent.
func (s *Sink) Stats() SinkStats {
	return SinkStats{
		Connections:        s.connections.Load(),
		ConnectionsRefused: s.refused.Load(),
		Messages:           s.messages.Load(),
		Recipients:         s.recipients.Load(),
		Bytes:              s.bytes.Load(),
		TempFails:          s.tempFails.Load(),
		PermFails:          s.permFails.Load(),
		Drops:              s.drops.Load(),
		MaxMessagesPerConn: s.maxPerConn.Load(),
		Resets:             s.resets.Load(),
		CommandsAfterData:  s.commandsAfterData.Load(),
	}
}

func (s *Sink) acceptLoop() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			select {
			case <-s.done:
				return
			default:
			}
			if !s.sleep(5 * time.Millisecond) { // e.g. out of file descriptors
				return
			}
			continue
		}
		if s.wrap != nil {
			c = s.wrap(c)
		}
		if !s.track(c) {
			c.Close()
			return
		}
		id := s.nextID.Add(1)
		var refusal string
		switch {
		case s.down.Load():
			refusal = s.replies.down
		case s.cfg.MaxConns > 0 && s.active.Load() >= int64(s.cfg.MaxConns):
			refusal = s.replies.busy
		}
		s.wg.Add(1)
		if refusal != "" {
			s.refused.Add(1)
			go s.refuse(c, refusal)
			continue
		}
		s.active.Add(1)
		s.connections.Add(1)
		go s.serveConn(c, id)
	}
}

func (s *Sink) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Sink) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	c.Close()
}

// sleep waits d, or less if the sink is closed; it reports whether the sink
// is still open.
func (s *Sink) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-s.done:
		return false
	}
}

func (s *Sink) refuse(c net.Conn, reply string) {
	defer s.wg.Done()
	defer s.untrack(c)
	if d := s.faults.Load().Latency; d > 0 && !s.sleep(d) {
		return
	}
	c.SetDeadline(time.Now().Add(sinkLingerTime))
	if _, err := io.WriteString(c, sinkWithIP(reply, c)); err == nil {
		sinkLinger(c)
	}
}

// withIP fills in the client's address in provider-style texts.
func sinkWithIP(reply string, c net.Conn) string {
	if !strings.Contains(reply, "{ip}") {
		return reply
	}
	ip := c.RemoteAddr().String()
	if host, _, err := net.SplitHostPort(ip); err == nil {
		ip = host
	}
	return strings.ReplaceAll(reply, "{ip}", ip)
}

// linger half-closes c after a final reply and waits briefly for the client
// to close, so that the reply is not lost to a reset caused by unread input.
func sinkLinger(c net.Conn) {
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok || cw.CloseWrite() != nil {
		return
	}
	c.SetReadDeadline(time.Now().Add(sinkLingerTime))
	var buf [512]byte
	for {
		if _, err := c.Read(buf[:]); err != nil {
			return
		}
	}
}

var (
	sinkReaders = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, sinkReadBuf) }}
	sinkWriters = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, sinkWriteBuf) }}
)

func (s *Sink) serveConn(nc net.Conn, id int64) {
	defer s.wg.Done()
	defer s.active.Add(-1)
	defer s.untrack(nc)
	c := &sinkConn{
		s:   s,
		nc:  nc,
		br:  sinkReaders.Get().(*bufio.Reader),
		bw:  sinkWriters.Get().(*bufio.Writer),
		id:  id,
		rng: sinkMix64(uint64(s.cfg.Seed) ^ sinkMix64(uint64(id))),
	}
	c.br.Reset(nc)
	c.bw.Reset(nc)
	if c.serve() {
		sinkLinger(nc)
	}
	c.br.Reset(nil)
	c.bw.Reset(nil)
	sinkReaders.Put(c.br)
	sinkWriters.Put(c.bw)
}
