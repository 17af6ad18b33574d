// Package dsn builds delivery status notifications (RFC 3464, in the
// multipart/report container of RFC 6522; RFC 6533 for SMTPUTF8 mail) and
// decides which ones a recipient's NOTIFY asks for (RFC 3461 §4.1).
//
// It owns only the format and that policy. It is pure: no I/O, no clock, no
// state; the caller (the spool, when it records an outcome) gives it the
// facts and stores what it returns.
package dsn

import (
	"bytes"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/mtaproject/mta/mta"
)

// Action is what happened to a recipient (RFC 3464 §2.3.3).
type Action string

// Actions.
const (
	Failed    Action = "failed"    // given up: a permanent refusal, or the queue lifetime ran out
	Delayed   Action = "delayed"   // still being retried
	Delivered Action = "delivered" // delivered to its mailbox here
	Relayed   Action = "relayed"   // handed to a server that does not offer DSN
)

// Wanted reports whether a recipient with NOTIFY n asks for a notification
// of action (RFC 3461 §4.1). With no NOTIFY, only failures are reported:
// RFC 3461 lets an MTA add delays, but a transactional sender that asked
// for nothing should get no warning mail it cannot act on.
func Wanted(n mta.Notify, a Action) bool {
	if n&mta.NotifyNever != 0 {
		return false
	}
	switch a {
	case Failed:
		return n == 0 || n&mta.NotifyFailure != 0
	case Delayed:
		return n&mta.NotifyDelay != 0
	case Delivered, Relayed:
		return n&mta.NotifySuccess != 0
	}
	return false
}

// Recipient is one recipient's part of a report.
type Recipient struct {
	Address   string // the recipient as it was sent (Final-Recipient)
	ORcptType string // ORCPT address type; "" when the client gave no ORCPT
	ORcpt     string // ORCPT address, xtext-decoded
	Action    Action
	// Reply is the outcome as the queue shows it: the remote reply or our
	// own reason, "550 5.1.1 text" when it has codes. It gives the Status
	// and the text of the human-readable part.
	Reply string
	// RemoteMTA is the host whose reply is Diagnostic; both are "" when
	// no remote server replied (the reason is ours).
	RemoteMTA  string
	Diagnostic string // the remote reply as received
	// LastAttempt is when the last attempt ended; zero when none was made.
	LastAttempt time.Time
	// WillRetryUntil is, for Delayed, when the queue lifetime runs out.
	WillRetryUntil time.Time
}

// Report is everything one notification says.
type Report struct {
	Hostname   string // ours: Reporting-MTA and the MAILER-DAEMON address
	ID         string // the notification's queue ID, for its Message-ID and boundary
	OriginalID string // the queue ID of the message reported on
	Sender     string // the original envelope sender: the notification's recipient
	EnvID      string // the original ENVID, xtext-decoded; "" when absent
	Ret        mta.Return
	SMTPUTF8   bool      // the original used SMTPUTF8: RFC 6533's global types
	Arrival    time.Time // when the original was accepted
	Date       time.Time // when this notification is made
	Recipients []Recipient
	// Original is the message reported on, as stored.
	Original []byte
	// MaxReturned is the largest original returned whole in a failure
	// notice; a larger one, and every other notice, returns its header.
	MaxReturned int
}

// Subject returns the notification's subject line, by the action of its
// first recipient.
func (r *Report) Subject() string {
	if len(r.Recipients) == 0 {
		return ""
	}
	switch r.Recipients[0].Action {
	case Failed:
		return "Undelivered Mail Returned to Sender"
	case Delayed:
		return "Delayed Mail (still being retried)"
	}
	return "Successful Mail Delivery Report"
}

// maxLine is where the text part and the report fields are wrapped: short
// enough for any reader, far below RFC 5322's 998 octets.
const maxLine = 78

