package smtpd

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// The fuzz targets of the hand-written parsers and of the end-of-data
// reader. Their seed corpora are in testdata/fuzz/<FuzzName>/; run one with
//
//	go test ./mta/smtpd -run '^$' -fuzz '^FuzzDataReader$' -fuzztime 60s

// FuzzParsePath checks that a path accepted by parsePath gives a mailbox
// that can be written back into a command and read again as the same
// mailbox, and that holds nothing that could break the command or a header.
func FuzzParsePath(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string, null, postmaster, utf8ok bool) {
		p, rest, perr := parsePath(s, null, postmaster, utf8ok)
		if perr < pathOK || perr > pathBadDomain {
			t.Fatalf("parsePath(%q) = unknown error %d", s, perr)
		}
		if perr != pathOK {
			if p != (path{}) || rest != "" {
				t.Fatalf("parsePath(%q) = %+v, %q with error %d", s, p, rest, perr)
			}
			return
		}
		if !strings.HasSuffix(s, rest) {
			t.Fatalf("parsePath(%q): rest %q is not the end of the input", s, rest)
		}
		whole := s[:len(s)-len(rest)]
		if len(whole) < 2 || whole[0] != '<' || whole[len(whole)-1] != '>' {
			t.Fatalf("parsePath(%q): the path %q is not in angle brackets", s, whole)
		}
		if len(whole) > maxPath {
			t.Fatalf("parsePath(%q): path of %d octets accepted", s, len(whole))
		}
		inner := whole[1 : len(whole)-1]
		switch {
		case p.postmaster:
			if !postmaster || p.mailbox != "" || !strings.EqualFold(inner, "postmaster") {
				t.Fatalf("parsePath(%q, postmaster=%v) = %+v", s, postmaster, p)
			}
			return
		case p.mailbox == "":
			if !null || inner != "" || p.literal {
				t.Fatalf("parsePath(%q, null=%v) = %+v", s, null, p)
			}
			return
		}
		checkMailbox(t, s, p.mailbox, utf8ok)

		// The mailbox written in a command and read again.
		line := "RCPT TO:<" + p.mailbox + ">"
		arg, ok := cutKeyword(line[len("RCPT "):], "TO:")
		if !ok {
			t.Fatalf("cutKeyword(%q) failed", line)
		}
		p2, rest2, perr2 := parsePath(arg, false, true, utf8ok)
		if perr2 != pathOK || p2 != p || rest2 != "" {
			t.Fatalf("round trip: parsePath(%q) = %+v, rest %q\n"+
				"re-parsing %q = %+v, rest %q, error %d, want the same mailbox",
				s, p, rest, line, p2, rest2, perr2)
		}
	})
}

// checkMailbox checks a mailbox that parsePath returned for input s.
func checkMailbox(t *testing.T, s, mb string, utf8ok bool) {
	t.Helper()
	fail := func(why string) {
		t.Helper()
		t.Fatalf("parsePath(%q, utf8=%v) = mailbox %q: %s", s, utf8ok, mb, why)
	}
	if !utf8.ValidString(mb) {
		fail("not valid UTF-8")
	}
	if !strings.Contains(mb, "@") {
		fail("no '@'")
	}
	for i := 0; i < len(mb); i++ {
		switch c := mb[i]; {
		case c < 0x20 || c == 0x7f:
			fail("control byte")
		case c >= 0x80 && !utf8ok:
			fail("non-ASCII without SMTPUTF8")
		}
	}
	// A Quoted-string (RFC 5321 §4.1.2) can only be the whole Local-part:
	// anywhere else, in a domain literal too, a quote is a plain character.
	unquoted := mb
	if mb[0] == '"' {
		end := -1
		for i := 1; i < len(mb) && end < 0; i++ {
			switch mb[i] {
			case '\\':
				i++
			case '"':
				end = i + 1
			}
		}
		if end < 0 {
			fail("unterminated quoted string")
		}
		unquoted = mb[end:]
	}
	if strings.ContainsAny(unquoted, "<>") {
		fail("angle bracket outside a quoted string")
	}
}

