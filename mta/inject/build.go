package inject

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	htmltemplate "html/template"
	"io"
	"maps"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/mail"
	"net/textproto"
	"slices"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

// reservedHeaders are set by the builder; Headers may not set them.
var reservedHeaders = map[string]bool{
	"From": true, "To": true, "Cc": true, "Bcc": true, "Reply-To": true, "Subject": true, "Date": true,
	"Message-Id": true, "Mime-Version": true, "Content-Type": true, "Content-Transfer-Encoding": true,
	"Received": true, "Return-Path": true, "Dkim-Signature": true,
}

// compiled is a Builder with its templates parsed, ready to render one
// message per recipient.
type compiled struct {
	from, replyTo *mail.Address
	subject       *template.Template
	text          *template.Template // nil: no text part
	html          *htmltemplate.Template
	headers       []compiledHeader
	attachments   []Attachment
}

type compiledHeader struct {
	name  string
	value *template.Template
}

// compile checks a Builder and parses its templates. Its errors name the
// field at fault.
func compile(b *Builder) (*compiled, error) {
	c := &compiled{attachments: b.Attachments}
	var err error
	if c.from, err = mail.ParseAddress(b.From); err != nil {
		return nil, fmt.Errorf("message.from: %q: %v", b.From, err)
	}
	if b.ReplyTo != "" {
		if c.replyTo, err = mail.ParseAddress(b.ReplyTo); err != nil {
			return nil, fmt.Errorf("message.reply_to: %q: %v", b.ReplyTo, err)
		}
	}
	if b.Text == "" && b.HTML == "" {
		return nil, errors.New("message: give text, html or both")
	}
	parse := func(field, src string) (*template.Template, error) {
		t, err := template.New(field).Option("missingkey=error").Funcs(safeFuncs).Parse(src)
		if err == nil {
			err = bounded(t.Tree, len(t.Templates()))
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %v", field, err)
		}
		return t, nil
	}
	if c.subject, err = parse("message.subject", b.Subject); err != nil {
		return nil, err
	}
	if b.Text != "" {
		if c.text, err = parse("message.text", b.Text); err != nil {
			return nil, err
		}
	}
	if b.HTML != "" {
		if c.html, err = htmltemplate.New("message.html").Option("missingkey=error").Funcs(safeFuncs).Parse(b.HTML); err == nil {
			err = bounded(c.html.Tree, len(c.html.Templates()))
		}
		if err != nil {
			return nil, fmt.Errorf("message.html: %v", err)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(b.Headers)) {
		canon := textproto.CanonicalMIMEHeaderKey(name)
		field := "message.headers." + name
		if !validFieldName(name) {
			return nil, fmt.Errorf("%s: not a header field name", field)
		}
		if reservedHeaders[canon] || strings.HasPrefix(canon, "Content-") {
			return nil, fmt.Errorf("%s: set by the builder; use the message fields instead", field)
		}
		t, err := parse(field, b.Headers[name])
		if err != nil {
			return nil, err
		}
		c.headers = append(c.headers, compiledHeader{name: name, value: t})
	}
	for i, a := range b.Attachments {
		field := fmt.Sprintf("message.attachments[%d]", i)
		if a.Filename == "" {
			return nil, fmt.Errorf("%s.filename: must not be empty", field)
		}
		if strings.ContainsAny(a.Filename, "\r\n\x00") {
			return nil, fmt.Errorf("%s.filename: must not contain line breaks", field)
		}
		if a.ContentType != "" {
			mt, _, err := mime.ParseMediaType(a.ContentType)
			switch {
			case err != nil:
				return nil, fmt.Errorf("%s.content_type: %q: %v", field, a.ContentType, err)
			case strings.ContainsFunc(a.ContentType, func(r rune) bool { return r < 0x20 || r >= 0x7f }):
				return nil, fmt.Errorf("%s.content_type: %q: control or non-ASCII characters", field, a.ContentType)
			case strings.HasPrefix(mt, "multipart/") || strings.HasPrefix(mt, "message/"):
				return nil, fmt.Errorf("%s.content_type: %s: an attachment is one base64 part, not a %s entity", field, mt, mt[:strings.IndexByte(mt, '/')])
			}
		}
	}
	return c, nil
}

// bounded refuses what would let one template run without end: other
// templates ({{define}}, {{template}}, {{block}}: recursion), a range
// inside a range (the product of two lists from the request), and a
// range over a number. What is left costs time in proportion to the
// request and the output, which is capped.
func bounded(tree *parse.Tree, templates int) error {
	if templates > 1 {
		return errors.New("{{define}} and {{block}} are not allowed")
	}
	if tree == nil {
		return nil
	}
	var walk func(n parse.Node, inRange bool) error
	walk = func(n parse.Node, inRange bool) error {
		switch n := n.(type) {
		case *parse.ListNode:
			if n == nil {
				return nil
			}
			for _, c := range n.Nodes {
				if err := walk(c, inRange); err != nil {
					return err
				}
			}
		case *parse.TemplateNode:
			return errors.New("{{template}} is not allowed")
		case *parse.RangeNode:
			if inRange {
				return errors.New("a {{range}} inside a {{range}} is not allowed")
			}
			// Only over what the request holds: a field or a variable,
			// not the result of a function (len of a long string is a
			// number to range over, as a literal number is).
			if !rangesOverData(n.Pipe) {
				return errors.New("{{range}} over a number or a function's result is not allowed; range over a list or map of the request's data")
			}
			if err := walk(n.List, true); err != nil {
				return err
			}
			return walk(n.ElseList, inRange)
		case *parse.IfNode:
			if err := walk(n.List, inRange); err != nil {
				return err
			}
			return walk(n.ElseList, inRange)
		case *parse.WithNode:
			if err := walk(n.List, inRange); err != nil {
				return err
			}
			return walk(n.ElseList, inRange)
		}
		return nil
	}
	return walk(tree.Root, false)
}

// rangesOverData reports whether a range's pipeline is one field, variable
// or dot: data of the request, whose size the request bounds.
// "index" of such data with literal keys is data too: the way to reach a
// key that is not an identifier ({{range index . "order-items"}}).
func rangesOverData(p *parse.PipeNode) bool {
	if p == nil || len(p.Cmds) != 1 || len(p.Cmds[0].Args) == 0 {
		return false
	}
	args := p.Cmds[0].Args
	if id, ok := args[0].(*parse.IdentifierNode); ok && id.Ident == "index" && len(args) >= 3 {
		for _, k := range args[2:] {
			if _, lit := k.(*parse.StringNode); !lit {
				return false
			}
		}
		args = args[1:2]
	}
	if len(args) != 1 {
		return false
	}
	switch args[0].(type) {
	case *parse.FieldNode, *parse.VariableNode, *parse.DotNode:
		return true
	}
	return false
}

// maxFormatWidth bounds the width and precision a template's printf may
// ask for: "%0999999d" costs time and memory and may print nothing at all
// (assigned to a variable), which the output cap would never see.
const maxFormatWidth = 256

// safeFuncs replace the templates' formatting built-ins with ones that
// refuse a width or precision over maxFormatWidth, or given by an
// argument ("*").
var safeFuncs = map[string]any{
	"printf": func(format string, args ...any) (string, error) {
		if err := checkFormat(format); err != nil {
			return "", err
		}
		return fmt.Sprintf(format, args...), nil
	},
}

// checkFormat refuses a fmt format with a width or precision over
// maxFormatWidth, or one taken from an argument.
func checkFormat(format string) error {
	for i := 0; i < len(format); i++ {
		if format[i] != '%' {
			continue
		}
		for i++; i < len(format) && strings.IndexByte("+-# 0", format[i]) >= 0; i++ {
		}
		for part := 0; part < 2 && i < len(format); part++ { // width, then .precision
			if part == 1 {
				if format[i] != '.' {
					break
				}
				i++
			}
			n := 0
			for ; i < len(format) && format[i] >= '0' && format[i] <= '9'; i++ {
				if n = n*10 + int(format[i]-'0'); n > maxFormatWidth {
					return fmt.Errorf("printf: a width or precision over %d", maxFormatWidth)
				}
			}
			if i < len(format) && (format[i] == '*' || format[i] == '[') {
				return errors.New("printf: a width, precision or argument index from the arguments is not allowed")
			}
		}
	}
	return nil
}

// validFieldName reports whether name is an RFC 5322 field name.
func validFieldName(name string) bool {
	if name == "" || len(name) > 76 {
		return false
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; c < 33 || c > 126 || c == ':' {
			return false
		}
	}
	return true
}

// limitedBuffer is a buffer that refuses to grow past max: a template
// cannot render more than a message may hold.
type limitedBuffer struct {
	bytes.Buffer
	max int
}

var errTooBig = errors.New("message too big")

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if b.Len()+len(p) > b.max {
		return 0, errTooBig
	}
	return b.Buffer.Write(p)
}

