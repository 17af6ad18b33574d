package smtpclient

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/mta/sevenbit"
)

// Message is one message to send.
type Message struct {
	From       string          // reverse-path without brackets; "" is the null sender <>
	Recipients []mta.Recipient // forward-paths with their DSN parameters
	EnvID      string          // DSN ENVID, sent (xtext-encoded) only when the server offers DSN
	Ret        mta.Return      // DSN RET, sent only when the server offers DSN
	// SMTPUTF8 says the message needs SMTPUTF8 (RFC 6531). When the server
	// does not offer it, nothing is sent and every recipient fails with
	// 550 5.6.7.
	SMTPUTF8 bool
	// Body8Bit asks for BODY=8BITMIME (RFC 6152) when the server offers it.
	// To a server that does not, an 8-bit body (flagged or not) is converted
	// to quoted-printable first, or refused with 554 5.6.3 when that cannot
	// be done safely: see package sevenbit.
	Body8Bit bool
	// Data is the message with CRLF line endings, not dot-stuffed: Send
	// stuffs it while writing, and adds a final CRLF when it is missing.
	Data []byte
}

// Result is the outcome of one transaction.
type Result struct {
	// Recipients has one reply per Message.Recipients, in the same order:
	// the reply to RCPT when it was not 2xx, else the reply to the end of
	// the data (SMTP gives one reply for all accepted recipients), or the
	// reply to MAIL or DATA when those failed. Replies may be shared
	// between recipients and must not be modified.
	Recipients []*mta.Reply
}

// Send runs one mail transaction. When this is not the Conn's first
// transaction it starts with RSET. With PIPELINING, RSET, MAIL, every RCPT
// and DATA go in one write, and the replies are read in order; without it,
// one command at a time.
//
// Outcomes that concern the message (a 4xx or 5xx reply to MAIL, RCPT, DATA
// or the final ".", other than 421) are returned in the Result with a nil
// error, and the Conn stays usable. Refusals made without talking to the
// server also come as a Result: the message is larger than the server's SIZE
// limit (552 5.3.4), needs SMTPUTF8 the server does not offer (550 5.6.7),
// or has an 8-bit body that cannot be converted for a server without
// 8BITMIME (554 5.6.3).
//
// Failures of the connection (I/O errors, timeouts, a cancelled ctx,
// malformed or unexpected replies, and any 421) are returned as *Error with
// a nil Result, and the Conn is then unusable. A stale cached connection shows
// as Stage "rset": the message was not attempted.
//
// One case both returns a Result and makes the Conn unusable: when no
// recipient was accepted but the server still answered the pipelined DATA
// with 354. Sending "." would complete a transaction, so the socket is closed
// instead, which makes the server abort it (RFC 5321 §3.8).
//
// If ctx is already done, Send returns an *Error at once and leaves the Conn
// as it was. Invalid messages (no recipients, line breaks in addresses) are refused
// with a plain error before anything is sent; the Conn is unaffected.
func (c *Conn) Send(ctx context.Context, m *Message) (*Result, error) {
	return c.SendThen(ctx, m, nil)
}

// SendThen runs m's transaction as Send does and, when the server offers
// PIPELINING (and the message goes with DATA, not BDAT), lets the next
// transaction start without a round trip of its own. Just before m's data
// goes out it calls next, which returns the message to send after m on this
// Conn, or nil. That message's MAIL, RCPT and DATA then go in the same write
// as m's final "." (RFC 2920 §3.1: message content may open a group of
// pipelined commands, and DATA closes it). It is then begun: the Conn's next
// call must be Send or SendThen for that same *Message, which only reads the
// replies and carries on; Close drops the connection instead of saying QUIT.
// A message the server would refuse from its EHLO reply alone (size,
// SMTPUTF8, 8BITMIME) is not begun; the next Send refuses it as usual.
//
// When SendThen returns an error, the Conn is unusable and a message it
// began was not sent: its data never went out, so the server cannot have
// taken it.
func (c *Conn) SendThen(ctx context.Context, m *Message, next func() *Message) (*Result, error) {
	if c.begun != nil {
		return c.sendBegun(ctx, m, next)
	}
	if err := checkMessage(m); err != nil {
		return nil, err
	}
	if !c.Usable() {
		return nil, &Error{Stage: "mail", Host: c.host, Addr: c.addr, Err: ErrUnusable}
	}
	if ctx.Err() != nil {
		return nil, &Error{Stage: "mail", Host: c.host, Addr: c.addr, Err: context.Cause(ctx)}
	}
	m, res := c.ready(m)
	if res != nil {
		return res, nil
	}
	return c.run(ctx, m, next)
}