// Build returns the notification message: a header and a multipart/report
// body, with CRLF line breaks and no line over 998 octets. It also reports
// whether the message has 8-bit octets (a returned 8-bit original, or
// UTF-8 text), which its transport must declare as 8BITMIME or SMTPUTF8.
func Build(r *Report) (msg []byte, eightBit bool) {
	text := r.humanText()
	var status bytes.Buffer
	r.writeStatus(&status)
	original, whole := r.returned()
	// The boundary must not occur in any part; the original is whatever
	// the sender wrote, so it is checked, not assumed.
	base := r.ID + "/" + r.Hostname
	if len(base) > 60 { // RFC 2046 §5.1.1: at most 70 characters
		base = r.ID + "/report"
	}
	boundary := base
	for n := 1; strings.Contains(text, boundary) || bytes.Contains(status.Bytes(), []byte(boundary)) ||
		bytes.Contains(original, []byte(boundary)); n++ {
		boundary = base + "/" + strconv.Itoa(n)
	}
	eightBit = !isASCII(text) || !isASCII(string(original)) || !isASCII(status.String())

	var b bytes.Buffer
	b.Grow(4096 + len(original))
	field := func(name, value string) { writeField(&b, name, value) }
	field("From", "Mail Delivery System <MAILER-DAEMON@"+r.Hostname+">")
	field("To", "<"+clean(r.Sender)+">")
	field("Subject", r.Subject())
	field("Date", r.Date.Format(time.RFC1123Z))
	field("Message-ID", "<"+r.ID+"@"+r.Hostname+">")
	if id := messageID(r.Original); id != "" {
		field("In-Reply-To", id)
		field("References", id)
	}
	field("Auto-Submitted", "auto-replied")
	field("MIME-Version", "1.0")
	reportType := "delivery-status" // the subtype of the second part (RFC 6522 §3)
	if r.SMTPUTF8 {
		reportType = "global-delivery-status"
	}
	field("Content-Type", `multipart/report; report-type=`+reportType+`; boundary="`+boundary+`"`)
	if eightBit {
		field("Content-Transfer-Encoding", "8bit") // RFC 2045 §6.4: a multipart says what its parts hold
	}
	b.WriteString("\r\nThis is a MIME-encapsulated message.\r\n\r\n")

	b.WriteString("--" + boundary + "\r\n")
	field("Content-Description", "Notification")
	if isASCII(text) {
		field("Content-Type", "text/plain; charset=us-ascii")
	} else {
		field("Content-Type", "text/plain; charset=utf-8")
		field("Content-Transfer-Encoding", "8bit")
	}
	b.WriteString("\r\n")
	b.WriteString(text)

	b.WriteString("\r\n--" + boundary + "\r\n")
	field("Content-Description", "Delivery report")
	if r.SMTPUTF8 {
		field("Content-Type", "message/global-delivery-status")
	} else {
		field("Content-Type", "message/delivery-status")
	}
	b.WriteString("\r\n")
	b.Write(status.Bytes())

	b.WriteString("\r\n--" + boundary + "\r\n")
	description := "Delivered Message" // unless a recipient's copy is not (failed, delayed)
	for _, rc := range r.Recipients {
		if rc.Action == Failed || rc.Action == Delayed {
			description = "Undelivered Message"
		}
	}
	switch {
	case whole && r.SMTPUTF8:
		field("Content-Description", description)
		field("Content-Type", "message/global")
	case whole:
		field("Content-Description", description)
		field("Content-Type", "message/rfc822")
	case r.SMTPUTF8:
		field("Content-Description", description+" Headers")
		field("Content-Type", "message/global-headers")
	default:
		field("Content-Description", description+" Headers")
		field("Content-Type", "text/rfc822-headers")
	}
	if !isASCII(string(original)) {
		field("Content-Transfer-Encoding", "8bit")
	}
	b.WriteString("\r\n")
	b.Write(original)
	if len(original) > 0 && !bytes.HasSuffix(original, []byte("\r\n")) {
		b.WriteString("\r\n")
	}
	b.WriteString("\r\n--" + boundary + "--\r\n")
	return b.Bytes(), eightBit || !isASCII(r.Sender)
}

// returned is the part of the original the notification carries: all of
// it for a failure with RET=FULL or no RET, up to MaxReturned octets (RET
// applies to failures only, RFC 3461 §4.3); else its header section.
func (r *Report) returned() (part []byte, whole bool) {
	failed := len(r.Recipients) > 0 && r.Recipients[0].Action == Failed
	if failed && r.Ret != mta.ReturnHeaders && len(r.Original) <= r.MaxReturned {
		return r.Original, true
	}
	h := header(r.Original)
	if r.MaxReturned > 0 && len(h) > r.MaxReturned {
		// A header larger than the cap is cut at a line boundary.
		cut := bytes.LastIndex(h[:r.MaxReturned], []byte("\r\n"))
		if cut < 0 {
			return nil, false // not even the first field fits
		}
		h = h[:cut+2]
	}
	return h, false
}