// FuzzParseParams checks the ESMTP parameters parseParams returns, and
// decodeXtext on their values (ENVID, ORCPT) against a reference.
func FuzzParseParams(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		prefix := param{key: "PREV", value: "kept"}
		got, ok := parseParams(s, []param{prefix})
		if len(got) == 0 || got[0] != prefix {
			t.Fatalf("parseParams(%q) lost what dst held: %+v", s, got)
		}
		if s == "" && (!ok || len(got) != 1) {
			t.Fatalf("parseParams(\"\") = %+v, %v", got, ok)
		}
		got = got[1:]
		for _, p := range got {
			checkParam(t, s, p)
		}
		if !ok {
			return
		}
		// Written back with single spaces, the parameters read the same.
		var b strings.Builder
		for _, p := range got {
			b.WriteString(" " + p.key)
			if !p.bare {
				b.WriteString("=" + p.value)
			}
		}
		again, ok2 := parseParams(b.String(), nil)
		if !ok2 || len(again) != len(got) {
			t.Fatalf("parseParams(%q) = %+v; written back as %q it gives %+v, %v", s, got, b.String(), again, ok2)
		}
		for i := range got {
			if again[i] != got[i] {
				t.Fatalf("parseParams(%q) = %+v; written back as %q it gives %+v", s, got, b.String(), again)
			}
		}
		for _, p := range got {
			checkXtext(t, p.value)
			if _, addr, ok := strings.Cut(p.value, ";"); ok { // ORCPT=rfc822;addr
				checkXtext(t, addr)
			}
		}
	})
}

func checkParam(t *testing.T, s string, p param) {
	t.Helper()
	if p.key == "" || p.key != strings.ToUpper(p.key) {
		t.Fatalf("parseParams(%q): key %q not upper case or empty", s, p.key)
	}
	for i := 0; i < len(p.key); i++ {
		if c := p.key[i]; !(c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' && i > 0) {
			t.Fatalf("parseParams(%q): key %q is not an esmtp-keyword", s, p.key)
		}
	}
	for i := 0; i < len(p.value); i++ {
		if c := p.value[i]; c <= ' ' || c == '=' || c == 0x7f {
			t.Fatalf("parseParams(%q): value %q has byte %q", s, p.value, c)
		}
	}
	if p.bare != (p.value == "") {
		t.Fatalf("parseParams(%q): %+v: an empty value must be a bare keyword", s, p)
	}
}

// checkXtext compares decodeXtext with refXtext.
func checkXtext(t *testing.T, v string) {
	t.Helper()
	got, ok := decodeXtext(v)
	want, wantOK := refXtext(v)
	if ok != wantOK || ok && got != want {
		t.Fatalf("decodeXtext(%q) = %q, %v; want %q, %v", v, got, ok, want, wantOK)
	}
}

// refXtext decodes RFC 3461 §4 xtext: xchar is "!" to "~" except "+" and
// "=", hexchar is "+" and two upper-case hex digits. The result must be
// non-empty printable ASCII.
func refXtext(s string) (string, bool) {
	const hex = "0123456789ABCDEF"
	var out []byte
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '+':
			if i+2 >= len(s) {
				return "", false
			}
			hi, lo := strings.IndexByte(hex, s[i+1]), strings.IndexByte(hex, s[i+2])
			if hi < 0 || lo < 0 {
				return "", false
			}
			out = append(out, byte(hi<<4|lo))
			i += 2
		case c >= '!' && c <= '~' && c != '=':
			out = append(out, c)
		default:
			return "", false
		}
	}
	if len(out) == 0 {
		return "", false
	}
	for _, c := range out {
		if c < ' ' || c > '~' {
			return "", false
		}
	}
	return string(out), true
}

// Servers for FuzzDataReader with different size and line limits; readData
// only reads srv.opts.
var dataReaderServers = func() []*Server {
	var ss []*Server
	for _, o := range []struct {
		size int64
		line int
	}{{64 << 10, 1000}, {0, 1000}, {40, 10}, {5, 3}} {
		ss = append(ss, New(Options{Name: "fuzz", Hostname: "mx.test", Policy: Policy{MaxMessageSize: o.size, MaxLineLength: o.line,
			CommandTimeout: time.Minute, DataTimeout: time.Minute}}))
	}
	return ss
}()

// dataReaderBufSizes are the bufio sizes tried; 0 is a session's own.
var dataReaderBufSizes = [...]int{0, 16, 17, 18, 19, 23, 64, 4096}

const reply354 = "354 End data with <CR><LF>.<CR><LF>\r\n"

// FuzzDataReader feeds message data through readData, the reader behind
// DATA, on a session over a fake connection that hands out the input in
// chunks of fuzzed sizes, and compares it with refReadData.
func FuzzDataReader(f *testing.F) {
	f.Fuzz(checkDataReader)
}

