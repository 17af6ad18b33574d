package server

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/mtaproject/mta/bench"
)

// TestLifetimeAppliesToEveryFailure: delivery.max_lifetime ends the mail
// of destinations that are never reached (connection refused, a 421
// greeting, required TLS not offered) as surely as after 4xx replies, and
// each recipient says why it waited.
func TestLifetimeAppliesToEveryFailure(t *testing.T) {
	w := newWorld(t, ", max_lifetime: 3s", `routes: {"tls.test": {hosts: ["[127.0.0.4]"], tls: required}}`)
	w.dns.SetA("refused.test", "127.0.0.2") // nobody listens there
	w.dns.SetA("greeting.test", "127.0.0.3")
	w.sink("127.0.0.3", bench.SinkConfig{Down: true}) // 421 at the greeting
	w.sink("127.0.0.4", bench.SinkConfig{})           // no STARTTLS
	w.bounces()
	cases := map[string]string{
		"a@refused.test":  "connect to refused.test[127.0.0.2]:",
		"b@refused.test":  "connection refused",
		"c@greeting.test": "421",
		"d@tls.test":      "TLS",
	}
	ids := map[string]string{}
	for rcpt := range cases {
		ids[rcpt] = w.send("app@example.org", []string{rcpt}, msg)
	}
	for rcpt, why := range cases {
		rep := w.bounceFor(ids[rcpt], 20*time.Second)
		f := rep.rcpts[rcpt]
		text := strings.Join(strings.Fields(rep.data), " ")
		if f["Action"] != "failed" || f["Status"] != "5.4.7" || !strings.Contains(text, "Delivery time expired after 3s; last error: ") || !strings.Contains(text, why) {
			t.Errorf("%s: bounce fields %v, want 5.4.7 and %q in the text:\n%s", rcpt, f, why, rep.data)
		}
		if f["Last-Attempt-Date"] == "" {
			t.Errorf("%s: no attempt made", rcpt)
		}
		if !w.gone(ids[rcpt]) {
			t.Errorf("%s: the expired message is still queued", rcpt)
		}
	}
}

// TestConnectionAttemptsAreBounded: one attempt tries at most
// delivery.max_mx_addresses addresses, however many the domain has.
func TestConnectionAttemptsAreBounded(t *testing.T) {
	w := newWorld(t, ", max_mx_addresses: 3", "")
	var ips []string
	var sinks []*bench.Sink
	for i := 2; i <= 9; i++ {
		ip := fmt.Sprintf("127.0.0.%d", i)
		ips = append(ips, ip)
		sinks = append(sinks, w.sink(ip, bench.SinkConfig{Down: true}))
	}
	w.dns.SetA("many.test", ips...)
	id := w.send("app@example.org", []string{"x@many.test"}, msg)
	w.waitFor("the first attempt", 10*time.Second, func() bool { return w.recipient(id, "x@many.test").Attempts > 0 })
	tried := int64(0)
	for _, s := range sinks {
		tried += s.Stats().ConnectionsRefused
	}
	if tried != 3 {
		t.Fatalf("one attempt connected to %d of 8 addresses, want 3", tried)
	}
}
