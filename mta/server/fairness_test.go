package server

import (
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/mtaproject/mta/bench"
)

// TestIdleDestinationIsNotStarvedByADeepOne: with the active window full of
// a slow destination's backlog, fresh mail for an idle destination is
// delivered at once, and the backlog still drains.
func TestIdleDestinationIsNotStarvedByADeepOne(t *testing.T) {
	w := newWorld(t, ", active_window: 40, max_connections_per_destination: 2, initial_connections_per_destination: 2", "")
	w.dns.SetA("slow.test", "127.0.0.2")
	w.dns.SetA("idle.test", "127.0.0.3")
	slow := w.sink("127.0.0.2", bench.SinkConfig{Faults: bench.Faults{Latency: 50 * time.Millisecond}})
	idle := w.sink("127.0.0.3", bench.SinkConfig{})

	// A deep backlog for slow.test, five times the window, sent over one
	// pipelining session.
	const deep = 200
	c, err := net.Dial("tcp", w.srv.Addr("smtp"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var b strings.Builder
	b.WriteString("EHLO bulk.test\r\n")
	for i := 0; i < deep; i++ {
		fmt.Fprintf(&b, "MAIL FROM:<app@example.org>\r\nRCPT TO:<u%d@slow.test>\r\nDATA\r\n", i)
		// DATA ends a pipelined group: the content waits for the 354.
		c.Write([]byte(b.String()))
		b.Reset()
		buf := make([]byte, 4096)
		got := ""
		for !strings.Contains(got, "354 ") {
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			n, err := c.Read(buf)
			if err != nil {
				t.Fatal(err)
			}
			got += string(buf[:n])
		}
		b.WriteString("Subject: backlog\r\n\r\nx\r\n.\r\n")
	}
	c.Write([]byte(b.String() + "QUIT\r\n"))
	all := ""
	buf := make([]byte, 4096)
	for !strings.Contains(all, "221 ") {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("backlog session: %v", err)
		}
		all += string(buf[:n])
	}
	w.waitFor("the backlog started", 10*time.Second, func() bool { return len(slow.Messages()) > 0 })

	start := time.Now()
	id := w.send("app@example.org", []string{"someone@idle.test"}, msg)
	w.waitFor("the idle destination's mail", 10*time.Second, func() bool { return w.gone(id) })
	if took := time.Since(start); took > time.Second {
		t.Fatalf("mail for an idle destination took %v behind a deep one (want under 1s)", took)
	}
	if len(idle.Messages()) != 1 {
		t.Fatal("the idle destination did not get its message")
	}
	if left := w.srv.Spool().Count(); left < deep/2 {
		t.Fatalf("the backlog was nearly gone (%d left) before the test: make it slower", left)
	}
}
