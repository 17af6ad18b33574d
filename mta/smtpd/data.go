package smtpd

import (
	"bytes"
	"errors"
	"io"
	"sync"
	"time"

	"github.com/emersion/go-smtp"
	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
)

var bufferPool = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// maxPooledBuffer keeps one huge message from pinning its buffer forever.
const maxPooledBuffer = 1 << 20

func putBuffer(b *bytes.Buffer) {
	if b.Cap() <= maxPooledBuffer {
		b.Reset()
		bufferPool.Put(b)
	}
}

// Data reads the message, checks it, prepends the Received: header and
// hands it to the spool. The 250 reply carries the queue ID and is only
// returned once the spool said the message is stored.
func (s *session) Data(r io.Reader) (err error) {
	defer s.recoverTo(&err)
	buf := bufferPool.Get().(*bytes.Buffer)
	defer putBuffer(buf)
	if _, rerr := buf.ReadFrom(&deadlineReader{r: r, conn: s.conn, timeout: s.srv.opts.DataTimeout}); rerr != nil {
		switch {
		case errors.Is(rerr, smtp.ErrDataTooLarge):
			return s.reject("message_too_big", &mta.ReplyMessageTooBig)
		case errors.Is(rerr, smtp.ErrTooLongLine):
			return s.reject("line_too_long", &mta.ReplyLineTooLong)
		default:
			// The connection broke or timed out mid-data: nothing was
			// accepted, and the reply will most likely not arrive.
			s.srv.log.Info("message data not received", zap.String("client_ip", s.ip.String()), zap.Error(rerr))
			return s.reject("data_read_error", mta.ReplySpoolError.With("Error reading message data"))
		}
	}
	// On cleartext DATA the raw stream was checked as it arrived, before
	// go-smtp's dot handling (which adds no CR or LF, so a clean stream
	// means a clean body). Over TLS, and for BDAT, check the body.
	bare, early, scanned := s.conn.sync.take()
	if early && s.authUser == "" {
		return s.reject("sync_error", &mta.ReplySyncError)
	}
	body := buf.Bytes()
	if bytes.IndexByte(body, 0) >= 0 {
		return s.reject("nul_byte", &mta.ReplyNULByte)
	}
	policy := s.srv.opts.BareLineEndings
	if s.mayRelay() {
		policy = s.srv.opts.BareLineEndingsTrusted
	}
	if !scanned {
		bare = hasBareLineEnding(body)
	}
	if policy == RejectBareLineEndings && bare {
		return s.reject("bare_line_ending", &mta.ReplyBareLineEnding)
	}
	if scanned && bare {
		// The raw stream had one; go-smtp's dot handling may have
		// dropped it (".\r" then not LF), so look at the body itself.
		bare = hasBareLineEnding(body)
	}
	if bare {
		norm := bufferPool.Get().(*bytes.Buffer)
		defer putBuffer(norm)
		normalizeLineEndings(norm, body)
		body = norm.Bytes()
	}

	sp := s.srv.opts.Spool
	id := sp.NewID()
	now := time.Now()
	hdr := s.received(make([]byte, 0, 256), id, now)
	env := s.env
	env.Received = now
	if err := s.accept(id, &env, hdr, body); err != nil {
		if errors.Is(err, errShuttingDown) {
			return s.reject("shutting_down", &mta.ReplyShuttingDown)
		}
		s.srv.log.Error("message not stored", zap.String("id", id), zap.String("client_ip", s.ip.String()), zap.Error(err))
		if errors.Is(err, mta.ErrStorageFull) {
			return s.reject("storage_full", &mta.ReplyDiskFull)
		}
		return s.reject("spool_error", &mta.ReplySpoolError)
	}
	size := len(hdr) + len(body)
	s.srv.acceptedMsgs.Inc()
	s.srv.acceptedBytes.Add(float64(size))
	if ce := s.srv.log.Check(zap.InfoLevel, "message accepted"); ce != nil {
		fields := []zap.Field{zap.String("id", id), zap.String("client_ip", s.ip.String()),
			zap.String("from", env.From), zap.Int("rcpts", len(env.Recipients)), zap.Int("size", size)}
		if s.authUser != "" {
			fields = append(fields, zap.String("auth_user", s.authUser))
		}
		ce.Write(fields...)
	}
	return toSMTP(mta.ReplyQueued.With("Ok: queued as " + id))
}

