package pop3d

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Limits on what a client sends.
const (
	maxLine        = 512 // octets of a command line with its CRLF (RFC 2449 §4 allows 255 for commands)
	maxBadCommands = 10  // unknown or misplaced commands before the session is closed
	maxAuthTries   = 3   // failed logins in one session before it is closed
)

// session states (RFC 1939 §3).
const (
	authorization = iota
	transaction
)

type session struct {
	srv   *Server
	conn  net.Conn // the TLS conn after STLS
	raw   net.Conn
	ip    netip.Addr
	r     *bufio.Reader
	w     *bufio.Writer
	isTLS bool

	state    int
	user     string // USER given, or logged in
	msgs     []Message
	deleted  []bool
	bad      int
	failures int
	stopping atomic.Bool
	loginBy  time.Time // the end of the login timeout, from the connect
}

func newSession(s *Server, c net.Conn, ip netip.Addr) *session {
	sess := &session{srv: s, conn: c, raw: c, ip: ip, loginBy: time.Now().Add(s.opts.LoginTimeout)}
	if s.opts.ImplicitTLS && s.opts.TLS != nil {
		sess.conn = tls.Server(c, s.opts.TLS)
		sess.isTLS = true
	}
	sess.r = bufio.NewReaderSize(sess.conn, 4096)
	sess.w = bufio.NewWriterSize(sess.conn, 16<<10)
	return sess
}

// stop asks the session to end before its next command.
func (s *session) stop() {
	s.stopping.Store(true)
	s.raw.SetReadDeadline(time.Now())
}

func (s *session) run() {
	defer func() {
		if r := recover(); r != nil {
			s.srv.log.Error("panic in a POP3 session", zap.Any("panic", r), zap.String("client_ip", s.ip.String()))
			s.reply("-ERR [SYS/TEMP] internal error")
		}
		if s.state == transaction {
			s.srv.unlock(s.user)
		}
		s.raw.SetWriteDeadline(time.Now().Add(10 * time.Second)) // the last reply gets its own time
		s.w.Flush()
		s.conn.Close()
	}()
	if tc, ok := s.conn.(*tls.Conn); ok {
		// Implicit TLS: the handshake gets a deadline of its own, or a
		// client that connects and says nothing would hold its slot.
		s.raw.SetDeadline(time.Now().Add(min(s.srv.opts.IdleTimeout, time.Minute)))
		if err := tc.Handshake(); err != nil {
			return
		}
		s.raw.SetDeadline(time.Time{})
	}
	s.reply("+OK " + s.srv.opts.Hostname + " POP3 server ready")
	for {
		if err := s.flushIfIdle(); err != nil {
			return
		}
		if s.stopping.Load() {
			s.reply("-ERR [SYS/TEMP] server shutting down")
			return
		}
		deadline := time.Now().Add(s.srv.opts.IdleTimeout)
		if s.state == authorization {
			deadline = s.loginBy // counted from the connect: commands do not put it off
		}
		s.raw.SetReadDeadline(deadline)
		line, err := s.readLine()
		if s.stopping.Load() {
			s.reply("-ERR [SYS/TEMP] server shutting down")
			return
		}
		if errors.Is(err, errLineTooLong) {
			s.reply("-ERR line too long")
			return
		}
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				s.reply("-ERR idle for too long, closing")
			}
			return // a dropped connection deletes nothing
		}
		verb, arg, _ := strings.Cut(line, " ")
		if quit := s.command(strings.ToUpper(verb), arg); quit {
			return
		}
		if s.bad >= maxBadCommands {
			s.reply("-ERR too many bad commands, closing")
			return
		}
	}
}

var errLineTooLong = errors.New("line too long")

// readLine reads one CRLF (or LF) terminated line without its ending.
func (s *session) readLine() (string, error) {
	line, err := s.r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) || len(line) > maxLine {
		return "", errLineTooLong
	}
	if err != nil {
		return "", err
	}
	line = bytes.TrimRight(line, "\r\n")
	return string(line), nil
}

// flushIfIdle writes the buffered replies unless more pipelined commands
// are already waiting (RFC 2449 PIPELINING).
func (s *session) flushIfIdle() error {
	if s.r.Buffered() > 0 {
		return nil
	}
	return s.flush()
}

