package smtpd

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"runtime/debug"
	"strconv"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
)

// readBufferSize is the size of a session's input buffer: one read takes a
// whole pipelined group of commands, or a large block of message data.
const readBufferSize = 32 << 10

// maxErrors closes a session after this many refused commands (Postfix's
// smtpd_hard_error_limit).
const maxErrors = 20

// junkCommandLimit is how many commands that do nothing (NOOP, RSET, VRFY,
// HELP) a session may send before each further one counts as an error
// (Postfix's smtpd_junk_command_limit): without it a client could hold a
// connection for ever.
const junkCommandLimit = 100

// recipientOvershootLimit is how many recipients past the per-message
// limit a session may send (each deferred with 452) before each further
// one counts as an error (Postfix's smtpd_recipient_overshoot_limit).
const recipientOvershootLimit = 1000

// session is one SMTP connection, from the greeting to the close. It owns
// the protocol dialogue: the edge reads commands and message data itself,
// so that where a message ends, what a timeout does and which reply each
// error gets are decided here (see docs/smtp-edge.md). Only the session's
// goroutine touches its fields, except busy and raw, which Shutdown uses.
type session struct {
	srv *Server
	pol *Policy   // the listener's policy when the session began
	raw net.Conn  // the TCP connection
	nc  net.Conn  // raw, or the TLS connection over it after STARTTLS
	tls *tls.Conn // nc after STARTTLS, else nil
	r   *bufio.Reader
	out []byte // replies not yet written

	ip       netip.Addr
	helo     string // "" until HELO or EHLO
	esmtp    bool   // the client said EHLO
	trusted  bool
	authUser string

	authFailures int
	errors       int
	junk         int  // commands that did nothing (see junkCommandLimit)
	overshoot    int  // recipients of this transaction past the limit (see recipientOvershootLimit)
	closing      bool // close after the replies written so far
	inStream     bool // reading message data: a panic now loses the place in the stream

	// The transaction.
	env      mta.Envelope
	hasFrom  bool
	declared int64               // the SIZE= of MAIL FROM; 0 when not given
	rcptSeen map[string]struct{} // the lower-cased recipients, once there are many (duplicateRecipient)

	refusalsLogged int           // refusals of this session so far (see maxRefusalsLogged)
	bdat           *bytes.Buffer // the chunks so far of a BDAT message; nil outside one
	bdatBad        bool          // a chunk of this BDAT message was over the size limit
	// bdatNoMemory: the memory budget had no room for this BDAT message
	bdatNoMemory bool

	held         int64       // bytes of the memory budget held for the message being received
	busy         atomic.Bool // inside a transaction: Shutdown lets it finish
	deadlineTill time.Time   // the read deadline last set
	params       []param     // reused between commands
}

func newSession(s *Server, c net.Conn, ip netip.Addr) *session {
	pol := s.policy.Load()
	return &session{
		srv:     s,
		pol:     pol,
		raw:     c,
		nc:      c,
		r:       bufio.NewReaderSize(c, max(readBufferSize, pol.MaxLineLength+2)),
		ip:      ip,
		trusted: pol.Trusted(ip),
	}
}

// serve runs the dialogue until QUIT, an error or the server stopping.
func (s *session) serve() {
	defer s.close()
	s.replyText(220, mta.Enhanced{}, s.srv.opts.Hostname+" ESMTP mta")
	for !s.closing {
		if !s.busy.Load() && s.srv.isStopping() {
			s.reply(&mta.ReplyShuttingDown)
			return
		}
		line, err := s.readLine(s.pol.CommandTimeout)
		if err != nil {
			s.readFailed(err, false)
			return
		}
		s.dispatch(line)
	}
}

// close writes what is pending and closes the connection cleanly.
func (s *session) close() {
	s.releaseMemory()
	_ = s.flush()
	var tc interface{ CloseWrite() error }
	if s.tls != nil {
		tc = s.tls
	}
	lingerClose(s.raw, tc)
}

// readFailed ends the session after a read error. A timeout gets a 421
// (with "shutting down" when that is why); a client that went away gets
// nothing. inData says the error came in the middle of message data: the
// session closes either way, because where the data would have ended is
// now unknown, and reading on would execute the rest of the message as
// commands.
func (s *session) readFailed(err error, inData bool) {
	var ne net.Error
	switch {
	case errors.Is(err, errLineTooLong):
		s.srv.opts.Metrics.rejected.WithLabelValues(s.srv.opts.Name, "line_too_long").Inc()
		s.reply(&replyCommandTooLong)
	case errors.As(err, &ne) && ne.Timeout():
		if s.srv.isStopping() && (!s.busy.Load() || s.srv.forced.Load()) {
			s.reply(&mta.ReplyShuttingDown)
			break
		}
		reason := "command_timeout"
		if inData {
			reason = "data_timeout"
		}
		s.srv.opts.Metrics.rejected.WithLabelValues(s.srv.opts.Name, reason).Inc()
		s.reply(&replyTimeout)
	default:
		if inData {
			s.srv.log.Info("connection lost during message data", zap.String("client_ip", s.ip.String()), zap.Error(err))
		}
	}
	s.closing = true
}

