package smtpd

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
)

var bufferPool = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// maxPooledBuffer keeps one huge message from pinning its buffer forever.
const maxPooledBuffer = 1 << 20

func getBuffer() *bytes.Buffer { return bufferPool.Get().(*bytes.Buffer) }

func putBuffer(b *bytes.Buffer) {
	if b.Cap() <= maxPooledBuffer {
		b.Reset()
		bufferPool.Put(b)
	}
}

// bodyFindings is what reading a message found wrong with it.
type bodyFindings struct {
	tooBig   bool // over the size limit (the excess was read and dropped)
	longLine bool // a line over the line limit
	bare     bool // a CR or LF outside a CRLF pair
	nul      bool // a NUL byte
	noMemory bool // the memory budget had no room for it (the rest was read and dropped)
}

// data answers DATA: 354, then the message up to <CRLF>.<CRLF>, then the
// verdict.
func (s *session) data(arg string) {
	// DATA ends a pipelined group (RFC 2920 §3.1): content sent before
	// the 354 comes from a broken client or an attack (SMTP smuggling). As
	// Postfix's smtpd_forbid_unauth_pipelining does: refuse and disconnect,
	// also when DATA itself is refused (the content would be read as
	// commands).
	early := s.pol.RejectEarlyData && s.authUser == "" && s.r.Buffered() > 0
	if early {
		// Whether or not DATA itself would be refused: one reply, the
		// reason for the close, as Postfix answers improper pipelining.
		s.refuse("sync_error", &mta.ReplySyncError)
		s.closing = true
		return
	}
	switch {
	case arg != "":
		s.refuse("bad_syntax", &mta.Reply{Code: 501, Enhanced: mta.Enhanced{5, 5, 4}, Text: "Syntax: DATA"})
		return
	case s.bdat != nil:
		s.refuse("bad_sequence", &replyInBDAT)
		return
	case !s.hasFrom:
		s.refuse("bad_sequence", &replyNeedMAIL)
		return
	case len(s.env.Recipients) == 0:
		s.refuse("bad_sequence", &replyNeedRCPT)
		return
	}
	s.replyText(354, mta.Enhanced{}, "End data with <CR><LF>.<CR><LF>")
	buf := getBuffer()
	defer putBuffer(buf)
	s.inStream = true
	f, err := s.readData(buf)
	s.inStream = false
	if err != nil {
		s.readFailed(err, true)
		s.resetTransaction()
		return
	}
	s.finishMessage(buf.Bytes(), f)
}

var dotCRLF = []byte(".\r\n")

