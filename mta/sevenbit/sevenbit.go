// Package sevenbit converts a message with an 8-bit body into one a server
// without 8BITMIME may receive (RFC 6152 §3): every MIME part whose body
// holds octets above 127 is re-encoded as quoted-printable, and the rest of
// the message is left byte for byte as it was.
//
// It owns only that conversion. It is pure: no I/O, no state. What it
// cannot convert safely it refuses with an error, so that the caller can
// bounce the message instead of sending something the recipient would read
// differently: 8-bit octets in a header, a multipart without a boundary,
// message/global (which only SMTPUTF8 may carry), 8-bit octets in a part
// that claims to be base64 or quoted-printable already, and nesting deeper
// than MaxDepth. When Convert succeeds, its output has no 8-bit octet.
package sevenbit

import (
	"bytes"
	"errors"
	"fmt"
	"mime"
	"strings"
)

// MaxDepth is how deeply multiparts and message/rfc822 parts may nest
// before Convert gives up.
const MaxDepth = 32

// ErrHeader8Bit is returned when a header, at the top or in a part, holds
// 8-bit octets: header text has no transfer encoding to convert to short of
// rewriting it as RFC 2047 words, which would change what the sender wrote.
var ErrHeader8Bit = errors.New("8-bit octets in a header")

// Needed reports whether msg has 8-bit octets in its body, that is after the
// first empty line. Header octets do not count: they are SMTPUTF8's business
// (RFC 6531), not 8BITMIME's.
func Needed(msg []byte) bool {
	_, body := splitEntity(msg)
	return has8Bit(body)
}