// humanText is the text/plain part: what happened, one paragraph per
// recipient, wrapped.
func (r *Report) humanText() string {
	var b strings.Builder
	para := func(s string) {
		for _, l := range wrap(s, maxLine) {
			b.WriteString(l)
			b.WriteString("\r\n")
		}
		b.WriteString("\r\n")
	}
	para("This is the mail system at host " + r.Hostname + ".")
	switch r.Recipients[0].Action {
	case Failed:
		para("I'm sorry to have to inform you that your message could not be delivered to one or more recipients. The details are below.")
		para("For further assistance, please send mail to postmaster. If you do so, please include this problem report.")
	case Delayed:
		until := r.Recipients[0].WillRetryUntil
		para("Your message could not be delivered for " + roundAge(r.Date.Sub(r.Arrival)) + ". It will be retried until it is " +
			roundAge(until.Sub(r.Arrival)) + " old (" + until.Format(time.RFC1123Z) + ").")
		para("This is only a warning: you do not need to send the message again.")
	default:
		para("Your message was successfully delivered to the destination(s) listed below. If the message was delivered to a mailbox you will receive no further notifications. Otherwise you may still receive notifications of delivery errors from other systems.")
	}
	para("Queue ID: " + r.OriginalID)
	for _, rc := range r.Recipients {
		what := rc.Reply
		if rc.RemoteMTA != "" {
			what = "host " + rc.RemoteMTA + " said: " + rc.Diagnostic
			if rc.Diagnostic != rc.Reply {
				what = rc.Reply + " (host " + rc.RemoteMTA + " said: " + rc.Diagnostic + ")"
			}
		}
		para("<" + clean(rc.Address) + ">: " + clean(what))
	}
	return b.String()
}

// writeStatus writes the message/delivery-status body: the per-message
// fields, then one block per recipient (RFC 3464 §2.1, fields in the order
// of its grammar). Without SMTPUTF8 the part is US-ASCII: a non-ASCII
// character from the network (a remote reply in UTF-8, an ORCPT) becomes
// "?" there; the text part keeps it.
func (r *Report) writeStatus(b *bytes.Buffer) {
	v := clean
	if !r.SMTPUTF8 {
		v = func(s string) string { return asciiOnly(clean(s)) }
	}
	field := func(name, value string) { writeField(b, name, value) }
	if r.EnvID != "" {
		field("Original-Envelope-Id", v(r.EnvID))
	}
	field("Reporting-MTA", "dns; "+r.Hostname)
	if !r.Arrival.IsZero() {
		field("Arrival-Date", r.Arrival.Format(time.RFC1123Z))
	}
	field("X-Queue-ID", r.OriginalID)
	for _, rc := range r.Recipients {
		b.WriteString("\r\n")
		if rc.ORcptType != "" {
			field("Original-Recipient", strings.ToLower(v(rc.ORcptType))+"; "+v(rc.ORcpt))
		}
		field("Final-Recipient", addressType(rc.Address)+"; "+v(rc.Address))
		field("Action", string(rc.Action))
		field("Status", Status(rc.Action, rc.Reply).String())
		if rc.RemoteMTA != "" {
			field("Remote-MTA", "dns; "+v(rc.RemoteMTA))
			field("Diagnostic-Code", "smtp; "+v(rc.Diagnostic))
		}
		if !rc.LastAttempt.IsZero() {
			field("Last-Attempt-Date", rc.LastAttempt.Format(time.RFC1123Z))
		}
		if rc.Action == Delayed && !rc.WillRetryUntil.IsZero() {
			field("Will-Retry-Until", rc.WillRetryUntil.Format(time.RFC1123Z))
		}
	}
}

// asciiOnly replaces every non-ASCII character of s by "?".
func asciiOnly(s string) string {
	if isASCII(s) {
		return s
	}
	return strings.Map(func(r rune) rune {
		if r >= 0x80 {
			return '?'
		}
		return r
	}, s)
}