// sendBegun carries on the transaction of m, which the previous SendThen
// began. Any other message is a caller's mistake that leaves the server
// inside a transaction: the connection is dropped.
func (c *Conn) sendBegun(ctx context.Context, m *Message, next func() *Message) (*Result, error) {
	if m != c.begun.asked || !c.Usable() || ctx.Err() != nil {
		err := ErrUnusable
		switch {
		case m != c.begun.asked:
			err = errors.New("smtpclient: Send of a message other than the one begun")
		case ctx.Err() != nil:
			err = context.Cause(ctx)
		}
		c.broken = true
		c.abort()
		return nil, &Error{Stage: "mail", Host: c.host, Addr: c.addr, Err: err}
	}
	return c.run(ctx, c.begun.sent, next)
}

// ready returns m as it is sent to this server, or the Result that
// refuses it without sending it. m must have passed checkMessage.
func (c *Conn) ready(m *Message) (*Message, *Result) {
	if m.SMTPUTF8 && !needsUTF8(m) {
		// The client asked for SMTPUTF8, but nothing in the envelope or
		// the header is UTF-8: any server can take it (RFC 6531 §3.2).
		cp := *m
		cp.SMTPUTF8 = false
		m = &cp
	}
	// SMTPUTF8 first: a message that needs it cannot be helped by
	// converting its body; then the conversion, whose result the size
	// limit applies to.
	if res := c.refuse(m, true); res != nil {
		return nil, res
	}
	m, res := c.downgrade(m)
	if res != nil {
		return nil, res
	}
	if res := c.refuse(m, false); res != nil {
		return nil, res
	}
	return m, nil
}

// run runs the transaction of m, ready to send, under ctx.
func (c *Conn) run(ctx context.Context, m *Message, next func() *Message) (*Result, error) {
	stop := context.AfterFunc(ctx, c.abort)
	res, err := c.send(m, next)
	if !stop() {
		c.broken = true
		if err != nil {
			err = c.cancelled(ctx, err, "mail")
		}
	}
	if err != nil {
		return nil, err
	}
	return res, nil
}

func checkMessage(m *Message) error {
	if len(m.Recipients) == 0 {
		return errors.New("smtpclient: message has no recipients")
	}
	bad := func(s string) bool { return strings.ContainsAny(s, "\r\n<>") }
	if bad(m.From) {
		return fmt.Errorf("smtpclient: invalid sender %q", m.From)
	}
	for _, r := range m.Recipients {
		if r.Address == "" || bad(r.Address) || strings.ContainsAny(r.ORcptType, " \t\r\n;") {
			return fmt.Errorf("smtpclient: invalid recipient %q", r.Address)
		}
	}
	return nil
}

// downgrade converts an 8-bit body to quoted-printable when the server does
// not offer 8BITMIME (RFC 6152 §3), as Postfix does. A message that cannot
// be converted safely (8-bit octets in a header, a broken MIME structure)
// is refused for every recipient with 554 5.6.3 instead of being sent as
// something the recipient would read differently.
func (c *Conn) downgrade(m *Message) (*Message, *Result) {
	if c.has8bit || !sevenbit.Needed(m.Data) {
		return m, nil
	}
	data, err := sevenbit.Convert(m.Data)
	if err != nil {
		return m, refusal(m, &mta.Reply{Code: 554, Enhanced: mta.Enhanced{5, 6, 3}, Local: true,
			Text: c.host + " does not offer 8BITMIME, and the 8-bit message cannot be converted to 7 bits: " + err.Error()})
	}
	cp := *m
	cp.Data, cp.Body8Bit = data, false
	return &cp, nil
}

