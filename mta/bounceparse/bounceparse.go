// Package bounceparse reads the reports that come back to a return path
// after delivery: RFC 3464 delivery status notifications (and RFC 6533's
// message/global-delivery-status), RFC 5965 ARF feedback reports
// (complaints), and the common non-standard bounces as far as its rules
// recognise them. It is pure: bytes in, a Report out.
package bounceparse

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"io"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/mail"
	"net/textproto"
	"regexp"
	"strings"
)

// Kinds of report.
const (
	Bounce    = "bounce"    // a delivery failed (or was delayed: see Recipient.Action)
	Complaint = "complaint" // a recipient reported the message (ARF)
)

// Report is what a returned message says.
type Report struct {
	Kind       string
	Recipients []Recipient
	// FeedbackType is the ARF Feedback-Type (abuse, fraud, …).
	FeedbackType string
	// Original holds header fields of the message the report is about,
	// when it includes them (Message-ID, Return-Path, From, To).
	Original mail.Header
	// OriginalMailFrom is the ARF Original-Mail-From: the return path the
	// reported message was sent with.
	OriginalMailFrom string
	// Standard is false when the report was recognised by a rule rather
	// than read from a machine-readable part.
	Standard bool
}

// Recipient is one recipient a report names.
type Recipient struct {
	Address    string // Final-Recipient (or Original-Recipient)
	Original   string // Original-Recipient, when given
	Action     string // failed, delayed, delivered, relayed, expanded
	Status     string // enhanced status code, e.g. 5.1.1
	Diagnostic string // the remote server's words, when given
}

// Rule recognises a non-standard bounce by its text.
type Rule struct {
	Status  string         // what a match means: an enhanced code such as 5.1.1 or 4.2.2
	Pattern *regexp.Regexp // matched case-blind against the text parts
}

// DefaultRules recognise the usual wording of bounces without a
// delivery-status part.
var DefaultRules = []Rule{
	{"5.1.1", regexp.MustCompile(`(?i)(user unknown|unknown user|no such user|mailbox (is )?unavailable|does not exist|recipient address rejected|invalid recipient|no mailbox here)`)},
	{"5.2.2", regexp.MustCompile(`(?i)(mailbox (is )?full|over ?quota|quota exceeded|insufficient storage)`)},
	{"5.2.1", regexp.MustCompile(`(?i)(account (has been )?disabled|mailbox disabled|account is inactive)`)},
	{"5.1.2", regexp.MustCompile(`(?i)(host (or domain name )?not found|domain (does not exist|not found)|no such domain)`)},
}

// ParseRules reads a rule file: one rule per line, "STATUS REGEXP", with
// blank lines and lines starting with # ignored.
func ParseRules(r io.Reader) ([]Rule, error) {
	var out []Rule
	sc := bufio.NewScanner(r)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		status, pat, ok := strings.Cut(line, " ")
		if !ok || !statusRE.MatchString(status) {
			return nil, errors.New("line " + itoa(n) + ": want STATUS REGEXP, with STATUS like 5.1.1")
		}
		re, err := regexp.Compile("(?i)" + strings.TrimSpace(pat))
		if err != nil {
			return nil, errors.New("line " + itoa(n) + ": " + err.Error())
		}
		out = append(out, Rule{Status: status, Pattern: re})
	}
	return out, sc.Err()
}

var statusRE = regexp.MustCompile(`^[245]\.\d{1,3}\.\d{1,3}$`)

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var b []byte
	for ; n > 0; n /= 10 {
		b = append([]byte{byte('0' + n%10)}, b...)
	}
	return string(b)
}

// ErrNotAReport says the message is neither a report nor matched by a
// rule.
var ErrNotAReport = errors.New("bounceparse: not a bounce or feedback report")

// maxParts bounds the MIME parts looked at, against a message built to
// make the parser work.
const maxParts = 50

// Parse reads msg. Rules are tried when no machine-readable part is found;
// nil means DefaultRules.
func Parse(msg []byte, rules []Rule) (*Report, error) {
	if rules == nil {
		rules = DefaultRules
	}
	m, err := mail.ReadMessage(bytes.NewReader(msg))
	if err != nil {
		return nil, err
	}
	rep := &Report{}
	var texts []string
	parts := 0
	var walk func(h textproto.MIMEHeader, body io.Reader, depth int) error
	walk = func(h textproto.MIMEHeader, body io.Reader, depth int) error {
		if parts++; parts > maxParts || depth > 5 {
			return nil
		}
		body = decoded(h, body)
		mt, params, err := mime.ParseMediaType(h.Get("Content-Type"))
		if err != nil {
			mt = "text/plain"
		}
		switch {
		case strings.HasPrefix(mt, "multipart/"):
			mr := multipart.NewReader(body, params["boundary"])
			for {
				p, err := mr.NextPart()
				if err != nil {
					return nil
				}
				if err := walk(p.Header, p, depth+1); err != nil {
					return err
				}
			}
		case mt == "message/delivery-status" || mt == "message/global-delivery-status":
			b, _ := io.ReadAll(io.LimitReader(body, 1<<20))
			rep.Kind, rep.Standard = Bounce, true
			rep.Recipients = append(rep.Recipients, deliveryStatus(b)...)
		case mt == "message/feedback-report":
			b, _ := io.ReadAll(io.LimitReader(body, 1<<20))
			rep.Kind, rep.Standard = Complaint, true
			rep.feedback(b)
		case mt == "message/rfc822" || mt == "text/rfc822-headers" || mt == "message/global" || mt == "message/global-headers":
			if om, err := mail.ReadMessage(io.LimitReader(body, 1<<20)); err == nil {
				rep.Original = om.Header
			}
		case strings.HasPrefix(mt, "text/"):
			b, _ := io.ReadAll(io.LimitReader(body, 256<<10))
			texts = append(texts, string(b))
		}
		return nil
	}
	if err := walk(textproto.MIMEHeader(m.Header), m.Body, 0); err != nil {
		return nil, err
	}
	if rep.Kind != "" {
		return rep, nil
	}
	// Not machine-readable: a rule decides, and the recipient is the
	// first address the text names. But a vacation or other auto-reply
	// (RFC 3834: Auto-Submitted: auto-replied, with no report part) says
	// nothing about the address, whatever its wording.
	if autoReply(m.Header) {
		return nil, ErrNotAReport
	}
	text := strings.Join(texts, "\n")
	for _, r := range rules {
		if r.Pattern.MatchString(text) {
			rep.Kind = Bounce
			rcpt := Recipient{Action: "failed", Status: r.Status, Diagnostic: firstLine(r.Pattern.FindString(text))}
			if r.Status[0] == '4' {
				rcpt.Action = "delayed"
			}
			if a := addressRE.FindString(text); a != "" {
				rcpt.Address = a
			}
			rep.Recipients = []Recipient{rcpt}
			return rep, nil
		}
	}
	return nil, ErrNotAReport
}

