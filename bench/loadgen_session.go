package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"time"
)

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
	bw       *bufio.Writer // message content only; commands are written directly
	stopConn func() bool   // unregisters the close-on-cancel hook
	onConn   int           // messages finished on the current connection

	deadline time.Time // current deadline of conn

	fails   int   // consecutive connection-level failures
	lastErr error // the latest of them
	gaveUp  bool

	// Reply parsing side channels, set by readReply.
	inEHLO     bool   // look for the PIPELINING keyword
	pipelining bool   // the server advertised PIPELINING
	scanID     bool   // look for "queued as <ID>" in a 2xx reply
	id         string // queue ID found by the last readReply

	msg message // the current message, as segments
	raw []byte  // the current message in one piece, only built for OnAccepted
	cmd []byte  // command buffer

	st sessionStats
}

func newSession(r *runner) *session {
	cfg := &r.cfg
	headCap := 256 + cfg.RecipientsPerMessage*(len("user, @")+8+maxDomainLen(cfg.Domains))
	return &session{
		r:   r,
		cfg: cfg,
		br:  bufio.NewReaderSize(nil, 4096),
		bw:  bufio.NewWriterSize(nil, contentBufSize),
		msg: message{
			head: make([]byte, 0, headCap),
			tail: make([]byte, 0, maxLineLen+2),
		},
		cmd: make([]byte, 0, 512),
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
	s.bw.Reset(c)
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
	s.msg.head = s.msg.head[:0]
	s.r.gen.compose(&s.msg, seq)
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
// end-of-data reply and accounts for it. The message is stuffed on the fly
// into s.bw, so no copy of it is made.
func (s *session) content() (outcome, error) {
	d := dotWriter{w: s.bw}
	n := s.msg.len()
	timed := 0 // where the timed part of the message starts
	s.arm()
	if n > splitWriteOver {
		timed = n - splitTail
		d.writeRange(&s.msg, 0, timed)
		if err := s.bw.Flush(); err != nil {
			return outError, err
		}
	}
	s.scanID = s.r.wantID
	t0 := time.Now()
	d.writeRange(&s.msg, timed, n)
	if err := d.end(); err != nil {
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
		s.raw = s.msg.appendTo(slices.Grow(s.raw[:0], s.msg.len()))
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

// dotWriter writes message content in DATA wire form to w: every line that
// starts with "." gets another "." (RFC 5321 §4.5.2). Content may be written
// in pieces split anywhere. Write errors are left in w (bufio.Writer keeps
// the first one) and reported by end.
type dotWriter struct {
	w   *bufio.Writer
	mid bool // the last byte written was not a '\n': not at a line start
}

var nlDot = []byte("\n.")

// write writes b, dot-stuffed.
func (d *dotWriter) write(b []byte) {
	for len(b) > 0 {
		if !d.mid && b[0] == '.' {
			d.w.WriteByte('.')
		}
		i := bytes.Index(b, nlDot) // the end of the line before the next "." line
		if i < 0 {
			d.w.Write(b)
			d.mid = b[len(b)-1] != '\n'
			return
		}
		d.w.Write(b[:i+1])
		d.mid = false
		b = b[i+1:]
	}
}

// writeRange writes bytes [from, to) of m, dot-stuffed.
func (d *dotWriter) writeRange(m *message, from, to int) {
	for _, seg := range [...][]byte{m.head, m.body, m.tail} {
		lo, hi := min(max(from, 0), len(seg)), min(max(to, 0), len(seg))
		if lo < hi {
			d.write(seg[lo:hi])
		}
		from -= len(seg)
		to -= len(seg)
	}
}

// end adds a CRLF if the content did not end with one, writes the
// terminating ".\r\n" and flushes.
func (d *dotWriter) end() error {
	if d.mid {
		d.w.WriteString("\r\n")
	}
	d.w.WriteString(".\r\n")
	d.mid = false
	return d.w.Flush()
}