// Status returns the RFC 3463 status of a recipient whose outcome is reply:
// the reply's enhanced code when it has one, else one derived from its
// reply code, and in any case of the class action implies (5 failed, 4
// delayed, 2 delivered or relayed).
func Status(a Action, reply string) mta.Enhanced {
	class := 5
	switch a {
	case Delayed:
		class = 4
	case Delivered, Relayed:
		class = 2
	}
	st := mta.Enhanced{class, 0, 0}
	code, rest, _ := strings.Cut(reply, " ")
	if len(code) == 3 && code[0] >= '2' && code[0] <= '5' {
		if e, ok := parseEnhanced(rest); ok {
			st = e
		}
	}
	st[0] = class
	return st
}

// parseEnhanced reads a leading "c.s.d" from s.
func parseEnhanced(s string) (mta.Enhanced, bool) {
	word, _, _ := strings.Cut(s, " ")
	parts := strings.Split(word, ".")
	if len(parts) != 3 {
		return mta.Enhanced{}, false
	}
	var e mta.Enhanced
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 || len(p) > 3 {
			return mta.Enhanced{}, false
		}
		e[i] = n
	}
	return e, e[0] >= 2 && e[0] <= 5
}

// header returns msg's header section with the line break that ends it.
func header(msg []byte) []byte {
	if i := bytes.Index(msg, []byte("\r\n\r\n")); i >= 0 {
		return msg[:i+2]
	}
	return msg
}

// messageID returns the Message-ID of msg's header ("<…>"), or "".
func messageID(msg []byte) string {
	lines := strings.Split(string(header(msg)), "\r\n")
	for i, line := range lines {
		name, value, ok := strings.Cut(line, ":")
		if !ok || !strings.EqualFold(strings.TrimSpace(name), "Message-ID") {
			continue
		}
		for _, next := range lines[i+1:] { // the value may be folded
			if next == "" || (next[0] != ' ' && next[0] != '\t') {
				break
			}
			value += next
		}
		start, end := strings.IndexByte(value, '<'), strings.IndexByte(value, '>')
		if start < 0 || end < start || end-start > 900 {
			return ""
		}
		id := value[start : end+1]
		if !isASCII(id) || strings.ContainsAny(id, " \t") {
			return ""
		}
		return id
	}
	return ""
}

// addressType is the address type of a Final-Recipient: "utf-8" for an
// internationalised address (RFC 6533 §3), else "rfc822".
func addressType(addr string) string {
	if isASCII(addr) {
		return "rfc822"
	}
	return "utf-8"
}

// writeField writes one header-style field, folded at spaces so that no
// line is longer than maxLine where the value allows it.
func writeField(b *bytes.Buffer, name, value string) {
	for i, l := range wrap(name+": "+value, maxLine) {
		if i > 0 {
			b.WriteString(" ")
		}
		b.WriteString(l)
		b.WriteString("\r\n")
	}
}

// wrap breaks s into lines of at most width octets at spaces. A word longer
// than width stays whole up to 990 octets and is cut there, so that no line
// exceeds RFC 5322's 998.
func wrap(s string, width int) []string {
	var out []string
	for len(s) > width {
		cut := strings.LastIndexByte(s[:width+1], ' ')
		if cut <= 0 {
			cut = strings.IndexByte(s, ' ')
			if cut < 0 || cut > 990 {
				if len(s) <= 990 {
					break
				}
				cut = 990
				for cut > 0 && !utf8.RuneStart(s[cut]) {
					cut--
				}
				out = append(out, s[:cut])
				s = s[cut:]
				continue
			}
		}
		out = append(out, s[:cut])
		s = strings.TrimLeft(s[cut:], " ")
	}
	if s != "" || len(out) == 0 {
		out = append(out, s)
	}
	return out
}

// clean replaces control characters (CR, LF, NUL, …) by spaces: fields
// come from the network and must not break the report's structure.
func clean(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

// roundAge renders a duration for people: "4 hours", "2 days", "30 seconds".
func roundAge(d time.Duration) string {
	plural := func(n int, unit string) string {
		if n == 1 {
			return "1 " + unit
		}
		return strconv.Itoa(n) + " " + unit + "s"
	}
	switch {
	case d >= 48*time.Hour:
		return plural(int(d/(24*time.Hour)), "day")
	case d >= 2*time.Hour:
		return plural(int(d/time.Hour), "hour")
	case d >= 2*time.Minute:
		return plural(int(d/time.Minute), "minute")
	}
	return plural(int(max(d, 0)/time.Second), "second")
}
