package smtpd

import (
	"bytes"
	"crypto/tls"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mtaproject/mta/mta"
)

// ConnLimits caps SMTP connections in total and per client IP, across all
// listeners that share it.
type ConnLimits struct {
	maxTotal, maxPerIP int
	mu                 sync.Mutex
	total              int
	perIP              map[netip.Addr]int
}

// NewConnLimits returns limits of maxTotal connections and maxPerIP per
// client address.
func NewConnLimits(maxTotal, maxPerIP int) *ConnLimits {
	return &ConnLimits{maxTotal: maxTotal, maxPerIP: maxPerIP, perIP: map[netip.Addr]int{}}
}

// acquire takes a slot for ip, or returns the reply that refuses it.
func (l *ConnLimits) acquire(ip netip.Addr) (*mta.Reply, string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.total >= l.maxTotal {
		return &mta.ReplyTooManyConnections, "max_connections"
	}
	if l.perIP[ip] >= l.maxPerIP {
		return &mta.ReplyTooManyFromIP, "max_connections_per_ip"
	}
	l.total++
	l.perIP[ip]++
	return nil, ""
}

func (l *ConnLimits) release(ip netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total--
	if l.perIP[ip]--; l.perIP[ip] <= 0 {
		delete(l.perIP, ip)
	}
}

// listener enforces the connection limits at accept time, before go-smtp
// sees the connection, and tracks open connections for graceful shutdown.
type listener struct {
	net.Listener
	srv *Server
}

func (l *listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		ip := remoteIP(c)
		if reply, reason := l.srv.opts.Limits.acquire(ip); reply != nil {
			l.srv.opts.Metrics.refused.WithLabelValues(l.srv.opts.Name, reason).Inc()
			go refuse(c, reply)
			continue
		}
		tc := &trackedConn{Conn: c, srv: l.srv, ip: ip}
		tc.sync.enabled = true
		tc.sync.rejectEarly = l.srv.opts.RejectEarlyData
		l.srv.track(tc, true)
		l.srv.opts.Metrics.connections.WithLabelValues(l.srv.opts.Name).Inc()
		l.srv.opts.Metrics.active.WithLabelValues(l.srv.opts.Name).Inc()
		return tc, nil
	}
}

func refuse(c net.Conn, r *mta.Reply) {
	_ = c.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = c.Write([]byte(r.Error() + "\r\n"))
	_ = c.Close()
}

func remoteIP(c net.Conn) netip.Addr {
	if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}

// trackedConn is one client connection as accepted. It releases its limit
// slot once on Close, knows whether its session is inside a transaction
// (so that shutdown closes only idle ones), and watches the cleartext
// stream for content sent before the 354 reply.
type trackedConn struct {
	net.Conn
	srv    *Server
	ip     netip.Addr
	busy   atomic.Bool // between MAIL and the end of the transaction
	closed atomic.Bool
	sync   syncDetector // used only by the connection's own goroutine
	out    []byte       // replies not yet written
}

// Replies are collected and written in one system call when the server
// next needs input from the client (RFC 2920 §3.2 allows a server to hold
// replies back while pipelined commands are pending), and at Close.
// go-smtp writes every reply line with a separate flush; without this, a
// pipelined MAIL, RCPT, DATA group costs three writes instead of one.

func (c *trackedConn) Read(b []byte) (int, error) {
	if err := c.flush(); err != nil {
		return 0, err
	}
	n, err := c.Conn.Read(b)
	if n > 0 && c.sync.enabled {
		c.sync.read(b[:n])
	}
	return n, err
}

func (c *trackedConn) Write(b []byte) (int, error) {
	if c.sync.enabled {
		c.sync.wrote(b)
	}
	if len(c.out)+len(b) > maxHeldReplies {
		if err := c.flush(); err != nil {
			return 0, err
		}
	}
	c.out = append(c.out, b...)
	return len(b), nil
}

// maxHeldReplies bounds the replies held back before a write.
const maxHeldReplies = 16 << 10

func (c *trackedConn) flush() error {
	if len(c.out) == 0 {
		return nil
	}
	_, err := c.Conn.Write(c.out)
	c.out = c.out[:0]
	return err
}

func (c *trackedConn) Close() error {
	_ = c.flush()
	if c.closed.CompareAndSwap(false, true) {
		c.srv.opts.Limits.release(c.ip)
		c.srv.track(c, false)
		c.srv.opts.Metrics.active.WithLabelValues(c.srv.opts.Name).Dec()
	}
	return c.Conn.Close()
}

// connOf returns the trackedConn under a go-smtp connection, looking
// through TLS.
func connOf(nc net.Conn) *trackedConn {
	if t, ok := nc.(*tls.Conn); ok {
		nc = t.NetConn()
	}
	tc, _ := nc.(*trackedConn)
	return tc
}