// checkDataReader is one run of FuzzDataReader: cfg picks the limits and
// the size of the session's input buffer, chunks how the client sends.
func checkDataReader(t *testing.T, data []byte, cfg uint8, chunks uint64) {
	srv := dataReaderServers[int(cfg>>3)%len(dataReaderServers)]
	bufSize := dataReaderBufSizes[cfg&7]
	if bufSize == 0 {
		bufSize = max(readBufferSize, srv.opts.MaxLineLength+2)
	}
	c := &fakeConn{data: data, rng: chunks}
	s := &session{srv: srv, pol: srv.policy.Load(), raw: c, nc: c, r: bufio.NewReaderSize(c, bufSize), out: []byte(reply354)}
	c.sess = s
	var dst bytes.Buffer
	fnd, err := s.readData(&dst)

	if c.readBeforeFlush {
		t.Fatalf("readData(%q) read from the client before sending the 354 reply", data)
	}
	if got := c.written.String(); got != reply354 || len(s.out) != 0 {
		t.Fatalf("readData(%q): written %q, pending %q; want %q written", data, got, s.out, reply354)
	}
	if !c.deadlineSet {
		t.Fatalf("readData(%q) read without a deadline", data)
	}

	want, consumed, ended := refReadData(data)
	if !ended {
		if err == nil {
			t.Fatalf("readData(%q) found an end of data where there is none: read %q, left %q",
				data, dst.Bytes(), unread(s))
		}
		if !errors.Is(err, io.EOF) {
			t.Fatalf("readData(%q) = error %v, want EOF", data, err)
		}
		return
	}
	if err != nil {
		t.Fatalf("readData(%q) = error %v; want the end of data after %d bytes", data, err, consumed)
	}
	if rest := unread(s); !bytes.Equal(rest, data[consumed:]) {
		t.Fatalf("readData(%q) stopped at the wrong place: left %q unread, want %q", data, rest, data[consumed:])
	}
	limit, maxLine := srv.opts.MaxMessageSize, srv.opts.MaxLineLength
	wantTooBig := limit > 0 && int64(len(want)) > limit
	if fnd.tooBig != wantTooBig {
		t.Fatalf("readData(%q) with limit %d: tooBig = %v for %d bytes", data, limit, fnd.tooBig, len(want))
	}
	if wantTooBig {
		if !bytes.HasPrefix(want, dst.Bytes()) || int64(dst.Len()) > limit {
			t.Fatalf("readData(%q) with limit %d kept %q, want at most %d bytes of %q", data, limit, dst.Bytes(), limit, want)
		}
	} else if !bytes.Equal(dst.Bytes(), want) {
		t.Fatalf("readData(%q) = %q, want %q", data, dst.Bytes(), want)
	}
	raw := data[:consumed-len(dotCRLF)] // the data before un-stuffing, without the end-of-data line
	if w := refBare(raw); fnd.bare != w {
		t.Fatalf("readData(%q): bare = %v, want %v", data, fnd.bare, w)
	}
	if w := bytes.IndexByte(raw, 0) >= 0; fnd.nul != w {
		t.Fatalf("readData(%q): nul = %v, want %v", data, fnd.nul, w)
	}
	if w := refLongLine(want, maxLine); fnd.longLine != w {
		t.Fatalf("readData(%q) with line limit %d: longLine = %v, want %v", data, maxLine, fnd.longLine, w)
	}

	// What happens next to the message read: the BDAT scan finds the
	// same, and normalising leaves no bare line ending.
	if wantTooBig {
		return
	}
	sb := scanBody(want, maxLine)
	if sb.bare != fnd.bare || sb.nul != fnd.nul || sb.longLine != fnd.longLine {
		t.Fatalf("scanBody(%q) = %+v, readData found %+v", want, sb, fnd)
	}
	if hasBareLineEnding(want) != fnd.bare {
		t.Fatalf("hasBareLineEnding(%q) = %v, want %v", want, !fnd.bare, fnd.bare)
	}
	var norm bytes.Buffer
	normalizeLineEndings(&norm, want)
	if refBare(norm.Bytes()) || !fnd.bare && !bytes.Equal(norm.Bytes(), want) ||
		!bytes.Equal(stripLineEndings(norm.Bytes()), stripLineEndings(want)) {
		t.Fatalf("normalizeLineEndings(%q) = %q", want, norm.Bytes())
	}
}

// refReadData is the end of data spelled out: the data ends at the first
// ".\r\n" at the start of a line, where a line starts at the start of the
// data and after each CRLF; a line that starts with a dot loses it. It
// returns the message, how many bytes the data took with its end line, and
// whether it ended.
func refReadData(in []byte) (msg []byte, consumed int, ended bool) {
	end := -1
	for i := 0; i+3 <= len(in); i++ {
		atLineStart := i == 0 || i >= 2 && in[i-2] == '\r' && in[i-1] == '\n'
		if atLineStart && in[i] == '.' && in[i+1] == '\r' && in[i+2] == '\n' {
			end = i
			break
		}
	}
	if end < 0 {
		return nil, 0, false
	}
	msg = []byte{}
	for i := 0; i < end; i++ {
		atLineStart := i == 0 || i >= 2 && in[i-2] == '\r' && in[i-1] == '\n'
		if atLineStart && in[i] == '.' {
			continue
		}
		msg = append(msg, in[i])
	}
	return msg, end + 3, true
}

