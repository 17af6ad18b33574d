package server

import (
	"strings"
	"testing"
	"time"

	"github.com/mtaproject/mta/bench"
)

// TestMailLoopsBackToMyself: an MX record or a route that points at this
// server must not make a message go round: the hosts that are this server
// are dropped with every less preferred one (RFC 5321 §5.1), and a domain
// left with none fails at once with 5.4.6. A less preferred self leaves the
// better MX in use.
func TestMailLoopsBackToMyself(t *testing.T) {
	w := newWorldOn(t, true, "", `routes: {"routed.test": {hosts: ["[127.0.0.1]"]}}`)
	// loop.test: its only MX is this server (127.0.0.1 at the delivery port).
	w.dns.SetMX("loop.test", bench.MX{Pref: 0, Host: "localhost.loop.test"})
	w.dns.SetA("localhost.loop.test", "127.0.0.1")
	// backup.test: the best MX is another host; this server is a backup.
	w.dns.SetMX("backup.test", bench.MX{Pref: 10, Host: "mx.backup.test"}, bench.MX{Pref: 20, Host: "self.backup.test"})
	w.dns.SetA("mx.backup.test", "127.0.0.2")
	w.dns.SetA("self.backup.test", "127.0.0.1")
	primary := w.sink("127.0.0.2", bench.SinkConfig{})
	// named.test: an MX named like this server.
	w.dns.SetMX("named.test", bench.MX{Pref: 5, Host: "mta.test"})
	w.dns.SetA("mta.test", "127.0.0.3")
	w.bounces()

	ids := map[string]string{}
	for _, rcpt := range []string{"a@loop.test", "b@routed.test", "c@named.test", "d@backup.test"} {
		ids[rcpt] = w.send("app@example.org", []string{rcpt}, msg)
	}
	for _, rcpt := range []string{"a@loop.test", "b@routed.test", "c@named.test"} {
		rep := w.bounceFor(ids[rcpt], 10*time.Second)
		domain := rcpt[strings.IndexByte(rcpt, '@')+1:]
		if f := rep.rcpts[rcpt]; f["Status"] != "5.4.6" || !strings.Contains(rep.data, "554 5.4.6 mail for "+domain+" loops back to myself") {
			t.Errorf("%s: bounce fields %v", rcpt, f)
		}
	}
	w.waitFor("backup.test delivered to its primary", 10*time.Second, func() bool { return w.gone(ids["d@backup.test"]) })
	if n := len(primary.Messages()); n != 1 {
		t.Fatalf("the primary MX received %d messages", n)
	}
	// Nothing went round: the spool is empty, three bounces were sent.
	time.Sleep(500 * time.Millisecond)
	if n := w.srv.Spool().Count(); n != 0 {
		t.Fatalf("spool holds %d messages, want none (a loop multiplies them)", n)
	}
	if n := len(w.bounces().Messages()); n != 3 {
		t.Fatalf("%d bounces, want 3", n)
	}
}