// readData reads message data up to the end-of-data line, undoing the
// dot-stuffing (RFC 5321 §4.5.2), into dst. The data ends at the first
// <CRLF>.<CRLF> in the stream, wherever it is, also right after a bare CR
// (the start of the data counts as following a CRLF); nothing else ends
// it. Lines are delimited by CRLF only, so a dot after a bare LF is data.
// dst gets at most the size limit; the rest is read and dropped. The
// buffered input is scanned in blocks with bytes.Index: no per-byte state
// machine.
func (s *session) readData(dst *bytes.Buffer) (bodyFindings, error) {
	var f bodyFindings
	limit, maxLine := s.pol.MaxMessageSize, s.pol.MaxLineLength
	var size int64
	lineLen := 0
	atLineStart := true
	keep := func(b []byte) {
		size += int64(len(b))
		if limit > 0 && size > limit {
			f.tooBig = true
			return
		}
		if f.noMemory || !s.reserve(dst.Len()+len(b)) {
			f.noMemory = true
			return
		}
		dst.Write(b)
	}
	clean := true // no bare CR and no NUL seen: the fast path may run
	for {
		if atLineStart && clean {
			if buf, _ := s.r.Peek(s.r.Buffered()); len(buf) > 0 {
				n, long, ok := cleanLines(buf, maxLine)
				if !ok {
					clean = false // the per-line path below takes it from here
				} else if n > 0 {
					f.longLine = f.longLine || long
					keep(buf[:n])
					_, _ = s.r.Discard(n)
				}
			}
		}
		if s.r.Buffered() < len(dotCRLF) { // the reads below may wait:
			// the client may be waiting for the 354 first
			if err := s.flush(); err != nil {
				return f, err
			}
			s.setReadDeadline(s.pol.DataTimeout)
		}
		if atLineStart {
			head, err := s.r.Peek(3)
			if err != nil && len(head) < 3 && (len(head) == 0 || head[0] == '.') {
				return f, err
			}
			if head[0] == '.' {
				if bytes.Equal(head, dotCRLF) {
					_, _ = s.r.Discard(3)
					return f, nil
				}
				_, _ = s.r.Discard(1) // a stuffed dot
			}
			atLineStart = false
		}
		n := s.r.Buffered()
		if n == 0 {
			if _, err := s.r.Peek(1); err != nil {
				return f, err
			}
			n = s.r.Buffered()
		}
		buf, _ := s.r.Peek(n)
		if i := bytes.Index(buf, crlf); i >= 0 {
			line := buf[:i]
			f.check(line)
			if lineLen = f.lineLength(lineLen, line, maxLine); lineLen > maxLine {
				f.longLine = true
			}
			keep(buf[:i+2])
			_, _ = s.r.Discard(i + 2)
			lineLen, atLineStart = 0, true
			continue
		}
		take := len(buf)
		if buf[take-1] == '\r' {
			take-- // maybe the CR of a CRLF: decide with the next byte
		}
		if take == 0 {
			if _, err := s.r.Peek(2); err != nil {
				return f, err
			}
			continue
		}
		f.check(buf[:take])
		if lineLen = f.lineLength(lineLen, buf[:take], maxLine); lineLen > maxLine {
			f.longLine = true
		}
		keep(buf[:take])
		_, _ = s.r.Discard(take)
	}
}

var crlf = []byte("\r\n")

// cleanLines returns the length of the longest run of whole lines at the
// start of buf that need none of readData's per-line work: each ends in
// CRLF, none starts with a dot, and none holds a bare LF; long reports a
// line over maxLine in it. With !ok the run also holds a bare CR or a NUL
// and n is 0: readData then reads the rest of the message line by line,
// so that the work stays linear however late in a block that byte is.
//
// It makes one IndexByte per line and two passes over the run, instead of
// the per-line path's peeks, index searches and writes: on 100 KB
// messages that path was a quarter of the relay's CPU.
func cleanLines(buf []byte, maxLine int) (n int, long, ok bool) {
	lines := 0
	for n < len(buf) && buf[n] != '.' {
		i := bytes.IndexByte(buf[n:], '\n')
		if i <= 0 || buf[n+i-1] != '\r' {
			break // a partial line, or a bare LF: for the per-line path
		}
		if i-1 > maxLine {
			long = true
		}
		lines++
		n += i + 1
	}
	run := buf[:n]
	if bytes.Count(run, crlf[:1]) != lines || bytes.IndexByte(run, 0) >= 0 {
		return 0, false, false
	}
	return n, long, true
}

// check notes a bare CR or LF, or a NUL, in a piece of a line that holds
// no CRLF.
func (f *bodyFindings) check(b []byte) {
	if !f.bare && (bytes.IndexByte(b, '\r') >= 0 || bytes.IndexByte(b, '\n') >= 0) {
		f.bare = true
	}
	if !f.nul && bytes.IndexByte(b, 0) >= 0 {
		f.nul = true
	}
}