var errShuttingDown = errors.New("smtpd: shutting down")

// accept hands a message to the spool unless the listener has shut down.
func (s *session) accept(id string, env *mta.Envelope, hdr, body []byte) error {
	s.srv.acceptMu.RLock()
	defer s.srv.acceptMu.RUnlock()
	if s.srv.acceptClosed {
		return errShuttingDown
	}
	return s.srv.opts.Spool.Accept(id, env, hdr, body)
}

// deadlineReader keeps moving the read deadline while message data
// arrives, so a large message is not cut off by the command timeout: the
// client must send some data every timeout. The deadline is moved when a
// tenth of it has passed, not on every read.
type deadlineReader struct {
	r       io.Reader
	conn    *trackedConn
	timeout time.Duration
	set     time.Time
}

func (d *deadlineReader) Read(b []byte) (int, error) {
	if now := time.Now(); now.Sub(d.set) > d.timeout/10 {
		_ = d.conn.SetReadDeadline(now.Add(d.timeout))
		d.set = now
	}
	return d.r.Read(b)
}

// hasBareLineEnding reports whether b has a CR or LF outside a CRLF pair.
func hasBareLineEnding(b []byte) bool {
	crlf := bytes.Count(b, []byte("\r\n"))
	return crlf != bytes.Count(b, []byte("\n")) || crlf != bytes.Count(b, []byte("\r"))
}

// normalizeLineEndings writes b to dst with every bare CR or LF made CRLF.
func normalizeLineEndings(dst *bytes.Buffer, b []byte) {
	dst.Grow(len(b) + len(b)/32)
	for i := 0; i < len(b); i++ {
		switch c := b[i]; c {
		case '\r':
			dst.WriteString("\r\n")
			if i+1 < len(b) && b[i+1] == '\n' {
				i++
			}
		case '\n':
			dst.WriteString("\r\n")
		default:
			dst.WriteByte(c)
		}
	}
}

// received builds our trace header (RFC 5321 §4.4) with the protocol
// keywords of RFC 3848 and RFC 6531:
//
//	Received: from HELO ([IP])
//		by HOSTNAME (mta) with ESMTPSA id ID
//		for <RCPT>; DATE
//
// "for" is only given for a single recipient, so that one recipient of a
// message does not learn the others.
func (s *session) received(b []byte, id string, now time.Time) []byte {
	b = append(b, "Received: from "...)
	b = appendSanitized(b, s.helo)
	b = append(b, " (["...)
	b = append(b, s.ip.String()...)
	b = append(b, "])\r\n\tby "...)
	b = append(b, s.srv.opts.Hostname...)
	b = append(b, " (mta) with "...)
	if s.env.SMTPUTF8 {
		b = append(b, "UTF8SMTP"...)
	} else {
		b = append(b, "ESMTP"...)
	}
	if s.tls {
		b = append(b, 'S')
	}
	if s.authUser != "" {
		b = append(b, 'A')
	}
	b = append(b, " id "...)
	b = append(b, id...)
	if len(s.env.Recipients) == 1 {
		b = append(b, "\r\n\tfor <"...)
		b = appendSanitized(b, s.env.Recipients[0].Address)
		b = append(b, '>')
	}
	b = append(b, "; "...)
	b = now.AppendFormat(b, "Mon, 02 Jan 2006 15:04:05 -0700")
	return append(b, "\r\n"...)
}

// appendSanitized appends s with anything that could break the header
// (controls, spaces, parentheses, angle brackets) replaced by '_'. Non-ASCII
// UTF-8 is kept: SMTPUTF8 addresses are legitimate.
func appendSanitized(b []byte, s string) []byte {
	if s == "" {
		return append(b, "unknown"...)
	}
	for i := 0; i < len(s) && i < 255; i++ {
		c := s[i]
		if c <= ' ' || c == 0x7f || c == '(' || c == ')' || c == '<' || c == '>' {
			c = '_'
		}
		b = append(b, c)
	}
	return b
}
