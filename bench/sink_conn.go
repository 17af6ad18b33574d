package bench

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// sinkConn is the state of one SMTP connection.
type sinkConn struct {
	s        *Sink
	nc       net.Conn
	br       *bufio.Reader
	bw       *bufio.Writer
	id       int64
	rng      uint64
	deadline time.Time

	helo    bool
	inTx    bool
	record  bool     // keep the envelope and content of this transaction
	from    string   // if record
	to      []string // if record
	rcpts   int
	buf     []byte // content of the current message, if record
	msgs    int64  // messages accepted on this connection
	chunked int64  // BDAT bytes of the current message so far
}

// sinkAction is what to do with the connection after a command.
type sinkAction int

const (
	sinkContinue sinkAction = iota
	sinkClose               // flush the reply, then close gracefully
	sinkDrop                // close at once, no reply
	sinkQuit                // flush the reply, then close
)

// serve runs the SMTP dialogue. It reports whether the connection should be
// closed gracefully (after a 421).
func (c *sinkConn) serve() bool {
	c.bw.WriteString(c.s.greeting)
	if c.flush() != nil {
		return false
	}
	for {
		c.arm()
		line, err := c.readLine()
		if err != nil {
			return false
		}
		act := sinkContinue
		switch {
		case c.s.down.Load():
			c.bw.WriteString(c.s.replies.down)
			act = sinkClose
		case line == nil:
			act = c.say("500 5.5.2 Line too long\r\n")
		default:
			act = c.command(line)
		}
		switch act {
		case sinkDrop:
			return false
		case sinkClose:
			return c.flush() == nil
		case sinkQuit:
			c.flush()
			return false
		}
		if c.br.Buffered() == 0 && c.flush() != nil {
			return false
		}
	}
}

// flush writes the buffered replies, after the injected latency.
func (c *sinkConn) flush() error {
	if c.bw.Buffered() == 0 {
		return nil
	}
	if d := c.s.faults.Load().Latency; d > 0 && !c.s.sleep(d) {
		return errSinkClosed
	}
	return c.bw.Flush()
}

// arm moves the idle deadline when it has become more than 10% stale.
func (c *sinkConn) arm() {
	now := time.Now()
	if c.deadline.Sub(now) >= sinkIdleTimeout-sinkIdleTimeout/10 {
		return
	}
	c.deadline = now.Add(sinkIdleTimeout)
	c.nc.SetDeadline(c.deadline)
}