// lineLength returns the length of the current line after seg, a piece of
// a line that holds no CRLF, was added to a line of n bytes so far. A bare
// CR or LF in seg ends a line too (it becomes CRLF when normalised), so a
// message with LF line endings is not taken for one long line; f.longLine
// records any line inside seg that is over max.
func (f *bodyFindings) lineLength(n int, seg []byte, max int) int {
	if !f.bare {
		return n + len(seg) // the common case: no bare CR or LF so far
	}
	for {
		i := bytes.IndexAny(seg, "\r\n")
		if i < 0 {
			return n + len(seg)
		}
		if n+i > max {
			f.longLine = true
		}
		n, seg = 0, seg[i+1:]
	}
}

// bdatChunk answers one BDAT command (RFC 3030): the chunk that follows it
// is read whatever the verdict, so that the stream stays in step.
func (s *session) bdatChunk(arg string) {
	sizeArg, last, _ := strings.Cut(arg, " ")
	last = strings.TrimSpace(last)
	n, err := strconv.ParseUint(sizeArg, 10, 31)
	if err != nil || last != "" && !strings.EqualFold(last, "LAST") {
		// Without a size the end of the chunk is unknown: what follows
		// cannot be read as commands.
		s.refuse("bad_syntax", &mta.Reply{Code: 501, Enhanced: mta.Enhanced{5, 5, 4}, Text: "Syntax: BDAT size [LAST]; closing connection"})
		s.closing = true
		return
	}
	isLast := last != ""
	var refusal *mta.Reply
	switch {
	case !s.hasFrom:
		refusal = &replyNeedMAIL
	case len(s.env.Recipients) == 0:
		refusal = &replyNeedRCPT
	}
	if refusal != nil || s.bdatBad {
		if err := s.discard(int64(n)); err != nil {
			s.readFailed(err, true)
			return
		}
		if refusal != nil {
			s.refuse("bad_sequence", refusal)
			return
		}
		if isLast {
			s.resetTransaction()
		}
		// Every chunk after the one that went over: the message cannot
		// be taken any more (RFC 3030 §2: the client should have
		// stopped). One error, counted once, at the chunk that went over.
		s.reply(&mta.ReplyMessageTooBig)
		return
	}
	if s.bdat == nil {
		s.bdat = getBuffer()
	}
	if int64(s.bdat.Len())+int64(n) > s.pol.MaxMessageSize {
		s.bdatBad = true // the rest of the message is read and dropped
		s.bdat.Reset()
		if err := s.discard(int64(n)); err != nil {
			s.readFailed(err, true)
			return
		}
		if isLast {
			s.resetTransaction()
		}
		s.refuse("message_too_big", &mta.ReplyMessageTooBig)
		return
	}
	// Memory grows as the chunk's bytes arrive, not by what BDAT claims: a
	// client announcing 10 MiB and sending nothing holds nothing.
	dst := s.bdat
	if s.bdatNoMemory || !s.reserve(s.bdat.Len()+int(n)) {
		// No room in the memory budget: the rest of the message is read
		// and dropped, and its last chunk refused.
		s.bdatNoMemory, dst = true, nil
	}
	s.inStream = true
	err = s.copyChunk(dst, int64(n))
	s.inStream = false
	if err != nil {
		s.readFailed(err, true)
		s.resetTransaction()
		return
	}
	if s.bdatNoMemory {
		if isLast {
			s.resetTransaction()
			s.refuse("memory_budget", &mta.ReplyNoMemory)
			return
		}
		s.chunkReceived(n)
		return
	}
	if !isLast {
		s.chunkReceived(n)
		return
	}
	body := s.bdat.Bytes()
	s.finishMessage(body, scanBody(body, s.pol.MaxLineLength))
}

// chunkReceived answers a BDAT chunk that is not the last.
func (s *session) chunkReceived(n uint64) {
	s.replyText(250, mta.Enhanced{2, 0, 0}, strconv.FormatUint(n, 10)+" octets received")
}

// discard reads and drops n bytes of message data.
func (s *session) discard(n int64) error { return s.copyChunk(nil, n) }

