package mta

import (
	"errors"
	"strconv"
	"strings"
)

// Enhanced is an RFC 3463 enhanced status code, class.subject.detail.
type Enhanced [3]int

// String renders the code as "c.s.d", or "" for the zero value.
func (e Enhanced) String() string {
	if e == (Enhanced{}) {
		return ""
	}
	return string(e.append(make([]byte, 0, 12)))
}

func (e Enhanced) append(b []byte) []byte {
	b = strconv.AppendInt(b, int64(e[0]), 10)
	b = append(b, '.')
	b = strconv.AppendInt(b, int64(e[1]), 10)
	b = append(b, '.')
	return strconv.AppendInt(b, int64(e[2]), 10)
}

// Reply is one SMTP reply: a three-digit code (RFC 5321 §4.2), an optional
// enhanced status code (RFC 3463) and human-readable text. A Reply is also an
// error, so that a failure can carry the exact reply meant for a peer.
type Reply struct {
	Code     int      // RFC 5321 reply code, e.g. 250, 451, 550
	Enhanced Enhanced // RFC 3463 code; zero when not applicable
	Text     string   // single line of text, without the codes
	// Local marks a reply the client made up itself, without the server
	// saying it (a message over the server's SIZE, an extension it lacks):
	// a bounce must not quote it as the remote server's words.
	Local bool
}

// Error renders the reply as it would appear on the wire.
func (r *Reply) Error() string {
	// Built by hand: this runs for every recipient's outcome.
	b := make([]byte, 0, 4+12+len(r.Text))
	b = strconv.AppendInt(b, int64(r.Code), 10)
	b = append(b, ' ')
	if r.Enhanced != (Enhanced{}) {
		b = append(r.Enhanced.append(b), ' ')
	}
	return string(append(b, r.Text...))
}

// Permanent reports whether the reply is a 5xx permanent failure.
func (r *Reply) Permanent() bool { return r.Code >= 500 && r.Code < 600 }

// Temporary reports whether the reply is a 4xx transient failure.
func (r *Reply) Temporary() bool { return r.Code >= 400 && r.Code < 500 }

// TooManyRecipients reports whether the reply to a RCPT says that the
// transaction has reached the server's limit of recipients, not that this
// recipient is refused: 452 (RFC 5321 §4.5.3.1.10), with the enhanced code
// X.5.3 (RFC 3463) or none, or the 552 of RFC 821's list with X.5.3 or the
// words "too many recipients", which RFC 5321 asks clients to take as
// temporary. The recipients so refused are sent again in another
// transaction. A 452 with another enhanced code (4.2.2 mailbox full, 4.3.1
// system storage) is about the recipient or the server, not the limit.
func (r *Reply) TooManyRecipients() bool {
	switch r.Code {
	case 452:
		return r.Enhanced == (Enhanced{}) || r.Enhanced[1] == 5 && r.Enhanced[2] == 3
	case 552:
		return r.Enhanced[1] == 5 && r.Enhanced[2] == 3 || strings.Contains(strings.ToLower(r.Text), "too many recipients")
	}
	return false
}

// IsPermanent reports whether err is, or wraps, a permanent failure. Unknown
// errors are temporary: a message is never given up on because of an error
// nobody classified.
func IsPermanent(err error) bool {
	var r *Reply
	return errors.As(err, &r) && r.Permanent()
}

// ErrStorageFull is returned by a store that refuses new data because its
// disk is at or below the free-space reserve; the SMTP edge answers
// 452 4.3.1 (RFC 3463: mail system full).
var ErrStorageFull = errors.New("insufficient storage: free space below the reserve")

// ErrNotFound is returned for a queue ID the store does not hold.
var ErrNotFound = errors.New("no such message")