func (s *session) flush() error {
	s.raw.SetWriteDeadline(time.Now().Add(s.srv.opts.IdleTimeout))
	return s.w.Flush()
}

func (s *session) reply(text string) {
	s.w.WriteString(text)
	s.w.WriteString("\r\n")
}

func (s *session) badCommand(text string) {
	s.bad++
	s.reply("-ERR " + text)
}

// command runs one command and reports whether the session ends.
func (s *session) command(verb, arg string) bool {
	switch verb {
	case "QUIT":
		return s.quit()
	case "CAPA":
		s.capa()
		return false
	case "NOOP":
		if s.state == transaction {
			s.reply("+OK")
			return false
		}
	}
	if s.state == authorization {
		switch verb {
		case "USER":
			s.userCmd(arg)
		case "PASS":
			return s.pass(arg)
		case "AUTH":
			return s.auth(arg)
		case "STLS":
			return s.stls()
		case "APOP":
			s.badCommand("APOP not supported: use USER/PASS or AUTH PLAIN over TLS")
		default:
			s.badCommand("command not valid before login")
		}
		return false
	}
	switch verb {
	case "STAT":
		n, size := 0, int64(0)
		for i, m := range s.msgs {
			if !s.deleted[i] {
				n++
				size += m.Size
			}
		}
		s.reply(fmt.Sprintf("+OK %d %d", n, size))
	case "LIST", "UIDL":
		s.list(verb, arg)
	case "RETR":
		if i, ok := s.message(arg); ok {
			s.send(i, -1)
		}
	case "TOP":
		n, lines, ok := strings.Cut(arg, " ")
		count, err := strconv.Atoi(lines)
		if !ok || err != nil || count < 0 {
			s.badCommand("usage: TOP msg lines")
			return false
		}
		if i, ok := s.message(n); ok {
			s.send(i, count)
		}
	case "DELE":
		if i, ok := s.message(arg); ok {
			s.deleted[i] = true
			s.reply(fmt.Sprintf("+OK message %d deleted", i+1))
		}
	case "RSET":
		for i := range s.deleted {
			s.deleted[i] = false
		}
		s.reply(fmt.Sprintf("+OK %d messages", len(s.msgs)))
	default:
		s.badCommand("unknown command")
	}
	return false
}

func (s *session) capa() {
	s.reply("+OK capability list follows")
	for _, c := range []string{"TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "EXPIRE NEVER", "IMPLEMENTATION mta"} {
		s.reply(c)
	}
	if s.state == authorization && s.loginAllowed() {
		s.reply("USER")
		s.reply("SASL PLAIN")
	}
	if s.state == authorization && !s.isTLS && s.srv.opts.TLS != nil {
		s.reply("STLS")
	}
	s.reply(".")
}

// loginAllowed reports whether a password may be sent on this connection:
// over TLS, or from loopback when the configuration allows it.
func (s *session) loginAllowed() bool {
	return s.isTLS || s.srv.opts.CleartextFromLoopback && s.ip.IsLoopback()
}

const replyNeedTLS = "-ERR [AUTH] cleartext login is not allowed here: use STLS (or the POP3S port) first"

func (s *session) userCmd(arg string) {
	if !s.loginAllowed() {
		s.bad++
		s.reply(replyNeedTLS)
		return
	}
	if arg == "" || len(arg) > 64 {
		s.badCommand("usage: USER name")
		return
	}
	s.user = arg
	s.reply("+OK send PASS")
}

func (s *session) pass(arg string) bool {
	if !s.loginAllowed() {
		s.bad++
		s.reply(replyNeedTLS)
		return false
	}
	if s.user == "" {
		s.badCommand("USER first")
		return false
	}
	user := s.user
	s.user = ""
	return s.login(user, arg)
}