// syncDetector follows the client's cleartext byte stream and the server's
// replies to find message content sent before the 354 reply to DATA. RFC
// 2920 §3.1 makes DATA the last command of a pipelined group: a client that
// sends its content before the 354 is either broken or attempting SMTP
// smuggling. It only ever errs towards missing a violation (when content
// arrives in a later read), never towards flagging a client that waited.
// After STARTTLS the stream is ciphertext, and the detector stops.
type syncDetector struct {
	enabled     bool    // off after STARTTLS
	rejectEarly bool    // flag content sent before the 354
	inData      bool    // between a 354 reply and the end-of-data marker
	line        [8]byte // start of the current command line
	lineLen     int
	sawData     bool // a DATA command line was read and not yet answered with 354
	early       int  // bytes read after that DATA line
	tail        []byte
	carryCR     bool // the data so far ends in a CR that may start a CRLF
	bare        bool // the data had a CR or LF outside a CRLF pair

	// result hands the findings about one DATA transaction to the session:
	// published when the end-of-data marker is read, taken by Data. It is
	// atomic because go-smtp runs Data on another goroutine for BDAT.
	result atomic.Uint32
}

// Bits of syncDetector.result.
const (
	resultValid = 1 << iota // the transaction went through 354 and was scanned
	resultBare              // its data had a bare CR or LF
	resultEarly             // its content came before the 354 (set without resultValid)
)

var endOfData = []byte("\r\n.\r\n")

func (d *syncDetector) read(b []byte) {
	for len(b) > 0 {
		if d.inData {
			b = d.scanData(b)
			continue
		}
		if d.sawData {
			d.early += len(b)
		}
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			d.appendLine(b)
			return
		}
		d.appendLine(b[:i])
		d.endLine()
		b = b[i+1:]
	}
}

func (d *syncDetector) appendLine(b []byte) {
	copy(d.line[min(d.lineLen, len(d.line)):], b)
	d.lineLen += len(b)
}

func (d *syncDetector) endLine() {
	line := d.line[:min(d.lineLen, len(d.line))]
	line = bytes.TrimRight(line, "\r \t")
	if d.lineLen <= 7 && bytes.EqualFold(line, []byte("DATA")) {
		d.sawData, d.early = true, 0
	}
	if d.lineLen <= 9 && bytes.EqualFold(line, []byte("STARTTLS")) {
		d.enabled = false
	}
	d.lineLen = 0
}

// scanData consumes content up to and including the end-of-data marker and
// returns what follows it.
func (d *syncDetector) scanData(b []byte) []byte {
	t := len(d.tail)
	joined := append(d.tail, b[:min(len(b), len(endOfData)-1)]...)
	if i := bytes.Index(joined, endOfData); i >= 0 {
		end := i + len(endOfData) - t
		d.checkLineEndings(b[:end])
		d.endOfData()
		return b[end:]
	}
	if i := bytes.Index(b, endOfData); i >= 0 {
		d.checkLineEndings(b[:i+len(endOfData)])
		d.endOfData()
		return b[i+len(endOfData):]
	}
	d.checkLineEndings(b)
	keep := b[max(0, len(b)-(len(endOfData)-1)):]
	if len(keep) < len(endOfData)-1 {
		keep = append(d.tail, keep...)
		keep = keep[max(0, len(keep)-(len(endOfData)-1)):]
	}
	d.tail = append(d.tail[:0], keep...)
	return nil
}

// endOfData publishes the transaction's findings and returns to commands.
func (d *syncDetector) endOfData() {
	r := uint32(resultValid)
	if d.bare {
		r |= resultBare
	}
	d.result.Store(r)
	d.inData, d.tail = false, d.tail[:0]
}

// checkLineEndings notes a CR or LF outside a CRLF pair in raw message
// data. It sees the bytes before go-smtp's dot handling, which drops a CR
// that follows a leading dot.
func (d *syncDetector) checkLineEndings(seg []byte) {
	if len(seg) == 0 {
		return
	}
	crs, lfs := bytes.Count(seg, []byte("\r")), bytes.Count(seg, []byte("\n"))
	pairs := bytes.Count(seg, []byte("\r\n"))
	if d.carryCR {
		if seg[0] != '\n' {
			d.bare = true
		} else {
			pairs++
			crs++
		}
	}
	d.carryCR = seg[len(seg)-1] == '\r'
	if d.carryCR {
		crs--
	}
	if crs != pairs || lfs != pairs {
		d.bare = true
	}
}

func (d *syncDetector) wrote(b []byte) {
	if d.sawData && bytes.HasPrefix(b, []byte("354")) {
		early := d.early > 0
		d.sawData, d.early = false, 0
		if early {
			// The content, and maybe its end, was already read as if it
			// were commands: where the data ends in the stream is
			// unknown, so report the violation now and stay in command
			// mode; the session checks the body itself.
			if d.rejectEarly {
				d.result.Store(resultEarly)
			}
			return
		}
		d.inData, d.carryCR, d.bare = true, false, false
		d.tail = append(d.tail[:0], "\r\n"...) // the data starts at a line start
	}
}

// take returns and clears the findings of the last DATA transaction, and
// whether there are any: none for BDAT, which has no 354 and no end-of-data
// marker, and none after STARTTLS, when the stream is ciphertext.
func (d *syncDetector) take() (bare, early, valid bool) {
	r := d.result.Swap(0)
	return r&resultBare != 0, r&resultEarly != 0, r&resultValid != 0
}