// refuse returns the Result for a message the server cannot take, decided
// from its EHLO reply alone, or nil: with utf8 whether it needs SMTPUTF8
// the server lacks, else whether it is over the server's SIZE.
func (c *Conn) refuse(m *Message, utf8 bool) *Result {
	var r *mta.Reply
	switch {
	case utf8 && m.SMTPUTF8 && !c.hasUTF8:
		r = &mta.Reply{Code: 550, Enhanced: mta.Enhanced{5, 6, 7}, Local: true,
			Text: "SMTPUTF8 required but not supported by " + c.host}
	case !utf8 && c.sizeLimit > 0 && int64(len(m.Data)) > c.sizeLimit:
		r = &mta.Reply{Code: 552, Enhanced: mta.Enhanced{5, 3, 4}, Local: true,
			Text: fmt.Sprintf("message size exceeds %s's limit of %d bytes", c.host, c.sizeLimit)}
	default:
		return nil
	}
	return refusal(m, r)
}

// refusal is a Result that gives r to every recipient of m.
func refusal(m *Message, r *mta.Reply) *Result {
	res := &Result{Recipients: make([]*mta.Reply, len(m.Recipients))}
	for i := range res.Recipients {
		res.Recipients[i] = r
	}
	return res
}

// begunMessage is a transaction whose commands went out behind the
// previous message's data: asked is the message SendThen's next returned,
// sent the same as it goes to this server (see ready).
type begunMessage struct{ asked, sent *Message }

// send runs the transaction; next is SendThen's.
func (c *Conn) send(m *Message, next func() *Message) (*Result, error) {
	if c.chunking {
		return c.sendChunked(m)
	}
	res := &Result{Recipients: make([]*mta.Reply, len(m.Recipients))}
	begun := c.begun != nil
	if begun {
		// Its commands are out: read their replies.
		c.begun = nil
	} else if err := c.begin(m); err != nil {
		return nil, err
	}

	mailOK, accepted, full, err := c.readEnvelope(m, res, c.pipelining)
	if err != nil {
		if e, ok := err.(*Error); ok && begun && e.Stage == "mail" {
			e.Begun = true
		}
		return nil, err
	}
	if !mailOK && !c.pipelining {
		return res, nil
	}

	// DATA
	if !c.pipelining {
		if accepted == 0 {
			return res, nil
		}
		if err := c.writeCommands("data", append(c.scratch[:0], "DATA\r\n"...)); err != nil {
			return nil, err
		}
	}
	data, err := c.readReply(c.t.DataInit)
	if err != nil {
		return nil, c.ioFail("data", err)
	}
	if data.Code == 421 {
		return nil, c.replyFail("data", data)
	}
	if accepted == 0 {
		switch {
		case data.Code == 354:
			// The server waits for a message nobody should get: drop the
			// connection rather than complete the transaction.
			c.broken = true
			c.abort()
			return res, nil
		case data.Code/100 == 4 || data.Code/100 == 5:
			return res, nil
		}
		return nil, c.outOfStep("data", data)
	}
	if data.Code != 354 {
		if data.Code/100 == 4 || data.Code/100 == 5 {
			fill(res, data)
			return res, nil
		}
		return nil, c.outOfStep("data", data)
	}

	// The message, then ".", and the next message's commands if there is
	// one, in one write.
	c.tw.timeout = c.t.DataBlock
	writeDotStuffed(c.bw, m.Data)
	if next != nil && c.pipelining && !full {
		// (After a full transaction the caller sends the recipients left
		// first.)
		c.beginNext(next)
	}
	err = c.bw.Flush()
	c.tw.timeout = c.t.Command
	if err != nil {
		return nil, c.ioFail("data", err)
	}
	done, err := c.readReply(c.t.DataDone)
	if err != nil {
		return nil, c.ioFail("dot", err)
	}
	if err := c.check("dot", done); err != nil {
		return nil, err
	}
	if c.begun == nil && c.br.Buffered() > 0 {
		// More than the reply to "." (which after a 354 cannot be
		// mistaken): a quirky server; the reply stands, the connection
		// is not used again.
		c.broken = true
	}
	fill(res, done)
	return res, nil
}