// readLine returns the next command line without its line ending, or nil
// (and no error) for a line longer than the read buffer, which is skipped.
func (c *sinkConn) readLine() ([]byte, error) {
	line, err := c.br.ReadSlice('\n')
	if err == bufio.ErrBufferFull {
		for err == bufio.ErrBufferFull {
			_, err = c.br.ReadSlice('\n')
		}
		if err != nil {
			return nil, err
		}
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	line = line[:len(line)-1]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	return line, nil
}

// say writes a reply and continues the dialogue.
func (c *sinkConn) say(reply string) sinkAction {
	c.bw.WriteString(reply)
	return sinkContinue
}

// command handles one command line, writing its reply to c.bw.
func (c *sinkConn) command(line []byte) sinkAction {
	verb, arg := line, []byte(nil)
	if i := bytes.IndexByte(line, ' '); i >= 0 {
		verb, arg = line[:i], bytes.TrimSpace(line[i+1:])
	}
	if len(verb) != 4 {
		if bytes.EqualFold(verb, []byte("STARTTLS")) {
			return c.say("502 5.5.1 Error: STARTTLS not offered\r\n")
		}
		return c.say("500 5.5.2 Error: command not recognized\r\n")
	}
	var up [4]byte
	for i := range up {
		up[i] = verb[i] &^ 0x20 // ASCII upper case (non-letters do not matter)
	}
	switch v := string(up[:]); v {
	case "EHLO", "HELO":
		if len(arg) == 0 {
			return c.say("501 5.5.4 Syntax: " + v + " hostname\r\n")
		}
		c.reset()
		c.helo = true
		if v == "EHLO" {
			return c.say(c.s.ehlo)
		}
		return c.say(c.s.helo)
	case "MAIL":
		return c.mail(arg)
	case "RCPT":
		return c.rcpt(arg)
	case "DATA":
		return c.data()
	case "BDAT":
		if !c.s.cfg.Chunking {
			break
		}
		return c.bdat(arg)
	case "RSET":
		c.s.resets.Add(1)
		c.reset()
		return c.say("250 2.0.0 Ok\r\n")
	case "NOOP":
		return c.say("250 2.0.0 Ok\r\n")
	case "QUIT":
		c.bw.WriteString("221 2.0.0 Bye\r\n")
		return sinkQuit
	}
	return c.say("502 5.5.1 Error: command not implemented\r\n")
}

func (c *sinkConn) reset() {
	c.inTx, c.record, c.rcpts = false, false, 0
	c.from, c.to = "", nil
	c.buf, c.chunked = c.buf[:0], 0
}

// sinkPath parses "FROM:<addr> params" (prefix "FROM:" or "TO:") and
// returns addr, or ok == false for a syntax error.
func sinkPath(arg []byte, prefix string) (addr []byte, ok bool) {
	if len(arg) < len(prefix) || !bytes.EqualFold(arg[:len(prefix)], []byte(prefix)) {
		return nil, false
	}
	p := bytes.TrimLeft(arg[len(prefix):], " ")
	if len(p) > 0 && p[0] == '<' {
		i := bytes.IndexByte(p, '>')
		if i < 0 {
			return nil, false
		}
		return p[1:i], true
	}
	if i := bytes.IndexByte(p, ' '); i >= 0 {
		p = p[:i]
	}
	return p, len(p) > 0
}

// fault draws one event and, if a fault is injected, writes its reply and
// returns true with what to do next.
func (c *sinkConn) fault(temp, perm float64, tempReply, permReply string) (bool, sinkAction) {
	u := c.draw()
	r := tempReply
	switch {
	case u < temp:
		c.s.tempFails.Add(1)
	case u < temp+perm:
		c.s.permFails.Add(1)
		r = permReply
	default:
		return false, sinkContinue
	}
	c.bw.WriteString(sinkWithIP(r, c.nc))
	if strings.HasPrefix(r, "421") {
		return true, sinkClose
	}
	return true, sinkContinue
}

func (c *sinkConn) mail(arg []byte) sinkAction {
	switch {
	case !c.helo:
		return c.say("503 5.5.1 Error: send HELO/EHLO first\r\n")
	case c.inTx:
		return c.say("503 5.5.1 Error: nested MAIL command\r\n")
	}
	addr, ok := sinkPath(arg, "FROM:")
	if !ok {
		return c.say("501 5.5.4 Syntax: MAIL FROM:<address>\r\n")
	}
	f, r := c.s.faults.Load(), c.s.replies
	if failed, act := c.fault(f.MailTempFail, f.MailPermFail, r.mailTemp, r.mailPerm); failed {
		return act
	}
	c.inTx = true
	c.record = c.s.cfg.Keep || c.s.onMsg.Load() != nil
	if c.record {
		c.from = string(addr)
	}
	return c.say("250 2.1.0 Ok\r\n")
}

func (c *sinkConn) rcpt(arg []byte) sinkAction {
	if !c.inTx {
		return c.say("503 5.5.1 Error: need MAIL command\r\n")
	}
	addr, ok := sinkPath(arg, "TO:")
	switch {
	case !ok || len(addr) == 0:
		return c.say("501 5.5.4 Syntax: RCPT TO:<address>\r\n")
	case c.rcpts >= c.s.maxRcpts:
		return c.say(c.s.tooManyRcpts)
	}
	if reply, ok := c.s.cfg.RcptReplies[strings.ToLower(string(addr))]; ok {
		return c.say(reply + "\r\n")
	}
	f, r := c.s.faults.Load(), c.s.replies
	if failed, act := c.fault(f.RcptTempFail, f.RcptPermFail, r.rcptTemp, r.rcptPerm); failed {
		return act
	}
	c.rcpts++
	if c.record {
		c.to = append(c.to, string(addr))
	}
	return c.say("250 2.1.5 Ok\r\n")
}

func (c *sinkConn) data() sinkAction {
	switch {
	case !c.inTx:
		return c.say("503 5.5.1 Error: need MAIL command\r\n")
	case c.rcpts == 0:
		return c.say("503 5.5.1 Error: no valid recipients\r\n")
	}
	c.bw.WriteString("354 End data with <CR><LF>.<CR><LF>\r\n")
	if c.br.Buffered() == 0 && c.flush() != nil {
		return sinkDrop
	}
	drop := c.draw() < c.s.faults.Load().DropInData
	size, buf, err := sinkReadData(c.br, c.buf[:0], c.record, drop)
	c.buf = buf
	if err != nil {
		if err == errSinkDrop {
			c.s.drops.Add(1)
		}
		return sinkDrop
	}
	if c.br.Buffered() > 0 {
		c.s.commandsAfterData.Add(1)
	}
	return c.finish(size)
}

// finish ends a transaction whose content (size bytes, kept in c.buf when
// recording) has been read: an injected fault, or acceptance.
func (c *sinkConn) finish(size int64) sinkAction {
	defer c.reset()
	f, r := c.s.faults.Load(), c.s.replies
	if failed, act := c.fault(f.DataTempFail, f.DataPermFail, r.dataTemp, r.dataPerm); failed {
		return act
	}
	if size > sinkMaxSize {
		return c.say("552 5.3.4 Error: message too big\r\n")
	}
	s := c.s
	s.messages.Add(1)
	s.recipients.Add(int64(c.rcpts))
	s.bytes.Add(size)
	c.msgs++
	for {
		cur := s.maxPerConn.Load()
		if c.msgs <= cur || s.maxPerConn.CompareAndSwap(cur, c.msgs) {
			break
		}
	}
	if c.record {
		m := SinkMessage{From: c.from, To: c.to, Data: c.buf, ConnID: c.id, Received: time.Now()}
		if s.cfg.Keep {
			m.Data = bytes.Clone(c.buf)
			if m.Data == nil {
				m.Data = []byte{}
			}
			s.mu.Lock()
			s.msgs = append(s.msgs, m)
			s.mu.Unlock()
		}
		if fn := s.onMsg.Load(); fn != nil {
			(*fn)(m)
		}
	}
	b := c.bw.AvailableBuffer()
	b = append(b, "250 2.0.0 Ok: queued as S"...)
	b = strconv.AppendInt(b, c.id, 10)
	b = append(b, '.')
	b = strconv.AppendInt(b, c.msgs, 10)
	b = append(b, "\r\n"...)
	c.bw.Write(b)
	return sinkContinue
}

// bdat handles "BDAT <size> [LAST]" (RFC 3030). The chunk is read whatever
// the reply, so the stream stays in step.
func (c *sinkConn) bdat(arg []byte) sinkAction {
	f := strings.Fields(string(arg))
	if len(f) == 0 || len(f) > 2 || len(f) == 2 && !strings.EqualFold(f[1], "LAST") {
		return c.say("501 5.5.4 Syntax: BDAT size [LAST]\r\n")
	}
	n, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil || n < 0 || n > sinkMaxSize {
		return c.say("501 5.5.4 Bad chunk size\r\n")
	}
	last := len(f) == 2
	if last && c.draw() < c.s.faults.Load().DropInData {
		_, _ = c.br.Discard(int(n / 2))
		c.s.drops.Add(1)
		return sinkDrop
	}
	if c.record && c.inTx && c.rcpts > 0 {
		start := len(c.buf)
		c.buf = append(c.buf, make([]byte, n)...)
		if _, err := io.ReadFull(c.br, c.buf[start:]); err != nil {
			return sinkDrop
		}
	} else if _, err := c.br.Discard(int(n)); err != nil {
		return sinkDrop
	}
	c.chunked += n
	switch {
	case !c.inTx:
		c.reset()
		return c.say("503 5.5.1 Error: need MAIL command\r\n")
	case c.rcpts == 0:
		c.reset()
		return c.say("503 5.5.1 Error: no valid recipients\r\n")
	case !last:
		return c.say("250 2.0.0 " + strconv.FormatInt(n, 10) + " octets received\r\n")
	}
	return c.finish(c.chunked)
}

// draw returns the next number of the connection's random stream, uniform
// in [0,1).
func (c *sinkConn) draw() float64 {
	c.rng += 0x9e3779b97f4a7c15
	return float64(sinkMix64(c.rng)>>11) / (1 << 53)
}

// mix64 is the splitmix64 finalizer.
func sinkMix64(z uint64) uint64 {
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

var (
	sinkDotEnd = []byte("\r\n.\r\n")
	sinkLFDot  = []byte("\n.")
)

// sinkReadData consumes message content from br up to and including the
// terminating "\r\n.\r\n" (whose first CRLF may be the one of the DATA
// command line). It returns the size of the content with dot-stuffing
// undone and, if keep, dst with that content appended (kept up to about
// sinkMaxSize bytes). The data is scanned in the reader's buffer with
// bytes.Index; matches across buffer boundaries are found through the last
// four bytes seen. If drop, it returns errSinkDrop after reading the first
// part of the content.
func sinkReadData(br *bufio.Reader, dst []byte, keep, drop bool) (int64, []byte, error) {
	tail := [4]byte{'\r', '\n'} // the last bytes consumed
	tl := 2
	lastLF := true // the last byte consumed was '\n' (a '.' now starts a line)
	var total, dots int64
	data := dst
	var w [8]byte
	for {
		if br.Buffered() == 0 {
			if _, err := br.Peek(1); err != nil {
				return 0, dst, err
			}
		}
		buf, _ := br.Peek(br.Buffered())
		if drop {
			return 0, dst, errSinkDrop
		}
		end := -1 // end of the terminator in buf
		n := copy(w[:], tail[:tl])
		n += copy(w[n:], buf)
		if i := bytes.Index(w[:n], sinkDotEnd); i >= 0 && i < tl {
			end = i + len(sinkDotEnd) - tl
		} else if i := bytes.Index(buf, sinkDotEnd); i >= 0 {
			end = i + len(sinkDotEnd)
		}
		chunk := buf
		if end >= 0 {
			chunk = buf[:end]
		}
		if lastLF && chunk[0] == '.' {
			dots++
		}
		dots += int64(bytes.Count(chunk, sinkLFDot))
		lastLF = chunk[len(chunk)-1] == '\n'
		total += int64(len(chunk))
		if keep && len(data)-len(dst) <= 2*sinkMaxSize { // dot-stuffing at most doubles the size
			data = append(data, chunk...)
		}
		if len(chunk) >= 4 {
			copy(tail[:], chunk[len(chunk)-4:])
			tl = 4
		} else {
			n := copy(w[:], tail[:tl])
			n += copy(w[n:], chunk)
			tl = copy(tail[:], w[max(0, n-4):n])
		}
		br.Discard(len(chunk))
		if end >= 0 {
			break
		}
	}
	// The terminator's dot was counted as a stuffed one.
	size := total - int64(len(".\r\n")) - (dots - 1)
	if keep {
		if int64(len(data)-len(dst)) != total {
			return size, data[:len(dst)], nil // too big: not kept
		}
		content := sinkUnstuff(data[len(dst) : len(data)-len(".\r\n")])
		data = data[:len(dst)+len(content)]
	}
	return size, data, nil
}

// sinkUnstuff removes the leading dot of every line of b that starts with
// one, in place.
func sinkUnstuff(b []byte) []byte {
	out := b[:0]
	for len(b) > 0 {
		if b[0] == '.' {
			b = b[1:]
		}
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			return append(out, b...)
		}
		out = append(out, b[:i+1]...)
		b = b[i+1:]
	}
	return out
}

// sinkReplies are the wire texts of the injected failures and refusals, in
// the order mailTemp, mailPerm, rcptTemp, rcptPerm, dataTemp, dataPerm,
// down, busy. "{ip}" is replaced by the client's IP address.
type sinkReplies struct {
	mailTemp, mailPerm, rcptTemp, rcptPerm, dataTemp, dataPerm, down, busy string
}

// sinkStyle builds the replies of a style from texts of the form
// "code ext line1|line2|...", giving multi-line replies for several lines.
func sinkStyle(texts ...string) *sinkReplies {
	out := make([]string, len(texts))
	for i, t := range texts {
		code, rest, _ := strings.Cut(t, " ")
		ext, text, _ := strings.Cut(rest, " ")
		lines := strings.Split(text, "|")
		var b strings.Builder
		for j, l := range lines {
			sep := "-"
			if j == len(lines)-1 {
				sep = " "
			}
			b.WriteString(code + sep + ext + " " + l + "\r\n")
		}
		out[i] = b.String()
	}
	return &sinkReplies{out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7]}
}