// refBare reports whether b has a CR not followed by LF or an LF not
// preceded by CR.
func refBare(b []byte) bool {
	for i, c := range b {
		if c == '\r' && (i+1 == len(b) || b[i+1] != '\n') || c == '\n' && (i == 0 || b[i-1] != '\r') {
			return true
		}
	}
	return false
}

// refLongLine reports whether a line of msg is longer than max bytes, not
// counting its ending: CRLF, or a bare CR or LF, as readData counts them.
func refLongLine(msg []byte, max int) bool {
	n := 0
	for i := 0; i < len(msg); i++ {
		if msg[i] == '\r' && i+1 < len(msg) && msg[i+1] == '\n' {
			n = 0
			i++
			continue
		}
		if msg[i] == '\r' || msg[i] == '\n' {
			n = 0 // a bare line ending ends a line too: it becomes CRLF when normalised
			continue
		}
		if n++; n > max {
			return true
		}
	}
	return false
}

func stripLineEndings(b []byte) []byte {
	return bytes.Map(func(r rune) rune {
		if r == '\r' || r == '\n' {
			return -1
		}
		return r
	}, b)
}

// unread returns what is left of the client's stream after readData.
func unread(s *session) []byte {
	b, _ := io.ReadAll(s.r)
	return b
}

// fakeConn is a client connection that sends data in chunks whose sizes a
// pseudo-random generator seeded with rng picks (rng 0: as much as asked),
// and checks that the session's pending replies are written before it
// reads.
type fakeConn struct {
	data            []byte
	pos             int
	rng             uint64
	sess            *session
	written         bytes.Buffer
	readBeforeFlush bool
	deadlineSet     bool
}

func (c *fakeConn) Read(p []byte) (int, error) {
	if c.sess != nil && len(c.sess.out) > 0 {
		c.readBeforeFlush = true
	}
	if c.pos >= len(c.data) {
		return 0, io.EOF
	}
	n := min(len(p), len(c.data)-c.pos)
	eofWithData := false
	if c.rng != 0 {
		c.rng ^= c.rng << 13
		c.rng ^= c.rng >> 7
		c.rng ^= c.rng << 17
		maxChunk := 1 + (c.rng>>56)%32
		n = min(n, 1+int(c.rng%maxChunk))
		eofWithData = c.rng&(1<<40) != 0
	}
	copy(p, c.data[c.pos:c.pos+n])
	c.pos += n
	if eofWithData && c.pos == len(c.data) {
		return n, io.EOF
	}
	return n, nil
}

func (c *fakeConn) Write(p []byte) (int, error) { return c.written.Write(p) }
func (c *fakeConn) Close() error                { return nil }
func (c *fakeConn) LocalAddr() net.Addr         { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 25} }
func (c *fakeConn) RemoteAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}
}
func (c *fakeConn) SetDeadline(t time.Time) error { return c.SetReadDeadline(t) }
func (c *fakeConn) SetReadDeadline(t time.Time) error {
	c.deadlineSet = !t.IsZero()
	return nil
}
func (c *fakeConn) SetWriteDeadline(time.Time) error { return nil }

// TestDataReplyBeforeWaitingRead: with a few bytes of the message already
// buffered (a client that sent them with DATA, as a trusted or
// authenticated one may), the 354 still goes out before a read that waits
// for the rest; otherwise client and server wait for each other until the
// data timeout.
func TestDataReplyBeforeWaitingRead(t *testing.T) {
	srv := dataReaderServers[0]
	c := &fakeConn{data: []byte("ab")}
	s := &session{srv: srv, pol: srv.policy.Load(), raw: c, nc: c, r: bufio.NewReaderSize(c, readBufferSize)}
	if _, err := s.r.Peek(2); err != nil { // "ab" arrived with the DATA command
		t.Fatal(err)
	}
	c.data = []byte("ab\r\n.\r\n")
	c.sess, s.out = s, []byte(reply354)
	var dst bytes.Buffer
	if _, err := s.readData(&dst); err != nil {
		t.Fatal(err)
	}
	if c.readBeforeFlush {
		t.Fatal("read from the client before the 354 was sent")
	}
	if dst.String() != "ab\r\n" || c.written.String() != reply354 {
		t.Fatalf("read %q, wrote %q", dst.String(), c.written.String())
	}
}