// begin writes the commands of m's transaction: with PIPELINING, RSET
// (when a transaction came before), MAIL, every RCPT and DATA in one
// write, and it reads the reply to RSET; without, RSET and its reply, then
// MAIL alone.
func (c *Conn) begin(m *Message) error {
	rset := c.messages > 0 // a transaction was started before
	if rset && !c.pipelining {
		if err := c.writeCommands("rset", append(c.scratch[:0], "RSET\r\n"...)); err != nil {
			return err
		}
		if err := c.readRSET(); err != nil {
			return err
		}
	}
	c.messages++

	b := c.scratch[:0]
	if rset && c.pipelining {
		b = append(b, "RSET\r\n"...)
	}
	b = c.appendMail(b, m)
	if c.pipelining {
		b = c.appendRcptsData(b, m)
	}
	stage := "mail"
	if rset && c.pipelining {
		stage = "rset"
	}
	if err := c.writeCommands(stage, b); err != nil {
		return err
	}
	if rset && c.pipelining {
		return c.readRSET()
	}
	return nil
}

// beginNext asks next for the message to follow and, unless there is
// none or this server would refuse it anyway, buffers its MAIL, RCPT and
// DATA behind the data being written. No RSET is needed: the reply to "."
// ends the transaction before it, whatever that reply is (RFC 5321 §4.1.1.4).
func (c *Conn) beginNext(next func() *Message) {
	asked := next()
	if asked == nil || checkMessage(asked) != nil {
		return
	}
	sent, res := c.ready(asked)
	if res != nil {
		return
	}
	b := c.appendRcptsData(c.appendMail(c.scratch[:0], sent), sent)
	c.scratch = b[:0]
	c.bw.Write(b)
	c.begun = &begunMessage{asked: asked, sent: sent}
	c.messages++
}

// appendRcptsData appends an RCPT command for each recipient of m, then DATA.
func (c *Conn) appendRcptsData(b []byte, m *Message) []byte {
	for i := range m.Recipients {
		b = c.appendRcpt(b, &m.Recipients[i])
	}
	return append(b, "DATA\r\n"...)
}

// sendChunked runs the transaction with BDAT (RFC 3030): RSET, MAIL, every
// RCPT, "BDAT <size> LAST" and the message itself go in one write, so the
// whole transaction costs one round trip. The message is sent as is (BDAT
// has no dot-stuffing). The server reads the chunk even when it refuses it
// (RFC 3030 §2), so the stream stays in step whatever the replies.
func (c *Conn) sendChunked(m *Message) (*Result, error) {
	res := &Result{Recipients: make([]*mta.Reply, len(m.Recipients))}
	rset := c.messages > 0
	c.messages++
	data := m.Data
	crlf := !bytes.HasSuffix(data, []byte("\r\n"))
	size := len(data)
	if crlf {
		size += 2
	}
	b := c.scratch[:0]
	if rset {
		b = append(b, "RSET\r\n"...)
	}
	b = c.appendMail(b, m)
	for i := range m.Recipients {
		b = c.appendRcpt(b, &m.Recipients[i])
	}
	b = append(b, "BDAT "...)
	b = strconv.AppendInt(b, int64(size), 10)
	b = append(b, " LAST\r\n"...)
	stage := "mail"
	if rset {
		stage = "rset"
	}
	c.scratch = b[:0]
	c.tw.timeout = c.t.Command
	c.bw.Write(b)
	c.tw.timeout = c.t.DataBlock
	c.bw.Write(data)
	if crlf {
		c.bw.WriteString("\r\n")
	}
	err := c.bw.Flush()
	c.tw.timeout = c.t.Command
	if err != nil {
		return nil, c.ioFail(stage, err)
	}
	if rset {
		if err := c.readRSET(); err != nil {
			return nil, err
		}
	}
	_, accepted, _, err := c.readEnvelope(m, res, true)
	if err != nil {
		return nil, err
	}
	done, err := c.readReply(c.t.DataDone)
	if err != nil {
		return nil, c.ioFail("dot", err)
	}
	if err := c.check("dot", done); err != nil {
		return nil, err
	}
	if err := c.inStep("dot", done); err != nil {
		return nil, err
	}
	if accepted > 0 {
		fill(res, done)
	}
	return res, nil
}