// renderError is a recipient's failure to render: a template error, or a
// rendered value that cannot go into a header.
type renderError struct{ err error }

func (e *renderError) Error() string { return e.err.Error() }

// Unwrap lets errors.Is see errTooBig from within a template's output.
func (e *renderError) Unwrap() error { return e.err }

// render writes the message for one recipient: its header fields and
// MIME body, at most max octets.
func (c *compiled) render(to *mail.Address, data map[string]any, messageID string, now time.Time, max int) ([]byte, error) {
	exec := func(t *template.Template) (string, error) {
		out := &limitedBuffer{max: max}
		if err := t.Execute(out, data); err != nil {
			return "", err
		}
		return out.String(), nil
	}
	subject, err := exec(c.subject)
	if err != nil {
		return nil, &renderError{err}
	}
	msg := &limitedBuffer{max: max}
	h := headerWriter{w: msg}
	h.field("From", c.from.String())
	h.field("To", to.String())
	if c.replyTo != nil {
		h.field("Reply-To", c.replyTo.String())
	}
	h.unstructured("Subject", subject)
	h.field("Date", now.Format(time.RFC1123Z))
	h.field("Message-ID", messageID)
	for _, ch := range c.headers {
		v, err := exec(ch.value)
		if err != nil {
			return nil, &renderError{err}
		}
		h.unstructured(ch.name, v)
	}
	h.field("MIME-Version", "1.0")
	if h.err != nil {
		return nil, &renderError{h.err}
	}
	var text, html string
	if c.text != nil {
		if text, err = exec(c.text); err != nil {
			return nil, &renderError{err}
		}
	}
	if c.html != nil {
		out := &limitedBuffer{max: max}
		if err := c.html.Execute(out, data); err != nil {
			return nil, &renderError{err}
		}
		html = out.String()
	}
	if err := writeBody(msg, text, html, c.attachments); err != nil {
		if errors.Is(err, errTooBig) {
			return nil, err
		}
		return nil, &renderError{err}
	}
	return msg.Bytes(), nil
}