// copyChunk reads n bytes of message data into dst (nil: drops them), as
// they arrive: one buffered block at a time, each wait under the data
// timeout.
func (s *session) copyChunk(dst *bytes.Buffer, n int64) error {
	for n > 0 {
		if s.r.Buffered() == 0 {
			if err := s.flush(); err != nil {
				return err
			}
			s.setReadDeadline(s.pol.DataTimeout)
			if _, err := s.r.Peek(1); err != nil {
				return err
			}
		}
		take := int(min(n, int64(s.r.Buffered())))
		if dst != nil {
			b, _ := s.r.Peek(take)
			dst.Write(b)
		}
		_, _ = s.r.Discard(take)
		n -= int64(take)
	}
	return nil
}

// scanBody makes the checks of readData over a whole body received with
// BDAT, which has no end-of-data line and no dot-stuffing.
func scanBody(body []byte, maxLine int) bodyFindings {
	var f bodyFindings
	for len(body) > 0 {
		i := bytes.Index(body, crlf)
		line := body
		if i >= 0 {
			line, body = body[:i], body[i+2:]
		} else {
			body = nil
		}
		f.check(line)
		if f.lineLength(0, line, maxLine) > maxLine {
			f.longLine = true
		}
	}
	return f
}

// finishMessage decides on a message read in full: refuse it, or normalise
// it, add our headers and hand it to the spool. The 250 carries the queue
// ID and is only queued once the spool said the message is stored.
func (s *session) finishMessage(body []byte, f bodyFindings) {
	defer s.resetTransaction()
	policy := s.pol.BareLineEndings
	if s.mayRelay() {
		policy = s.pol.BareLineEndingsTrusted
	}
	switch {
	case f.tooBig:
		s.refuse("message_too_big", &mta.ReplyMessageTooBig)
		return
	case f.noMemory:
		s.refuse("memory_budget", &mta.ReplyNoMemory)
		return
	case f.nul:
		s.refuse("nul_byte", &mta.ReplyNULByte)
		return
	case f.bare && policy == RejectBareLineEndings:
		s.refuse("bare_line_ending", &mta.ReplyBareLineEnding)
		return
	case f.longLine:
		s.refuse("line_too_long", mta.ReplyLineTooLong.With(fmt.Sprintf("Message contains a line longer than %d octets", s.pol.MaxLineLength)))
		return
	}
	if f.bare {
		if !s.reserve(2*len(body) + len(body)/16) { // the normalised copy
			s.refuse("memory_budget", &mta.ReplyNoMemory)
			return
		}
		norm := getBuffer()
		defer putBuffer(norm)
		normalizeLineEndings(norm, body)
		body = norm.Bytes()
	}
	// The spool's batch copies the message while it is stored: that copy
	// counts against the memory budget too.
	if !s.reserve(int(s.held) + len(body) + 512) {
		s.refuse("memory_budget", &mta.ReplyNoMemory)
		return
	}
	if rep := s.overQuota(int64(len(body)) + 512); rep != nil {
		s.refuse("mailbox_full", rep)
		return
	}
	facts := scanHeader(body)
	if max := s.pol.MaxHops; max > 0 && facts.received >= max {
		// With ours it would be one more: a mail loop (RFC 5321 §6.3).
		s.refuse("too_many_hops", &mta.ReplyTooManyHops)
		return
	}
	sp := s.srv.opts.Spool
	id := sp.NewID()
	now := time.Now()
	hdr := s.received(make([]byte, 0, 320), id, now)
	env := s.env
	env.Received = now
	env.Submitted = s.mayRelay()
	env.MessageID = string(facts.messageID)
	if s.pol.AddMissingHeaders && (s.mayRelay() || s.srv.opts.Submission) {
		hdr = appendMissingHeaders(hdr, facts, id, s.srv.opts.Hostname, now)
		if !facts.hasMessageID {
			env.MessageID = "<" + id + "@" + s.srv.opts.Hostname + ">"
		}
	}
	if err := s.accept(id, &env, hdr, body); err != nil {
		if errors.Is(err, errShuttingDown) {
			s.refuse("shutting_down", &mta.ReplyShuttingDown)
			s.closing = true
			return
		}
		s.srv.log.Error("message not stored", zap.String("id", id), zap.String("client_ip", s.ip.String()), zap.Error(err))
		if errors.Is(err, mta.ErrStorageFull) {
			s.refuse("storage_full", &mta.ReplyDiskFull)
		} else {
			s.refuse("spool_error", &mta.ReplySpoolError)
		}
		return
	}
	size := len(hdr) + len(body)
	if f := s.srv.opts.OnAccepted; f != nil {
		f(id, &env, size, s.tlsVersion())
	}
	s.srv.acceptedMsgs.Inc()
	s.srv.acceptedBytes.Add(float64(size))
	if ce := s.srv.log.Check(zap.InfoLevel, "message accepted"); ce != nil {
		fields := []zap.Field{zap.String("id", id), zap.String("client_ip", s.ip.String()),
			zap.String("helo", s.helo), zap.String("from", env.From), zap.Int("rcpts", len(env.Recipients)),
			zap.Int("size", size), zap.String("tls", s.tlsVersion())}
		if env.MessageID != "" {
			fields = append(fields, zap.String("message_id", env.MessageID))
		}
		if s.authUser != "" {
			fields = append(fields, zap.String("auth_user", s.authUser))
		}
		ce.Write(fields...)
	}
	s.replyText(250, mta.Enhanced{2, 0, 0}, "Ok: queued as "+id)
	s.junk = 0 // as Postfix: junk commands count from the last message taken
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
	switch {
	case s.env.SMTPUTF8:
		b = append(b, "UTF8SMTP"...)
	case s.esmtp:
		b = append(b, "ESMTP"...)
	default:
		b = append(b, "SMTP"...)
	}
	if s.tls != nil {
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
// (controls, spaces, parentheses, angle brackets, bytes that are not
// UTF-8) replaced by '_'. Non-ASCII UTF-8 is kept: SMTPUTF8 addresses are
// legitimate.
func appendSanitized(b []byte, s string) []byte {
	if s == "" {
		return append(b, "unknown"...)
	}
	if len(s) > 255 {
		s = s[:255]
	}
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x80 {
			r, n := utf8.DecodeRuneInString(s[i:])
			if r == utf8.RuneError && n <= 1 || unicode.IsControl(r) {
				b = append(b, '_')
			} else {
				b = append(b, s[i:i+n]...)
			}
			i += n
			continue
		}
		if c <= ' ' || c == 0x7f || c == '(' || c == ')' || c == '<' || c == '>' {
			c = '_'
		}
		b = append(b, c)
		i++
	}
	return b
}

// tlsVersion names the session's TLS version ("TLS 1.3"), or "none".
func (s *session) tlsVersion() string {
	if s.tls == nil {
		return "none"
	}
	return tls.VersionName(s.tls.ConnectionState().Version)
}

// overQuota returns the refusal at the end of data of a message every
// recipient of which is local and would take its mailbox over quota at
// size octets (the trace header included, roughly). A message with other
// recipients is taken: those get it, and the full mailbox's recipient is
// deferred at delivery, then bounced if it stays full.
func (s *session) overQuota(size int64) *mta.Reply {
	mb := s.srv.opts.Mailboxes
	if mb == nil || len(s.env.Recipients) == 0 {
		return nil
	}
	var first *mta.Reply
	for _, r := range s.env.Recipients {
		if !s.srv.local[mta.Domain(r.Address)] {
			return nil
		}
		rep := mb.Check(r.Address, size)
		if rep == nil || rep.Code != 552 {
			return nil
		}
		if first == nil {
			first = rep
		}
	}
	return first
}
