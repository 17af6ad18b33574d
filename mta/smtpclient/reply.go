package smtpclient

import (
	"bufio"
	"encoding/base64"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/mtaproject/mta/mta"
)

const (
	maxLineLen    = 8192 // longest reply line accepted (RFC 5321 says 512)
	maxReplyLines = 200  // most lines in one reply
	maxReplyText  = 512  // Reply.Text is capped at this many bytes
)

// readReply reads one possibly multi-line reply (RFC 5321 §4.2.1) within
// timeout. The text of each line is kept in c.lines; Reply.Text joins the
// lines with spaces. An enhanced code at the start of the first line (RFC
// 3463, of the reply's class) goes to Reply.Enhanced and is stripped from
// every line that repeats it, whether or not the server advertised
// ENHANCEDSTATUSCODES, as Postfix reads them: many servers write them
// without saying so, and the code is what a bounce and the log classify by.
func (c *Conn) readReply(timeout time.Duration) (*mta.Reply, error) {
	if err := c.conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return nil, err
	}
	c.lines = c.lines[:0]
	code := 0
	for n := 0; ; n++ {
		line, err := c.readLine()
		if err != nil {
			return nil, err
		}
		if n == maxReplyLines {
			return nil, fmt.Errorf("%w: more than %d lines", ErrMalformedReply, maxReplyLines)
		}
		lc, more, ok := parseReplyLine(line)
		if !ok || (n > 0 && lc != code) {
			return nil, fmt.Errorf("%w: %q", ErrMalformedReply, clip(line, 80))
		}
		code = lc
		text := ""
		if len(line) > 4 {
			text = string(line[4:])
		}
		c.lines = append(c.lines, text)
		if !more {
			break
		}
	}
	r := &mta.Reply{Code: code}
	if e, _, ok := parseEnhanced(c.lines[0], code); ok {
		r.Enhanced = e
		for i, l := range c.lines {
			if le, rest, ok := parseEnhanced(l, code); ok && le == e {
				c.lines[i] = strings.TrimLeft(rest, " ")
			}
		}
	}
	r.Text = joinText(c.lines)
	return r, nil
}

// readLine returns the next line without its line ending. The slice is only
// valid until the next read.
func (c *Conn) readLine() ([]byte, error) {
	line, err := c.br.ReadSlice('\n')
	if err == bufio.ErrBufferFull {
		buf := append([]byte(nil), line...)
		for err == bufio.ErrBufferFull && len(buf) <= maxLineLen {
			line, err = c.br.ReadSlice('\n')
			buf = append(buf, line...)
		}
		if err == bufio.ErrBufferFull || len(buf) > maxLineLen {
			return nil, fmt.Errorf("%w: line longer than %d bytes", ErrMalformedReply, maxLineLen)
		}
		line = buf
	}
	if err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	line = line[:len(line)-1]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	return line, nil
}

// parseReplyLine parses "ddd", "ddd text" or "ddd-text". more is true for a
// continuation line. Codes must be 200 to 599: SMTP uses no others.
func parseReplyLine(line []byte) (code int, more, ok bool) {
	if len(line) < 3 {
		return 0, false, false
	}
	for _, b := range line[:3] {
		if b < '0' || b > '9' {
			return 0, false, false
		}
	}
	code = int(line[0]-'0')*100 + int(line[1]-'0')*10 + int(line[2]-'0')
	if code < 200 || code > 599 {
		return 0, false, false
	}
	if len(line) == 3 {
		return code, false, true
	}
	switch line[3] {
	case ' ':
		return code, false, true
	case '-':
		return code, true, true
	}
	return 0, false, false
}

// parseEnhanced parses an RFC 3463 code "c.s.d" at the start of text, whose
// class must match the reply code's first digit. rest is what follows it.
func parseEnhanced(text string, code int) (e mta.Enhanced, rest string, ok bool) {
	s := text
	for i := range 3 {
		n, digits := 0, 0
		for digits < len(s) && s[digits] >= '0' && s[digits] <= '9' {
			n = n*10 + int(s[digits]-'0')
			digits++
		}
		if digits == 0 || digits > 3 {
			return mta.Enhanced{}, text, false
		}
		e[i], s = n, s[digits:]
		if i < 2 {
			if s == "" || s[0] != '.' {
				return mta.Enhanced{}, text, false
			}
			s = s[1:]
		}
	}
	if (s != "" && s[0] != ' ') || e[0] != code/100 || e[0] == 3 {
		return mta.Enhanced{}, text, false
	}
	return e, s, true
}

// joinText joins the lines with spaces, replaces control characters and
// caps the result at maxReplyText bytes.
func joinText(lines []string) string {
	var b strings.Builder
	for i, l := range lines {
		l = strings.TrimSpace(l)
		if l == "" {
			continue
		}
		if i > 0 && b.Len() > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(l)
		if b.Len() >= maxReplyText {
			break
		}
	}
	s := b.String()
	if len(s) > maxReplyText {
		s = s[:maxReplyText] // a cut rune becomes "?" below
	}
	return strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f {
			return '?'
		}
		return r
	}, strings.ToValidUTF8(s, "?"))
}

func clip(b []byte, n int) string {
	if len(b) > n {
		b = b[:n]
	}
	return string(b)
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

// appendXtext appends s encoded as RFC 3461 §4 xtext: bytes outside "!" to
// "~", and "+" and "=", become "+HH".
func appendXtext(b []byte, s string) []byte {
	const hex = "0123456789ABCDEF"
	for i := 0; i < len(s); i++ {
		ch := s[i]
		if ch < '!' || ch > '~' || ch == '+' || ch == '=' {
			b = append(b, '+', hex[ch>>4], hex[ch&15])
		} else {
			b = append(b, ch)
		}
	}
	return b
}

// appendUTF8AddrXtext appends s encoded as RFC 6533 §3 utf-8-addr-xtext, for
// ORCPT type "utf-8": printable ASCII other than "+", "=" and "\" as is,
// every other character as "\x{HEX}" of its code point (upper-case hex).
func appendUTF8AddrXtext(b []byte, s string) []byte {
	for _, r := range s {
		if r > ' ' && r < 0x7f && r != '+' && r != '=' && r != '\\' {
			b = append(b, byte(r))
			continue
		}
		b = append(b, `\x{`...)
		n := len(b)
		b = strconv.AppendUint(b, uint64(r), 16)
		for i := n; i < len(b); i++ {
			if b[i] >= 'a' {
				b[i] -= 'a' - 'A'
			}
		}
		b = append(b, '}')
	}
	return b
}