// headerWriter writes header fields, refusing values that would break
// out of their field.
type headerWriter struct {
	w   io.Writer
	err error
}

func (h *headerWriter) field(name, value string) {
	if h.err != nil {
		return
	}
	if strings.ContainsAny(value, "\r\n\x00") {
		h.err = fmt.Errorf("header %s: the value has a line break", name)
		return
	}
	line := name + ": " + value + "\r\n"
	if len(line) > 998 {
		h.err = fmt.Errorf("header %s: longer than 998 octets", name)
		return
	}
	_, h.err = io.WriteString(h.w, line)
}

// unstructured writes a free-text field, RFC 2047-encoded when it is not
// plain ASCII, folded between the encoded words (each at most 75 octets).
func (h *headerWriter) unstructured(name, value string) {
	if isPlainASCII(value) {
		h.field(name, value)
		return
	}
	if h.err != nil {
		return
	}
	if strings.ContainsAny(value, "\r\n\x00") {
		h.err = fmt.Errorf("header %s: the value has a line break", name)
		return
	}
	words := strings.Split(mime.QEncoding.Encode("utf-8", value), " ")
	_, h.err = io.WriteString(h.w, name+": "+strings.Join(words, "\r\n ")+"\r\n")
}

func isPlainASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 32 && s[i] != '\t' || s[i] > 126 {
			return false
		}
	}
	return true
}

// writeBody writes the Content-Type field, the blank line and the body:
// one text part, text and HTML as multipart/alternative, and with
// attachments all of it inside multipart/mixed.
func writeBody(w io.Writer, text, html string, attachments []Attachment) error {
	if len(attachments) == 0 {
		return writeEntity(w, content(text, html))
	}
	mw := multipart.NewWriter(w)
	if _, err := fmt.Fprintf(w, "Content-Type: multipart/mixed; boundary=%q\r\n\r\n"+preamble, mw.Boundary()); err != nil {
		return err
	}
	e := content(text, html)
	part, err := mw.CreatePart(e.header)
	if err != nil {
		return err
	}
	if err := e.write(part); err != nil {
		return err
	}
	for _, a := range attachments {
		ct := a.ContentType
		if ct == "" {
			ct = "application/octet-stream"
		}
		hdr := textproto.MIMEHeader{}
		hdr.Set("Content-Type", ct)
		hdr.Set("Content-Transfer-Encoding", "base64")
		hdr.Set("Content-Disposition", mime.FormatMediaType("attachment", map[string]string{"filename": a.Filename}))
		p, err := mw.CreatePart(hdr)
		if err != nil {
			return err
		}
		if err := writeBase64(p, a.Content); err != nil {
			return err
		}
	}
	return mw.Close()
}