// Convert returns msg with every 8-bit part body re-encoded as
// quoted-printable and its Content-Transfer-Encoding changed to match; a
// multipart or message/rfc822 that declared 8bit or binary is relabelled
// 7bit. A message without MIME headers gets "MIME-Version: 1.0" and
// "Content-Type: text/plain; charset=unknown-8bit" (RFC 1428), since the
// default us-ascii would misstate it. Line breaks may be LF or CRLF; the
// converted parts use CRLF. When msg needs no conversion it is returned as
// it is.
func Convert(msg []byte) ([]byte, error) {
	if !Needed(msg) {
		return msg, nil
	}
	var out bytes.Buffer
	out.Grow(len(msg) + len(msg)/8)
	if err := convertEntity(&out, msg, "text/plain", 0, true); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// convertEntity writes entity (a header, an empty line and a body) to out,
// converted. defaultType is the content type that applies when the header
// names none (message/rfc822 inside multipart/digest).
func convertEntity(out *bytes.Buffer, entity []byte, defaultType string, depth int, top bool) error {
	if depth > MaxDepth {
		return fmt.Errorf("MIME parts nest deeper than %d levels", MaxDepth)
	}
	header, body := splitEntity(entity)
	if has8Bit(header) {
		return ErrHeader8Bit
	}
	if !has8Bit(body) {
		out.Write(entity)
		return nil
	}
	mediaType, params := defaultType, map[string]string(nil)
	declared := field(header, "Content-Type")
	if declared != "" {
		mt, p, err := mime.ParseMediaType(declared)
		if err != nil {
			// RFC 2045 §5.2: an unreadable Content-Type counts as text/plain.
			mt, p = "text/plain", nil
		}
		mediaType, params = mt, p
	}
	encoding := strings.ToLower(strings.TrimSpace(field(header, "Content-Transfer-Encoding")))
	sep := separator(entity, len(header))

	switch {
	case strings.HasPrefix(mediaType, "multipart/"):
		boundary := params["boundary"]
		if boundary == "" {
			return fmt.Errorf("%s without a boundary", mediaType)
		}
		writeHeader(out, header, encoding, "7bit", false)
		out.WriteString(sep)
		inner := "text/plain"
		if mediaType == "multipart/digest" {
			inner = "message/rfc822"
		}
		return convertMultipart(out, body, boundary, inner, depth)
	case mediaType == "message/rfc822":
		writeHeader(out, header, encoding, "7bit", false)
		out.WriteString(sep)
		// The body is a message: without MIME headers of its own it gets
		// them as the top level does.
		return convertEntity(out, body, "text/plain", depth+1, true)
	case strings.HasPrefix(mediaType, "message/"):
		return fmt.Errorf("%s part with 8-bit octets", mediaType)
	case encoding == "base64" || encoding == "quoted-printable":
		return fmt.Errorf("%s part with 8-bit octets", encoding)
	}
	writeHeader(out, header, encoding, "quoted-printable", top && declared == "")
	out.WriteString(sep)
	encodeQP(out, body, encoding == "binary")
	return nil
}

// qpLine is the longest encoded line, the soft line break's "=" included
// (RFC 2045 §6.7 rule 5).
const qpLine = 76

// encodeQP writes b as quoted-printable (RFC 2045 §6.7). In text mode CRLF
// and LF are line breaks, written as CRLF; in binary mode every octet is
// data. Besides what the RFC requires, a "-" or "." that would begin an
// encoded line is encoded too, so that no encoded line can be read as a
// multipart boundary ("--…") however the soft breaks fall, nor need
// dot-stuffing.
func encodeQP(out *bytes.Buffer, b []byte, binary bool) {
	const hex = "0123456789ABCDEF"
	col := 0 // octets on the current encoded line
	emit := func(tok []byte) {
		if col+len(tok) > qpLine-1 {
			out.WriteString("=\r\n")
			col = 0
		}
		if col == 0 && (tok[0] == '-' || tok[0] == '.') {
			tok = []byte{'=', hex[tok[0]>>4], hex[tok[0]&15]}
		}
		out.Write(tok)
		col += len(tok)
	}
	for i := 0; i < len(b); i++ {
		c := b[i]
		if !binary {
			if c == '\n' || c == '\r' && i+1 < len(b) && b[i+1] == '\n' {
				if c == '\r' {
					i++
				}
				out.WriteString("\r\n")
				col = 0
				continue
			}
		}
		atEnd := binary && i == len(b)-1 || !binary && (i+1 == len(b) || b[i+1] == '\n' || b[i+1] == '\r' && i+2 < len(b) && b[i+2] == '\n')
		switch {
		case (c == ' ' || c == '\t') && !atEnd:
			emit([]byte{c})
		case c >= 33 && c <= 126 && c != '=':
			emit([]byte{c})
		default:
			emit([]byte{'=', hex[c>>4], hex[c&15]})
		}
	}
}

// convertMultipart converts the parts of a multipart body. The delimiter
// lines are copied unchanged (RFC 2046 §5.1.1: the CRLF before a delimiter
// belongs to the delimiter, not to the part), the preamble and epilogue as
// writeIgnored says.
func convertMultipart(out *bytes.Buffer, body []byte, boundary, inner string, depth int) error {
	delim := []byte("--" + boundary)
	start := -1 // start of the current part's content, or -1 before the first delimiter
	for pos := 0; pos < len(body); {
		end := bytes.IndexByte(body[pos:], '\n')
		next := len(body)
		if end >= 0 {
			next = pos + end + 1
		}
		line := body[pos:next]
		if isDelimiter(line, delim) {
			if start >= 0 {
				content := trimLineBreak(body[start:pos])
				if err := convertEntity(out, content, inner, depth+1, false); err != nil {
					return err
				}
				out.Write(body[start+len(content) : pos])
			} else {
				writeIgnored(out, body[:pos])
			}
			out.Write(line)
			if isClose(line, delim) {
				writeIgnored(out, body[next:])
				return nil
			}
			start = next
		}
		pos = next
	}
	// No close delimiter: convert what follows the last delimiter as the
	// last part, as readers do.
	if start < 0 {
		writeIgnored(out, body)
		return nil
	}
	return convertEntity(out, body[start:], inner, depth+1, false)
}

// writeIgnored writes a preamble or an epilogue, which MIME readers ignore
// (RFC 2046 §5.1.1), with each 8-bit octet replaced by "?": they have no
// transfer encoding, and this keeps the output 7-bit.
func writeIgnored(out *bytes.Buffer, b []byte) {
	for _, c := range b {
		if c >= 0x80 {
			c = '?'
		}
		out.WriteByte(c)
	}
}

// isDelimiter reports whether line is "--boundary" or "--boundary--",
// possibly followed by white space, ending the line.
func isDelimiter(line, delim []byte) bool {
	if !bytes.HasPrefix(line, delim) {
		return false
	}
	rest := bytes.TrimPrefix(line[len(delim):], []byte("--"))
	return len(bytes.TrimRight(rest, " \t\r\n")) == 0
}

func isClose(line, delim []byte) bool {
	return bytes.HasPrefix(line[len(delim):], []byte("--"))
}

// trimLineBreak removes one final CRLF or LF.
func trimLineBreak(b []byte) []byte {
	b = bytes.TrimSuffix(b, []byte("\n"))
	return bytes.TrimSuffix(b, []byte("\r"))
}

// splitEntity splits an entity into its header (with the line break of its
// last field) and its body (after the empty line). An entity with no empty
// line is all header.
func splitEntity(entity []byte) (header, body []byte) {
	for _, lead := range []string{"\r\n", "\n"} {
		if bytes.HasPrefix(entity, []byte(lead)) {
			return nil, entity[len(lead):]
		}
	}
	i := bytes.Index(entity, []byte("\n\r\n"))
	j := bytes.Index(entity, []byte("\n\n"))
	switch {
	case i >= 0 && (j < 0 || i < j):
		return entity[:i+1], entity[i+3:]
	case j >= 0:
		return entity[:j+1], entity[j+2:]
	}
	return entity, nil
}

// separator returns the empty line that follows a header of headerLen
// octets in entity.
func separator(entity []byte, headerLen int) string {
	if bytes.HasPrefix(entity[headerLen:], []byte("\r\n")) {
		return "\r\n"
	}
	return "\n"
}

// field returns the unfolded value of the first header field called name.
func field(header []byte, name string) string {
	var value []byte
	found := false
	for _, line := range bytes.SplitAfter(header, []byte("\n")) {
		if found {
			if len(line) > 0 && (line[0] == ' ' || line[0] == '\t') {
				value = append(value, trimLineBreak(line)...)
				continue
			}
			break
		}
		if colon := bytes.IndexByte(line, ':'); colon > 0 &&
			strings.EqualFold(string(bytes.TrimRight(line[:colon], " \t")), name) {
			found = true
			value = append(value, trimLineBreak(line[colon+1:])...)
		}
	}
	return strings.TrimSpace(string(value))
}

// writeHeader writes header with its Content-Transfer-Encoding set to
// encoding. The field is rewritten only when it was there with another
// value, and added only when it was missing and the new value is not 7bit
// (the default). addMIME adds the MIME-Version and Content-Type a message
// without them needs once its body is encoded.
func writeHeader(out *bytes.Buffer, header []byte, old, encoding string, addMIME bool) {
	skipping := false
	for _, line := range bytes.SplitAfter(header, []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		if skipping && (line[0] == ' ' || line[0] == '\t') {
			continue
		}
		skipping = false
		if colon := bytes.IndexByte(line, ':'); colon > 0 &&
			strings.EqualFold(string(bytes.TrimRight(line[:colon], " \t")), "Content-Transfer-Encoding") {
			skipping = true
			continue
		}
		out.Write(line)
	}
	if addMIME {
		if field(header, "MIME-Version") == "" {
			out.WriteString("MIME-Version: 1.0\r\n")
		}
		out.WriteString("Content-Type: text/plain; charset=unknown-8bit\r\n")
	}
	if old != "" || encoding != "7bit" {
		out.WriteString("Content-Transfer-Encoding: " + encoding + "\r\n")
	}
}

func has8Bit(b []byte) bool {
	for _, c := range b {
		if c >= 0x80 {
			return true
		}
	}
	return false
}