// auth runs AUTH PLAIN (RFC 5034), or lists the mechanisms without an
// argument (RFC 1734 clients ask that way).
func (s *session) auth(arg string) bool {
	mech, initial, _ := strings.Cut(arg, " ")
	if mech == "" {
		s.reply("+OK mechanisms follow")
		s.reply("PLAIN")
		s.reply(".")
		return false
	}
	if !strings.EqualFold(mech, "PLAIN") {
		s.badCommand("unsupported mechanism: use PLAIN")
		return false
	}
	if !s.loginAllowed() {
		s.bad++
		s.reply(replyNeedTLS)
		return false
	}
	if initial == "" {
		s.reply("+ ")
		if s.flush() != nil {
			return true
		}
		line, err := s.readLine()
		if err != nil {
			return true
		}
		if line == "*" {
			s.reply("-ERR authentication cancelled")
			return false
		}
		initial = line
	}
	if initial == "=" {
		initial = ""
	}
	dec, err := base64.StdEncoding.DecodeString(initial)
	parts := strings.Split(string(dec), "\x00")
	if err != nil || len(parts) != 3 || parts[1] == "" {
		s.badCommand("malformed PLAIN response")
		return false
	}
	if parts[0] != "" && parts[0] != parts[1] {
		s.failLogin(parts[1], "authorization identity differs")
		return s.failures >= maxAuthTries
	}
	return s.login(parts[1], parts[2])
}

// login checks a password and opens the mailbox. It reports whether the
// session must end (too many failures).
func (s *session) login(user, password string) bool {
	f := s.srv.opts.Failures
	if f != nil && f.IsBlocked(s.ip) {
		s.srv.opts.Metrics.logins.WithLabelValues(s.srv.opts.Name, "blocked").Inc()
		s.srv.log.Info("pop3 login refused: too many failures from this address", zap.String("client_ip", s.ip.String()))
		s.reply("-ERR [LOGIN-DELAY] too many failed logins from your address; try again later")
		return true
	}
	if !s.srv.opts.Backend.Authenticate(user, password) {
		s.failLogin(user, "wrong user name or password")
		return s.failures >= maxAuthTries
	}
	if !s.srv.lock(user) {
		s.srv.opts.Metrics.logins.WithLabelValues(s.srv.opts.Name, "in_use").Inc()
		s.logLogin(user, "in_use")
		s.reply("-ERR [IN-USE] mailbox in use by another session")
		return false
	}
	msgs, err := s.srv.opts.Backend.List(user)
	if err != nil {
		s.srv.unlock(user)
		s.srv.log.Error("pop3: listing a mailbox", zap.String("user", user), zap.Error(err))
		s.reply("-ERR [SYS/TEMP] mailbox unavailable, try again later")
		return false
	}
	s.state, s.user, s.msgs, s.deleted = transaction, user, msgs, make([]bool, len(msgs))
	s.srv.opts.Metrics.logins.WithLabelValues(s.srv.opts.Name, "success").Inc()
	s.logLogin(user, "success")
	var size int64
	for _, m := range msgs {
		size += m.Size
	}
	s.reply(fmt.Sprintf("+OK %s has %d messages (%d octets)", user, len(msgs), size))
	return false
}

func (s *session) failLogin(user, why string) {
	s.failures++
	s.srv.opts.Metrics.logins.WithLabelValues(s.srv.opts.Name, "failure").Inc()
	s.logLogin(user, "failure")
	if f := s.srv.opts.Failures; f != nil {
		f.Fail(s.ip)
	}
	s.flush()
	time.Sleep(s.srv.opts.FailureDelay) // slows password guessing
	s.reply("-ERR [AUTH] " + why)
}

func (s *session) logLogin(user, result string) {
	s.srv.log.Info("pop3 login", zap.String("user", sanitize(user)), zap.String("client_ip", s.ip.String()),
		zap.String("result", result), zap.Bool("tls", s.isTLS))
}

// stls starts TLS (RFC 2595 §4). Whatever the client sent after the
// command in the clear is thrown away: it cannot become a command inside
// the TLS session.
func (s *session) stls() bool {
	if s.isTLS || s.srv.opts.TLS == nil {
		s.badCommand("STLS not available")
		return false
	}
	s.reply("+OK begin TLS negotiation")
	if s.flush() != nil {
		return true
	}
	tc := tls.Server(s.raw, s.srv.opts.TLS)
	s.raw.SetDeadline(time.Now().Add(time.Minute))
	if err := tc.Handshake(); err != nil {
		s.srv.log.Debug("pop3 TLS handshake failed", zap.String("client_ip", s.ip.String()), zap.Error(err))
		return true
	}
	s.raw.SetDeadline(time.Time{})
	s.conn, s.isTLS, s.user = tc, true, ""
	s.r = bufio.NewReaderSize(tc, 4096) // the old reader's plaintext is dropped with it
	s.w = bufio.NewWriterSize(tc, 16<<10)
	return false
}