// decoded undoes a part's Content-Transfer-Encoding (multipart.Reader
// undoes quoted-printable itself, but not at the top level, and never
// base64).
func decoded(h textproto.MIMEHeader, body io.Reader) io.Reader {
	switch strings.ToLower(strings.TrimSpace(h.Get("Content-Transfer-Encoding"))) {
	case "base64":
		return base64.NewDecoder(base64.StdEncoding, newlineStripper{body})
	case "quoted-printable":
		return quotedprintable.NewReader(body)
	}
	return body
}

// newlineStripper drops the line breaks of base64 text.
type newlineStripper struct{ r io.Reader }

func (s newlineStripper) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	out := p[:0]
	for _, c := range p[:n] {
		if c != '\r' && c != '\n' && c != ' ' && c != '\t' {
			out = append(out, c)
		}
	}
	return len(out), err
}

var addressRE = regexp.MustCompile(`[A-Za-z0-9._%+=-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}`)

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	return strings.TrimSpace(s)
}

// deliveryStatus reads the per-recipient field groups of a
// delivery-status part (the first group is per message).
func deliveryStatus(b []byte) []Recipient {
	var out []Recipient
	groups := strings.Split(strings.ReplaceAll(string(b), "\r\n", "\n"), "\n\n")
	for _, g := range groups {
		f := fields(g)
		addr := typedValue(f["final-recipient"])
		if addr == "" {
			addr = typedValue(f["original-recipient"])
		}
		if addr == "" {
			continue
		}
		status := strings.Fields(f["status"] + " ")
		r := Recipient{Address: addr, Original: typedValue(f["original-recipient"]), Action: strings.ToLower(strings.TrimSpace(f["action"])),
			Diagnostic: typedValue(f["diagnostic-code"])}
		if len(status) > 0 {
			r.Status = status[0]
		}
		out = append(out, r)
	}
	return out
}

func (rep *Report) feedback(b []byte) {
	f := fields(strings.ReplaceAll(string(b), "\r\n", "\n"))
	rep.FeedbackType = strings.ToLower(strings.TrimSpace(f["feedback-type"]))
	if a := strings.Trim(strings.TrimSpace(f["original-rcpt-to"]), "<>"); a != "" {
		rep.Recipients = append(rep.Recipients, Recipient{Address: a, Action: "complained"})
	}
	rep.OriginalMailFrom = strings.Trim(strings.TrimSpace(f["original-mail-from"]), "<>")
}

// maxFieldValue caps the value of one field of a report: a real
// Diagnostic-Code is a few hundred bytes, and a hostile report folded over
// many lines must not cost time in proportion to the square of its size.
const maxFieldValue = 4096

// fields reads "Name: value" lines with continuation lines, names lower
// case; the first of a repeated name wins. Values are capped at
// maxFieldValue bytes.
func fields(g string) map[string]string {
	out := map[string]string{}
	var last string
	for _, line := range strings.Split(g, "\n") {
		if line == "" {
			continue
		}
		if (line[0] == ' ' || line[0] == '\t') && last != "" {
			if v := out[last]; len(v) < maxFieldValue {
				out[last] = capValue(v + " " + strings.TrimSpace(line))
			}
			continue
		}
		name, value, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		last = strings.ToLower(strings.TrimSpace(name))
		if _, seen := out[last]; !seen {
			out[last] = capValue(strings.TrimSpace(value))
		} else {
			last = ""
		}
	}
	return out
}

// autoReply reports whether a message is a vacation or other auto-reply:
// Auto-Submitted: auto-replied (RFC 3834), or the fields that responders
// without it write (X-Autoreply, X-Autorespond, Precedence: auto_reply).
func autoReply(h mail.Header) bool {
	if strings.HasPrefix(strings.ToLower(strings.TrimSpace(h.Get("Auto-Submitted"))), "auto-replied") {
		return true
	}
	if h.Get("X-Autoreply") != "" || h.Get("X-Autorespond") != "" {
		return true
	}
	return strings.EqualFold(strings.TrimSpace(h.Get("Precedence")), "auto_reply")
}

// capValue cuts v to maxFieldValue bytes, on a character boundary.
func capValue(v string) string {
	if len(v) <= maxFieldValue {
		return v
	}
	return strings.ToValidUTF8(v[:maxFieldValue], "")
}

// typedValue strips the address or diagnostic type ("rfc822;", "smtp;").
func typedValue(v string) string {
	if _, rest, ok := strings.Cut(v, ";"); ok {
		v = rest
	}
	return strings.Trim(strings.TrimSpace(v), "<>")
}