const preamble = "This is a multi-part message in MIME format.\r\n"

// entity is a MIME entity: its content header fields and a function that
// writes its body.
type entity struct {
	header textproto.MIMEHeader
	write  func(io.Writer) error
}

// writeEntity writes e's header fields, the blank line and its body.
func writeEntity(w io.Writer, e entity) error {
	for _, k := range slices.Sorted(maps.Keys(e.header)) {
		if _, err := io.WriteString(w, k+": "+e.header.Get(k)+"\r\n"); err != nil {
			return err
		}
	}
	if _, err := io.WriteString(w, "\r\n"); err != nil {
		return err
	}
	tw := &tailWriter{w: w}
	if err := e.write(tw); err != nil {
		return err
	}
	if !tw.endsInCRLF() { // a message ends with a line break
		_, err := io.WriteString(w, "\r\n")
		return err
	}
	return nil
}

// tailWriter remembers the last two bytes written through it.
type tailWriter struct {
	w    io.Writer
	tail [2]byte
	n    int
}

func (t *tailWriter) Write(p []byte) (int, error) {
	for _, c := range p[max(0, len(p)-2):] {
		t.tail[0], t.tail[1] = t.tail[1], c
		t.n++
	}
	return t.w.Write(p)
}

func (t *tailWriter) endsInCRLF() bool { return t.n >= 2 && t.tail == [2]byte{'\r', '\n'} }

// content is the text part, the HTML part, or both as
// multipart/alternative.
func content(text, html string) entity {
	single := func(ctype, body string) entity {
		hdr := textproto.MIMEHeader{}
		hdr.Set("Content-Type", ctype+"; charset=utf-8")
		hdr.Set("Content-Transfer-Encoding", "quoted-printable")
		return entity{hdr, func(w io.Writer) error { return writeQP(w, body) }}
	}
	switch {
	case html == "":
		return single("text/plain", text)
	case text == "":
		return single("text/html", html)
	}
	boundary := multipart.NewWriter(io.Discard).Boundary()
	hdr := textproto.MIMEHeader{}
	hdr.Set("Content-Type", mime.FormatMediaType("multipart/alternative", map[string]string{"boundary": boundary}))
	return entity{hdr, func(w io.Writer) error {
		if _, err := io.WriteString(w, preamble); err != nil {
			return err
		}
		mw := multipart.NewWriter(w)
		if err := mw.SetBoundary(boundary); err != nil {
			return err
		}
		for _, p := range []entity{single("text/plain", text), single("text/html", html)} {
			pw, err := mw.CreatePart(p.header)
			if err != nil {
				return err
			}
			if err := p.write(pw); err != nil {
				return err
			}
		}
		return mw.Close()
	}}
}

// writeQP writes s quoted-printable, its line breaks as CRLF.
func writeQP(w io.Writer, s string) error {
	s = strings.ReplaceAll(strings.ReplaceAll(s, "\r\n", "\n"), "\r", "\n")
	qp := quotedprintable.NewWriter(w)
	for i, line := range strings.Split(s, "\n") {
		if i > 0 {
			if _, err := qp.Write([]byte("\r\n")); err != nil {
				return err
			}
		}
		if _, err := io.WriteString(qp, line); err != nil {
			return err
		}
	}
	return qp.Close()
}

// writeBase64 writes b in base64, in lines of 76 characters.
func writeBase64(w io.Writer, b []byte) error {
	enc := base64.StdEncoding.EncodeToString(b)
	for len(enc) > 76 {
		if _, err := io.WriteString(w, enc[:76]+"\r\n"); err != nil {
			return err
		}
		enc = enc[76:]
	}
	_, err := io.WriteString(w, enc) // the part's delimiter begins with the line break
	return err
}

// templateData is what a recipient's templates see: the request's
// substitutions, the recipient's over them, and email and name unless
// they set those themselves.
func templateData(global, own map[string]any, r Recipient) map[string]any {
	data := make(map[string]any, len(global)+len(own)+2)
	maps.Copy(data, global)
	maps.Copy(data, own)
	if _, ok := data["email"]; !ok {
		data["email"] = r.Email
	}
	if _, ok := data["name"]; !ok {
		data["name"] = r.Name
	}
	return data
}