// inStep checks, after the last reply a transaction expects, that the
// server sent nothing more: a reply too many (a server that answers one
// command twice) shifts every reply after it onto the wrong command, and
// with BDAT, which has no 354 to fall back in step on, a refusal of the
// message would be read as the reply of a command before it and the
// message taken for delivered. Then the outcome is unknown: the
// connection is dropped and the message tried again (a possible
// duplicate, never a loss). It sees what has already arrived.
func (c *Conn) inStep(stage string, last *mta.Reply) error {
	n := c.br.Buffered()
	if n == 0 {
		return nil
	}
	if b, _ := c.br.Peek(min(n, 3)); string(b) == "421" {
		// The server closing the connection after this transaction (a
		// limit of messages per connection, a shutdown): the reply before
		// it stands, and the connection is not used again.
		c.broken = true
		return nil
	}
	c.abort()
	return c.outOfStep(stage, last)
}

// readEnvelope reads the replies to MAIL and to each RCPT, and records
// refusals in res. When not pipelined it writes each RCPT before reading
// its reply, and sends none after a refused MAIL, nor after a reply that
// the transaction is full (mta.Reply.TooManyRecipients) once a recipient
// was taken: the recipients left get that reply. It reports whether MAIL
// was accepted, how many recipients were, and whether the transaction was
// full: a recipient taken and one refused as too many, in any order (the
// scheduler then sends those again in another transaction).
func (c *Conn) readEnvelope(m *Message, res *Result, pipelined bool) (mailOK bool, accepted int, full bool, err error) {
	mail, err := c.readReply(c.t.Command)
	if err != nil {
		return false, 0, false, c.ioFail("mail", err)
	}
	if err := c.check("mail", mail); err != nil {
		return false, 0, false, err
	}
	if mailOK = mail.Code/100 == 2; !mailOK {
		fill(res, mail)
		if !pipelined {
			return false, 0, false, nil
		}
	}
	tooMany, stop := false, false
	for i := range m.Recipients {
		if stop {
			res.Recipients[i] = res.Recipients[i-1]
			continue
		}
		if !pipelined {
			b := c.appendRcpt(c.scratch[:0], &m.Recipients[i])
			if err := c.writeCommands("rcpt", b); err != nil {
				return false, 0, false, err
			}
		}
		r, err := c.readReply(c.t.Command)
		if err != nil {
			return false, 0, false, c.ioFail("rcpt", err)
		}
		if err := c.check("rcpt", r); err != nil {
			return false, 0, false, err
		}
		switch {
		case !mailOK: // replies to RCPT after a failed MAIL mean nothing
		case r.Code/100 == 2:
			accepted++
		default:
			res.Recipients[i] = r
			if r.TooManyRecipients() {
				tooMany = true
				stop = !pipelined && accepted > 0
			}
		}
	}
	return mailOK, accepted, tooMany && accepted > 0, nil
}

// check classifies a reply to MAIL, RCPT or ".": 2xx, 4xx and 5xx are
// outcomes, except 421 which ends the session; 3xx is out of step.
func (c *Conn) check(stage string, r *mta.Reply) error {
	switch {
	case r.Code == 421:
		return c.replyFail(stage, r)
	case r.Code/100 == 3:
		return c.outOfStep(stage, r)
	}
	return nil
}

// readRSET reads the reply to RSET, which must be 250.
func (c *Conn) readRSET() error {
	r, err := c.readReply(c.t.Command)
	if err != nil {
		return c.ioFail("rset", err)
	}
	if r.Code == 250 {
		return nil
	}
	if r.Code == 421 {
		return c.replyFail("rset", r)
	}
	// A refused RSET says nothing about the message: report it without
	// the Reply so that the error does not read as permanent.
	c.broken = true
	return &Error{Stage: "rset", Host: c.host, Addr: c.addr,
		Err: fmt.Errorf("%w to RSET: %s", ErrUnexpectedReply, r.Error())}
}