// message parses a message number argument; on failure it has replied.
func (s *session) message(arg string) (int, bool) {
	n, err := strconv.Atoi(strings.TrimSpace(arg))
	if err != nil || n < 1 || n > len(s.msgs) || s.deleted[n-1] {
		s.reply("-ERR no such message")
		return 0, false
	}
	return n - 1, true
}

func (s *session) list(verb, arg string) {
	line := func(i int) string {
		if verb == "UIDL" {
			return fmt.Sprintf("%d %s", i+1, s.msgs[i].UID)
		}
		return fmt.Sprintf("%d %d", i+1, s.msgs[i].Size)
	}
	if arg != "" {
		if i, ok := s.message(arg); ok {
			s.reply("+OK " + line(i))
		}
		return
	}
	s.reply("+OK")
	for i := range s.msgs {
		if !s.deleted[i] {
			s.reply(line(i))
		}
	}
	s.reply(".")
}

// send writes message i, byte-stuffed; with lines >= 0 only its header and
// that many lines of its body (TOP).
func (s *session) send(i, lines int) {
	data, err := s.srv.opts.Backend.Retrieve(s.user, s.msgs[i].UID)
	if err != nil {
		s.srv.log.Error("pop3: reading a message", zap.String("user", s.user), zap.String("uid", s.msgs[i].UID), zap.Error(err))
		s.reply("-ERR [SYS/TEMP] message unavailable, try again later")
		return
	}
	if lines >= 0 {
		data = top(data, lines)
		s.reply("+OK top of message follows")
	} else {
		s.reply(fmt.Sprintf("+OK %d octets", len(data)))
		s.srv.opts.Metrics.retrieved.WithLabelValues(s.srv.opts.Name).Inc()
	}
	s.srv.opts.Metrics.bytes.WithLabelValues(s.srv.opts.Name).Add(float64(len(data)))
	writeStuffed(s.w, data)
}

// writeStuffed writes data as a multi-line response: a dot doubled at the
// start of each line (RFC 1939 §3), a final CRLF if missing, then ".".
func writeStuffed(w io.Writer, data []byte) {
	bw := w.(*bufio.Writer)
	atStart := true
	for len(data) > 0 {
		if atStart && data[0] == '.' {
			bw.WriteByte('.')
		}
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			bw.Write(data)
			data = nil
			atStart = false
			break
		}
		bw.Write(data[:i+1])
		data = data[i+1:]
		atStart = true
	}
	if !atStart {
		bw.WriteString("\r\n")
	}
	bw.WriteString(".\r\n")
}

// top returns the header of msg, the empty line and n lines of its body.
func top(msg []byte, n int) []byte {
	end := bytes.Index(msg, []byte("\r\n\r\n"))
	if end < 0 {
		return msg
	}
	pos := end + 4
	for ; n > 0 && pos < len(msg); n-- {
		i := bytes.IndexByte(msg[pos:], '\n')
		if i < 0 {
			pos = len(msg)
			break
		}
		pos += i + 1
	}
	return msg[:pos]
}

// quit ends the session; in TRANSACTION it first deletes what was marked
// (the UPDATE state).
func (s *session) quit() bool {
	if s.state != transaction {
		s.reply("+OK " + s.srv.opts.Hostname + " signing off")
		return true
	}
	var uids []string
	for i, d := range s.deleted {
		if d {
			uids = append(uids, s.msgs[i].UID)
		}
	}
	if len(uids) > 0 {
		if err := s.srv.opts.Backend.Delete(s.user, uids); err != nil {
			s.srv.log.Error("pop3: deleting messages", zap.String("user", s.user), zap.Error(err))
			s.reply("-ERR [SYS/TEMP] messages not deleted, try again later")
			return true
		}
	}
	s.srv.opts.Metrics.deleted.WithLabelValues(s.srv.opts.Name).Add(float64(len(uids)))
	s.srv.log.Info("pop3 quit", zap.String("user", s.user), zap.String("client_ip", s.ip.String()), zap.Int("deleted", len(uids)))
	s.reply(fmt.Sprintf("+OK %s signing off (%d messages deleted)", s.srv.opts.Hostname, len(uids)))
	return true
}

// sanitize keeps a client-given name printable for the log.
func sanitize(s string) string {
	if len(s) > 64 {
		s = s[:64]
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return '?'
		}
		return r
	}, s)
}