var sinkReplyStyles = map[string]*sinkReplies{
	"": sinkStyle(
		"451 4.3.0 Temporary failure, please try again later",
		"550 5.7.1 Sender rejected by local policy",
		"452 4.2.2 Mailbox full",
		"550 5.1.1 No such user here",
		"451 4.3.0 Temporary failure while processing the message, please try again later",
		"554 5.6.0 Message content rejected",
		"421 4.3.2 Service not available, closing transmission channel",
		"421 4.7.0 Too many connections"),
	"gmail": sinkStyle(
		"421 4.7.0 Unusual sending activity from your IP address has been detected and|delivery from it is being rate limited for now. Review the bulk sender|guidelines of this service. Try again later, closing connection. sink-gsmtp",
		"550 5.7.1 The IP address you are sending from has a very low reputation, so|this message has been blocked. Review the bulk sender guidelines of|this service. sink-gsmtp",
		"452 4.2.2 The recipient's inbox is out of storage space. Please direct the|recipient to the storage help pages of this service. sink-gsmtp",
		"550 5.1.1 The email account that you tried to reach does not exist. Please|check the recipient's email address for typos or unnecessary spaces.|sink-gsmtp",
		"451 4.3.0 The mail server temporarily rejected this message. Please try again|later. sink-gsmtp",
		"554 5.6.0 The message is malformed and was not accepted. Check its MIME|structure and headers. sink-gsmtp",
		"421 4.3.2 The service is currently unavailable. Try again later, closing|connection. sink-gsmtp",
		"421 4.7.0 Too many connections from your IP address at the same time. Try|again later, closing connection. sink-gsmtp"),
	"outlook": sinkStyle(
		"451 4.7.500 Server busy. Please try again later from [{ip}]. (S77714) [sink.outlook.test]",
		"550 5.7.1 Service unavailable, Client host [{ip}] blocked by the sender reputation list (S3140) [sink.outlook.test]",
		"452 4.2.2 STOREDRV.Deliver; mailbox quota exceeded, please try again later [sink.outlook.test]",
		"550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup [sink.outlook.test]",
		"451 4.4.0 Temporary server error. Please try again later. PRX3 [sink.outlook.test]",
		"554 5.6.0 STOREDRV.Submit; invalid message content [sink.outlook.test]",
		"421 4.3.2 Service not available, closing transmission channel [sink.outlook.test]",
		"421 4.7.0 Too many connections from [{ip}], please try again later [sink.outlook.test]"),
	"yahoo": sinkStyle(
		"421 4.7.0 [TSS04] Messages from {ip} temporarily deferred due to unexpected volume or user complaints - see the sender help pages",
		"554 5.7.9 Message not accepted for policy reasons. See the sender help pages",
		"452 4.2.2 [MBOX] Mailbox over quota, please try again later",
		"550 5.1.1 delivery error: dd This user doesn't have an account here [-5]",
		"451 4.3.0 [TSS09] Message temporarily deferred, please try again later",
		"554 5.6.0 Message not accepted: content could not be processed",
		"421 4.3.2 Service temporarily unavailable, closing connection",
		"421 4.7.0 [TSS03] Too many connections from {ip}, please try again later"),
}
