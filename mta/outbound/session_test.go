package outbound

import (
	"bufio"
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/mta/resolve"
	"github.com/mtaproject/mta/mta/smtpclient"
	"github.com/mtaproject/mta/scheduler"
)

// oneMessageServer takes one message per connection, then answers the
// next command with 421 and closes (a per-session message limit).
func oneMessageServer(t *testing.T, pipelining bool) net.Listener {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				r, w := bufio.NewReader(c), bufio.NewWriter(c)
				say := func(s string) { w.WriteString(s + "\r\n"); w.Flush() }
				say("220 mx ESMTP")
				done := false
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					cmd := strings.ToUpper(strings.TrimSpace(line))
					switch {
					case done && cmd != "QUIT":
						say("421 4.7.0 one message per session, closing")
						return
					case strings.HasPrefix(cmd, "EHLO"):
						if pipelining {
							say("250-mx\r\n250 PIPELINING")
						} else {
							say("250 mx")
						}
					case cmd == "DATA":
						say("354 go")
						for {
							l, err := r.ReadString('\n')
							if err != nil {
								return
							}
							if l == ".\r\n" {
								break
							}
						}
						say("250 2.0.0 ok")
						done = true
					case cmd == "QUIT":
						say("221 bye")
						return
					default:
						say("250 ok")
					}
				}
			}(c)
		}
	}()
	return ln
}

// TestA421AfterACompletedTransactionIsStale: a server that ends the
// session with 421 after a message (a limit of messages per session) has
// spent the connection; it is not failing. Without PIPELINING the next
// transaction's RSET gets the 421, with it the MAIL of the transaction
// begun behind the data: both are stale (a new connection to the same
// host, no attempt), neither marks the address failing nor asks for
// another host.
func TestA421AfterACompletedTransactionIsStale(t *testing.T) {
	for _, pipelining := range []bool{false, true} {
		ln := oneMessageServer(t, pipelining)
		port := ln.Addr().(*net.TCPAddr).Port
		d := &resolve.Destination{Key: "x", Domain: "x.test", Hosts: []resolve.Host{
			{Name: "mx1", Preference: 10, Port: port, Addrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}},
			{Name: "mx2", Preference: 20, Port: port, Addrs: []netip.Addr{netip.MustParseAddr("127.0.0.2")}},
		}}
		tr := New(nil, nil, Settings{Client: smtpclient.Options{LocalName: "client.test", Timeouts: smtpclient.Timeouts{}}})
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := tr.Connect(ctx, route{d})
		if err != nil {
			t.Fatal(err)
		}
		pc := c.(*conn)
		e1 := &scheduler.Envelope{From: "s@a.test", Recipients: []mta.Recipient{{Address: "r1@x.test"}}}
		e2 := &scheduler.Envelope{From: "s@a.test", Recipients: []mta.Recipient{{Address: "r2@x.test"}}}
		body := []byte("Subject: x\r\n\r\nx\r\n")
		if _, err := pc.SendThen(ctx, e1, body, func() (*scheduler.Envelope, []byte) { return e2, body }); err != nil {
			t.Fatal(err)
		}
		_, err = pc.SendThen(ctx, e2, body, nil)
		cancel()
		c.Close()
		addr := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port)).String()
		if !errors.Is(err, scheduler.ErrStale) || errors.Is(err, scheduler.ErrOtherHost) || tr.failing.has(addr) {
			t.Errorf("pipelining %v: a session-ending 421 after a delivered message: %v, stale %v, failing %v; want stale only",
				pipelining, err, errors.Is(err, scheduler.ErrStale), tr.failing.has(addr))
		}
	}
}