var errLineTooLong = errors.New("smtpd: line too long")

// readLine returns the next command line without its line ending. Replies
// held back are written first unless a whole line is already buffered
// (the client is pipelining and waits for nothing).
func (s *session) readLine(timeout time.Duration) ([]byte, error) {
	if !s.lineBuffered() {
		if err := s.flush(); err != nil {
			return nil, err
		}
		s.setReadDeadline(timeout)
	}
	line, err := s.r.ReadSlice('\n')
	if err == bufio.ErrBufferFull || err == nil && len(line) > s.pol.MaxLineLength+2 {
		return nil, errLineTooLong
	}
	if err != nil {
		return nil, err
	}
	line = line[:len(line)-1]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	return line, nil
}

func (s *session) lineBuffered() bool {
	n := s.r.Buffered()
	if n == 0 {
		return false
	}
	b, _ := s.r.Peek(n)
	return bytes.IndexByte(b, '\n') >= 0
}

// setReadDeadline arms the read deadline for a wait of timeout: it fires
// between timeout and 1.1 × timeout from now, never sooner. The deadline
// is set a tenth of the timeout late and left alone while it is within
// that tenth, so that a pipelining client does not pay for a timer per
// command; one further off (the data timeout before a shorter command
// timeout, say) is moved earlier, so that each wait gets its own timeout.
func (s *session) setReadDeadline(timeout time.Duration) {
	if timeout <= 0 {
		return
	}
	want := time.Now().Add(timeout)
	if want.After(s.deadlineTill) || s.deadlineTill.Sub(want) > timeout/10 {
		till := want.Add(timeout / 10)
		_ = s.raw.SetReadDeadline(till)
		s.deadlineTill = till
	}
}

// reply queues r for the client.
func (s *session) reply(r *mta.Reply) { s.replyText(r.Code, r.Enhanced, r.Text) }

// replyText queues one single-line reply.
func (s *session) replyText(code int, enh mta.Enhanced, text string) {
	s.out = strconv.AppendInt(s.out, int64(code), 10)
	s.out = append(s.out, ' ')
	if enh != (mta.Enhanced{}) {
		s.out = appendEnhanced(s.out, enh)
		s.out = append(s.out, ' ')
	}
	s.out = append(s.out, text...)
	s.out = append(s.out, "\r\n"...)
}

// replyLines queues a multi-line reply (RFC 5321 §4.2.1).
func (s *session) replyLines(code int, lines []string) {
	for i, l := range lines {
		s.out = strconv.AppendInt(s.out, int64(code), 10)
		if i < len(lines)-1 {
			s.out = append(s.out, '-')
		} else {
			s.out = append(s.out, ' ')
		}
		s.out = append(s.out, l...)
		s.out = append(s.out, "\r\n"...)
	}
}

func appendEnhanced(b []byte, e mta.Enhanced) []byte {
	b = strconv.AppendInt(b, int64(e[0]), 10)
	b = append(b, '.')
	b = strconv.AppendInt(b, int64(e[1]), 10)
	b = append(b, '.')
	return strconv.AppendInt(b, int64(e[2]), 10)
}

// flush writes the replies held back. RFC 2920 §3.2 lets a server hold
// replies while pipelined commands are pending; they are always written
// before the session waits for input, so no client waits for a reply
// that was held back.
func (s *session) flush() error {
	if len(s.out) == 0 {
		return nil
	}
	if t := s.pol.CommandTimeout; t > 0 {
		_ = s.raw.SetWriteDeadline(time.Now().Add(t))
	}
	_, err := s.nc.Write(s.out)
	if cap(s.out) > 64<<10 {
		s.out = nil
	} else {
		s.out = s.out[:0]
	}
	return err
}

// refuse queues r as the answer to a refused command and counts it; a
// client that keeps getting refused is disconnected.
func (s *session) refuse(reason string, r *mta.Reply) {
	s.srv.opts.Metrics.rejected.WithLabelValues(s.srv.opts.Name, reason).Inc()
	// The first refusals of a session are logged: enough to see why, not
	// a line per command for a client that keeps trying.
	s.refusalsLogged++
	if ce := s.srv.log.Check(zap.InfoLevel, "refused"); ce != nil && s.refusalsLogged <= maxRefusalsLogged {
		ce.Write(zap.String("reason", reason), zap.String("client_ip", s.ip.String()), zap.String("helo", s.helo),
			zap.Int("code", r.Code), zap.String("enhanced", r.Enhanced.String()), zap.String("reply", r.Text))
	}
	s.reply(r)
	if r.Code >= 500 {
		s.countError()
	}
}

// countError counts one error of the client's; at maxErrors the session
// says so and closes.
func (s *session) countError() {
	if s.errors++; s.errors >= maxErrors && !s.closing {
		s.reply(&replyTooManyErrors)
		s.closing = true
	}
}