// fill gives r to every recipient that has no reply yet.
func fill(res *Result, r *mta.Reply) {
	for i, x := range res.Recipients {
		if x == nil {
			res.Recipients[i] = r
		}
	}
}

// writeCommands writes b in one flush and keeps it as the scratch buffer.
func (c *Conn) writeCommands(stage string, b []byte) error {
	c.scratch = b[:0]
	c.tw.timeout = c.t.Command
	c.bw.Write(b)
	if err := c.bw.Flush(); err != nil {
		return c.ioFail(stage, err)
	}
	return nil
}

func (c *Conn) appendMail(b []byte, m *Message) []byte {
	b = append(b, "MAIL FROM:<"...)
	b = append(b, m.From...)
	b = append(b, '>')
	if c.hasSize {
		b = append(b, " SIZE="...)
		b = strconv.AppendInt(b, int64(len(m.Data)), 10)
	}
	if m.Body8Bit && c.has8bit {
		b = append(b, " BODY=8BITMIME"...)
	}
	if m.SMTPUTF8 && c.hasUTF8 {
		b = append(b, " SMTPUTF8"...)
	}
	if c.hasDSN {
		if m.Ret == mta.ReturnFull || m.Ret == mta.ReturnHeaders {
			b = append(b, " RET="...)
			b = append(b, m.Ret...)
		}
		if m.EnvID != "" {
			b = append(b, " ENVID="...)
			b = appendXtext(b, m.EnvID)
		}
	}
	return append(b, "\r\n"...)
}

func (c *Conn) appendRcpt(b []byte, r *mta.Recipient) []byte {
	b = append(b, "RCPT TO:<"...)
	b = append(b, r.Address...)
	b = append(b, '>')
	if c.hasDSN {
		if r.Notify != 0 {
			b = append(b, " NOTIFY="...)
			b = append(b, r.Notify.String()...)
		}
		if r.ORcptType != "" && r.ORcpt != "" {
			b = append(b, " ORCPT="...)
			b = append(b, r.ORcptType...)
			b = append(b, ';')
			if strings.EqualFold(r.ORcptType, "utf-8") {
				b = appendUTF8AddrXtext(b, r.ORcpt)
			} else {
				b = appendXtext(b, r.ORcpt)
			}
		}
	}
	return append(b, "\r\n"...)
}

var crlfDot = []byte("\n.")

// writeDotStuffed writes data dot-stuffed (RFC 5321 §4.5.2), ending with
// CRLF, followed by ".\r\n"; the caller flushes w and sees its errors. It
// copies runs between the lines that start with "." as they are, without
// looking at each byte.
func writeDotStuffed(w *bufio.Writer, data []byte) {
	if len(data) > 0 && data[0] == '.' {
		w.WriteByte('.')
	}
	rest := data
	for {
		i := bytes.Index(rest, crlfDot)
		if i < 0 {
			break
		}
		w.Write(rest[:i+1])
		w.WriteByte('.')
		rest = rest[i+1:] // starts with the line's own "."
	}
	w.Write(rest)
	switch {
	case len(data) == 0 || bytes.HasSuffix(data, []byte("\r\n")):
	case data[len(data)-1] == '\r':
		w.WriteByte('\n')
	default:
		w.WriteString("\r\n")
	}
	w.WriteString(".\r\n")
}

// needsUTF8 reports whether the envelope or the header section of m has
// non-ASCII text, which only a server offering SMTPUTF8 may receive.
func needsUTF8(m *Message) bool {
	nonASCII := func(s string) bool {
		for i := 0; i < len(s); i++ {
			if s[i] >= 0x80 {
				return true
			}
		}
		return false
	}
	if nonASCII(m.From) {
		return true
	}
	for _, r := range m.Recipients {
		if nonASCII(r.Address) || nonASCII(r.ORcpt) {
			return true
		}
	}
	header := m.Data
	if i := bytes.Index(header, []byte("\r\n\r\n")); i >= 0 {
		header = header[:i]
	}
	for _, b := range header {
		if b >= 0x80 {
			return true
		}
	}
	return false
}
