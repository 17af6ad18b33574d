package smtpd

import (
	"io"
	"net"
	"net/netip"
	"sync"
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

// SetMax changes the limits: connections already open stay, new ones are
// counted against the new limits.
func (l *ConnLimits) SetMax(maxTotal, maxPerIP int) {
	l.mu.Lock()
	l.maxTotal, l.maxPerIP = maxTotal, maxPerIP
	l.mu.Unlock()
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

// refuse answers a connection over a limit and closes it.
func refuse(c net.Conn, r *mta.Reply) {
	_ = c.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = c.Write([]byte(r.Error() + "\r\n"))
	lingerClose(c, nil)
}

func remoteIP(c net.Conn) netip.Addr {
	if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}

// lingerTime bounds how long a closing connection is drained.
const lingerTime = time.Second

// lingerClose closes a connection so that the last reply reaches the
// client. Closing a TCP socket with unread input makes the kernel send a
// reset, and a reset can destroy the reply before the client reads it. So
// the write side is shut first (after TLS's close_notify when tlsConn is
// set), then what the client still sends is read and dropped, for at most
// lingerTime, and only then is the socket closed.
func lingerClose(raw net.Conn, tlsConn interface{ CloseWrite() error }) {
	if tlsConn != nil {
		_ = raw.SetWriteDeadline(time.Now().Add(lingerTime))
		_ = tlsConn.CloseWrite()
	}
	if cw, ok := raw.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		_ = raw.SetReadDeadline(time.Now().Add(lingerTime))
		_, _ = io.CopyN(io.Discard, raw, 1<<20)
	}
	_ = raw.Close()
}