// junkCommand counts a command that did nothing; past junkCommandLimit
// each one is an error.
func (s *session) junkCommand() {
	if s.junk++; s.junk > junkCommandLimit {
		s.countError()
	}
}

// recoverPanic turns a panic in a command handler into a 451 reply and a
// metric: no panic reaches the client as a dropped connection or a stack
// trace. After a panic inside message data the position in the stream is
// unknown, so the session closes.
func (s *session) recoverPanic() {
	if r := recover(); r != nil {
		s.srv.opts.Metrics.panics.Inc()
		s.srv.log.Error("panic in SMTP session", zap.Any("panic", r), zap.String("client_ip", s.ip.String()),
			zap.ByteString("stack", debug.Stack()))
		s.reply(&mta.ReplyInternal)
		s.resetTransaction()
		if s.inStream {
			s.closing = true
		}
	}
}

// reserve makes sure the memory budget covers a message buffer of n bytes,
// taking it in steps of a quarter megabyte; false when it is exhausted.
func (s *session) reserve(n int) bool {
	need := int64(n) - s.held
	if need <= 0 {
		return true
	}
	step := max(need, 256<<10)
	if !s.srv.opts.Memory.TryAcquire(step) {
		if step == need || !s.srv.opts.Memory.TryAcquire(need) {
			return false
		}
		step = need
	}
	s.held += step
	return true
}

// releaseMemory gives back what reserve took.
func (s *session) releaseMemory() {
	s.srv.opts.Memory.Release(s.held)
	s.held = 0
}

// resetTransaction forgets the transaction (RSET, end of data, EHLO).
func (s *session) resetTransaction() {
	s.releaseMemory()
	s.env = mta.Envelope{}
	s.hasFrom, s.declared, s.overshoot, s.rcptSeen = false, 0, 0, nil
	if s.bdat != nil {
		putBuffer(s.bdat)
		s.bdat = nil
	}
	s.bdatBad, s.bdatNoMemory = false, false
	s.busy.Store(false)
}

// mayRelay reports whether the client may send to any domain.
func (s *session) mayRelay() bool { return s.trusted || s.authUser != "" }

// Replies of the dialogue itself (the policy replies are in package mta).
var (
	replyTimeout        = mta.Reply{Code: 421, Enhanced: mta.Enhanced{4, 4, 2}, Text: "Error: timeout exceeded, closing connection"}
	replyCommandTooLong = mta.Reply{Code: 500, Enhanced: mta.Enhanced{5, 5, 2}, Text: "Error: command line too long, closing connection"}
	replyTooManyErrors  = mta.Reply{Code: 421, Enhanced: mta.Enhanced{4, 7, 0}, Text: "Error: too many errors, closing connection"}
	replyBadSyntax      = mta.Reply{Code: 500, Enhanced: mta.Enhanced{5, 5, 2}, Text: "Error: bad syntax"}
	replyHELOSyntax     = mta.Reply{Code: 501, Enhanced: mta.Enhanced{5, 5, 4}, Text: "Syntax: HELO hostname"}
	replyEHLOSyntax     = mta.Reply{Code: 501, Enhanced: mta.Enhanced{5, 5, 4}, Text: "Syntax: EHLO hostname"}
	replyUnknown        = mta.Reply{Code: 500, Enhanced: mta.Enhanced{5, 5, 2}, Text: "Error: command not recognized"}
	replyNotImplemented = mta.Reply{Code: 502, Enhanced: mta.Enhanced{5, 5, 1}, Text: "Error: command not implemented"}
	replyNotSMTP        = mta.Reply{Code: 521, Enhanced: mta.Enhanced{5, 7, 0}, Text: "Error: this is an SMTP server, closing connection"}
	replyHELOFirst      = mta.Reply{Code: 503, Enhanced: mta.Enhanced{5, 5, 1}, Text: "Error: send HELO/EHLO first"}
	replyNeedMAIL       = mta.Reply{Code: 503, Enhanced: mta.Enhanced{5, 5, 1}, Text: "Error: need MAIL command"}
	replyNeedRCPT       = mta.Reply{Code: 503, Enhanced: mta.Enhanced{5, 5, 1}, Text: "Error: need RCPT command"}
	replyInBDAT         = mta.Reply{Code: 503, Enhanced: mta.Enhanced{5, 5, 1}, Text: "Error: BDAT message in progress; send BDAT or RSET"}
	replyUnknownParam   = mta.Reply{Code: 555, Enhanced: mta.Enhanced{5, 5, 4}, Text: "Unsupported parameter"}
	replyBadParam       = mta.Reply{Code: 501, Enhanced: mta.Enhanced{5, 5, 4}, Text: "Bad parameter syntax"}
	replyOK             = mta.Reply{Code: 250, Enhanced: mta.Enhanced{2, 0, 0}, Text: "Ok"}
)

// maxRefusalsLogged is how many refusals of one session get a log line.
const maxRefusalsLogged = 20
