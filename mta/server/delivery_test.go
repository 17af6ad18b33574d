package server

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"go.uber.org/zap"

	"github.com/mtaproject/mta/bench"
	"github.com/mtaproject/mta/mta/config"
	"github.com/mtaproject/mta/spool"
)

// world is a complete delivery setup on loopback: the server under test, a
// DNS server for the recipient domains, and SMTP sinks on 127.0.0.x, all
// on one port number so that MX hosts can be told apart by address.
type world struct {
	t     *testing.T
	srv   *Server
	dns   *bench.DNSStub
	port  int
	sinks map[string]*bench.Sink // by IP
	stop  func()
}

// newWorld starts the server; delivery adds settings to the delivery
// section (", key: value" items), extraYAML adds top-level sections.
func newWorld(t *testing.T, delivery, extraYAML string) *world {
	t.Helper()
	return newWorldOn(t, false, delivery, extraYAML)
}

// newWorldOn is newWorld; with onDeliveryPort the server's SMTP listener
// is 127.0.0.1 at the delivery port, so that a next hop of 127.0.0.1 is
// the server itself.
func newWorldOn(t *testing.T, onDeliveryPort bool, delivery, extraYAML string) *world {
	t.Helper()
	w := &world{t: t, sinks: map[string]*bench.Sink{}}
	var err error
	w.dns, err = bench.StartDNSStub()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.dns.Close() })
	w.dns.SetTTL(1)
	// Find a port free on 127.0.0.1; sinks on other 127.0.0.x reuse it.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	w.port = l.Addr().(*net.TCPAddr).Port
	l.Close()
	smtpAddr := "127.0.0.1:0"
	if onDeliveryPort {
		smtpAddr = fmt.Sprintf("127.0.0.1:%d", w.port)
	}
	yaml := fmt.Sprintf(`data_dir: %s
hostname: mta.test
listen: {smtp: "%s", submission: "", pop3: "127.0.0.1:0", http: "127.0.0.1:0"}
dns: {servers: ["%s"], timeout: 1s, ipv6: false}
delivery: {port: %d, min_backoff: 1s, max_backoff: 2s, idle_timeout: 5s, tls: none%s}
smtp: {shutdown_timeout: 5s, max_connections_per_ip: 1000}
%s`, t.TempDir(), smtpAddr, w.dns.Addr(), w.port, delivery, extraYAML)
	cfg, err := config.Parse([]byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	w.srv, err = New(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.srv.Run(ctx) }()
	w.stop = func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}
	t.Cleanup(func() {
		if w.stop != nil {
			w.stop()
		}
	})
	return w
}

// sink starts a sink on ip (127.0.0.x) at the world's port.
func (w *world) sink(ip string, cfg bench.SinkConfig) *bench.Sink {
	w.t.Helper()
	cfg.Addr = net.JoinHostPort(ip, strconv.Itoa(w.port))
	cfg.Keep = true
	s, err := bench.StartSink(cfg)
	if err != nil {
		w.t.Skipf("cannot listen on %s: %v", cfg.Addr, err)
	}
	w.t.Cleanup(func() { s.Close() })
	w.sinks[ip] = s
	return s
}

// send submits one message over SMTP and returns its queue ID.
func (w *world) send(from string, to []string, body string) string {
	w.t.Helper()
	rcpts := make([]rcpt, len(to))
	for i, a := range to {
		rcpts[i] = rcpt{addr: a}
	}
	return w.sendDSN(from, nil, rcpts, body)
}

// rcpt is a recipient with its DSN parameters (nil: none).
type rcpt struct {
	addr string
	opts *smtp.RcptOptions
}

// sendDSN is send with DSN parameters on MAIL (mail may be nil) and RCPT.
func (w *world) sendDSN(from string, mail *smtp.MailOptions, to []rcpt, body string) string {
	w.t.Helper()
	c, err := smtp.Dial(w.srv.Addr("smtp"))
	if err != nil {
		w.t.Fatal(err)
	}
	defer c.Close()
	if err := c.Mail(from, mail); err != nil {
		w.t.Fatal(err)
	}
	for _, r := range to {
		if err := c.Rcpt(r.addr, r.opts); err != nil {
			w.t.Fatal(err)
		}
	}
	wc, err := c.Data()
	if err != nil {
		w.t.Fatal(err)
	}
	fmt.Fprint(wc, body)
	resp, err := wc.CloseWithResponse()
	if err != nil {
		w.t.Fatal(err)
	}
	return strings.TrimPrefix(resp.StatusText, "2.0.0 Ok: queued as ")
}

func (w *world) waitFor(what string, timeout time.Duration, cond func() bool) {
	w.t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			w.t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// gone reports whether message id has left the spool.
func (w *world) gone(id string) bool {
	_, err := w.srv.Spool().Get(id)
	return err != nil
}

func (w *world) record(id string) *spool.Message {
	w.t.Helper()
	m, err := w.srv.Spool().Get(id)
	if err != nil {
		w.t.Fatal(err)
	}
	return m
}

func (w *world) recipient(id, addr string) spool.RecipientState {
	w.t.Helper()
	for _, r := range w.record(id).Recipients {
		if r.Address == addr {
			return r
		}
	}
	w.t.Fatalf("%s has no recipient %s", id, addr)
	return spool.RecipientState{}
}

const msg = "From: app@example.org\r\nSubject: delivery test\r\n\r\nHello.\r\n.A line with a dot.\r\n"

func TestDeliveryThroughMXPreferences(t *testing.T) {
	w := newWorld(t, "", "")
	// a.test: the first MX (127.0.0.2) has nobody listening; the second takes it.
	w.dns.SetMX("a.test", bench.MX{Pref: 10, Host: "mx1.a.test"}, bench.MX{Pref: 20, Host: "mx2.a.test"})
	w.dns.SetA("mx1.a.test", "127.0.0.2")
	w.dns.SetA("mx2.a.test", "127.0.0.3")
	second := w.sink("127.0.0.3", bench.SinkConfig{})
	// b.test: no MX, an A record: implicit MX.
	w.dns.SetA("b.test", "127.0.0.4")
	implicit := w.sink("127.0.0.4", bench.SinkConfig{})

	id := w.send("app@example.org", []string{"x@a.test", "y@b.test", "z@a.test"}, msg)
	w.waitFor("delivery", 15*time.Second, func() bool { return w.gone(id) })

	for name, s := range map[string]*bench.Sink{"second MX of a.test": second, "implicit MX of b.test": implicit} {
		got := s.Messages()
		if len(got) != 1 {
			t.Fatalf("%s received %d messages", name, len(got))
		}
		data := string(got[0].Data)
		if !strings.HasSuffix(data, msg) || !strings.HasPrefix(data, "Received: from ") || !strings.Contains(data, "id "+id) {
			t.Fatalf("%s received %q", name, data)
		}
		if got[0].From != "app@example.org" {
			t.Fatalf("%s: MAIL FROM %q", name, got[0].From)
		}
	}
	if to := second.Messages()[0].To; len(to) != 2 || to[0] != "x@a.test" || to[1] != "z@a.test" {
		t.Fatalf("a.test recipients in one transaction: %v", to)
	}
}

func TestPermanentRoutingFailures(t *testing.T) {
	w := newWorld(t, "", "")
	w.dns.SetNullMX("null.test")
	w.bounces()
	ok := w.sink("127.0.0.1", bench.SinkConfig{})
	w.dns.SetA("ok.test", "127.0.0.1")
	id := w.send("app@example.org", []string{"a@null.test", "b@nx.test", "c@ok.test"}, msg)
	w.waitFor("outcomes", 15*time.Second, func() bool { return w.gone(id) })
	if len(ok.Messages()) != 1 {
		t.Fatalf("the deliverable recipient got %d messages", len(ok.Messages()))
	}
	// One bounce for the two that failed, whatever the order they failed in.
	w.waitFor("the bounces", 10*time.Second, func() bool { return len(w.bounces().Messages()) >= 1 })
	time.Sleep(200 * time.Millisecond)
	status := map[string]string{}
	for _, m := range w.bounces().Messages() {
		for addr, f := range parseReport(string(m.Data)).rcpts {
			status[addr] = f["Status"]
		}
	}
	if status["a@null.test"] != "5.1.10" || status["b@nx.test"] != "5.1.2" || len(status) != 2 {
		t.Fatalf("bounced recipients and their status: %v (want null MX 5.1.10, NXDOMAIN 5.1.2)", status)
	}
}

func TestTemporaryFailuresAreRetried(t *testing.T) {
	w := newWorld(t, "", "")
	// servfail.test: the DNS fails, then recovers.
	w.dns.SetA("servfail.test", "127.0.0.1")
	w.dns.SetServFail("servfail.test", true)
	// later.test: 451 at the end of data, then 250.
	w.dns.SetA("later.test", "127.0.0.2")
	// drop.test: the connection drops mid-DATA, then works.
	w.dns.SetA("drop.test", "127.0.0.3")
	// down.test: the server is down (421 at connect), then comes back.
	w.dns.SetA("down.test", "127.0.0.4")
	s1 := w.sink("127.0.0.1", bench.SinkConfig{})
	later := w.sink("127.0.0.2", bench.SinkConfig{Faults: bench.Faults{DataTempFail: 1}})
	drop := w.sink("127.0.0.3", bench.SinkConfig{Faults: bench.Faults{DropInData: 1}})
	down := w.sink("127.0.0.4", bench.SinkConfig{Down: true})

	ids := map[string]string{}
	for _, d := range []string{"servfail", "later", "drop", "down"} {
		ids[d] = w.send("app@example.org", []string{"r@" + d + ".test"}, msg)
	}
	// Every first attempt fails temporarily and is recorded.
	w.waitFor("first attempts", 15*time.Second, func() bool {
		for _, id := range []string{ids["servfail"], ids["later"], ids["drop"]} {
			if r := w.record(id).Recipients[0]; r.Attempts < 1 || r.Status != spool.Queued {
				return false
			}
		}
		return down.Stats().ConnectionsRefused > 0
	})
	if r := w.recipient(ids["servfail"], "r@servfail.test"); !strings.Contains(r.LastReply, "4.4.3") {
		t.Fatalf("SERVFAIL recorded as %q", r.LastReply)
	}
	if r := w.recipient(ids["later"], "r@later.test"); !strings.HasPrefix(r.LastReply, "451") {
		t.Fatalf("451 recorded as %q", r.LastReply)
	}
	// The faults clear; the retries (backoff 1–2 s) deliver everything.
	w.dns.SetServFail("servfail.test", false)
	later.SetFaults(bench.Faults{})
	drop.SetFaults(bench.Faults{})
	down.SetDown(false)
	for d, id := range ids {
		w.waitFor(d+" delivered after a retry", 20*time.Second, func() bool { return w.gone(id) })
	}
	for name, s := range map[string]*bench.Sink{"servfail": s1, "later": later, "drop": drop, "down": down} {
		if n := len(s.Messages()); n != 1 {
			t.Errorf("%s.test received %d messages, want 1", name, n)
		}
	}
}

func TestPermanentAndMixedRecipientResults(t *testing.T) {
	w := newWorld(t, "", "")
	w.dns.SetA("mixed.test", "127.0.0.1")
	s := w.sink("127.0.0.1", bench.SinkConfig{Seed: 3, Faults: bench.Faults{RcptPermFail: 0.3, RcptTempFail: 0.3}})
	w.dns.SetA("example.org", "127.0.0.2") // the sender's domain, for the bounce
	bounces := w.sink("127.0.0.2", bench.SinkConfig{})
	var rcpts []string
	for i := 0; i < 12; i++ {
		rcpts = append(rcpts, fmt.Sprintf("u%02d@mixed.test", i))
	}
	id := w.send("app@example.org", rcpts, msg)
	// After the first transaction: what the sink accepted is delivered,
	// 550s failed, 452s still queued.
	w.waitFor("first transaction", 15*time.Second, func() bool {
		return s.Stats().Messages+s.Stats().PermFails > 0 && w.record(id).Recipients[0].Attempts > 0
	})
	first := s.Messages()
	if len(first) != 1 {
		t.Fatalf("sink got %d messages in the first transaction", len(first))
	}
	accepted := map[string]bool{}
	for _, a := range first[0].To {
		accepted[a] = true
	}
	var failed, queued int
	for _, r := range w.record(id).Recipients {
		switch r.Status {
		case spool.Delivered:
			if !accepted[r.Address] {
				t.Errorf("%s marked delivered, but the sink refused it", r.Address)
			}
		case spool.Failed:
			failed++
			if accepted[r.Address] || !strings.HasPrefix(r.LastReply, "550 5.1.1") {
				t.Errorf("%s failed with %q", r.Address, r.LastReply)
			}
		case spool.Queued:
			queued++
			if accepted[r.Address] || !strings.HasPrefix(r.LastReply, "452") {
				t.Errorf("%s deferred with %q", r.Address, r.LastReply)
			}
		}
	}
	t.Logf("12 recipients: %d accepted, %d failed, %d deferred", len(accepted), failed, queued)
	if len(accepted) == 0 || failed == 0 || queued == 0 {
		t.Fatalf("seed gave no mix: %d/%d/%d", len(accepted), failed, queued)
	}
	// The deferred ones are delivered on retry, and only they are sent.
	s.SetFaults(bench.Faults{})
	w.waitFor("retry", 15*time.Second, func() bool { return w.gone(id) })
	if got := s.Messages(); len(got) != 2 || len(got[1].To) != queued {
		t.Fatalf("retry sent %d messages, the last to %v; want one to the %d deferred", len(got), got[len(got)-1].To, queued)
	}
	// The sender got one bounce, for the failed recipients only.
	w.waitFor("the bounce", 15*time.Second, func() bool { return len(bounces.Messages()) > 0 })
	time.Sleep(300 * time.Millisecond)
	got := bounces.Messages()
	if len(got) != 1 || got[0].From != "" || len(got[0].To) != 1 || got[0].To[0] != "app@example.org" {
		t.Fatalf("bounces: %+v", got)
	}
	if n := strings.Count(string(got[0].Data), "Action: failed"); n != failed {
		t.Errorf("the bounce reports %d failed recipients, want %d:\n%s", n, failed, got[0].Data)
	}
	for a := range accepted {
		if strings.Contains(string(got[0].Data), "Final-Recipient: rfc822; "+a) {
			t.Errorf("the bounce names %s, which was delivered", a)
		}
	}
}

// TestConnectionReuse sends N messages to one destination and counts the
// TCP connections at the sink: at most N / (per-connection limit) + the
// destination's concurrency.
func TestConnectionReuse(t *testing.T) {
	const n, perConn, concurrency = 1000, 100, 4
	w := newWorld(t, fmt.Sprintf(", max_messages_per_connection: %d, max_connections_per_destination: %d", perConn, concurrency), "")
	w.dns.SetMX("reuse.test", bench.MX{Pref: 10, Host: "mx.reuse.test"})
	w.dns.SetA("mx.reuse.test", "127.0.0.1")
	s := w.sink("127.0.0.1", bench.SinkConfig{})
	var mu sync.Mutex
	sent := map[string][]byte{}
	res, err := bench.RunLoad(context.Background(), bench.LoadConfig{
		Addr: w.srv.Addr("smtp"), Sessions: 10, Messages: n, Size: 1500, Domains: []string{"reuse.test"}, Pipelining: true, Seed: 1,
		OnAccepted: func(id string, b []byte) { mu.Lock(); sent[id] = append([]byte(nil), b...); mu.Unlock() },
	})
	if err != nil || res.Accepted != n {
		t.Fatalf("load: %d accepted, %v", res.Accepted, err)
	}
	w.waitFor("all delivered", 60*time.Second, func() bool { return s.Stats().Messages >= n && w.srv.Spool().Count() == 0 })
	st := s.Stats()
	t.Logf("%d messages over %d connections (max %d messages on one)", st.Messages, st.Connections, st.MaxMessagesPerConn)
	if st.Messages != n {
		t.Fatalf("sink got %d messages, want %d (duplicates?)", st.Messages, n)
	}
	if st.Connections > n/perConn+concurrency {
		t.Fatalf("%d connections for %d messages; want at most %d", st.Connections, n, n/perConn+concurrency)
	}
	// Every message arrived byte for byte: our Received: header, then
	// exactly what the client sent.
	for _, m := range s.Messages() {
		i := strings.Index(string(m.Data), " id ")
		id := string(m.Data[i+4 : i+4+spool.IDLen])
		want, ok := sent[id]
		if !ok || !strings.HasSuffix(string(m.Data), string(want)) {
			t.Fatalf("message %s arrived as %q", id, m.Data)
		}
	}
}

// TestDomainLimits sends to a domain with limits of its own
// (delivery.domains) through a sink that refuses a third connection at
// once: the domain's connections stay within its own limit, and each
// carries at most its own number of messages, far below the defaults.
func TestDomainLimits(t *testing.T) {
	const n, ownConns, ownPerConn = 70, 2, 7
	w := newWorld(t, fmt.Sprintf(", max_messages_per_connection: 100, max_connections_per_destination: 10, initial_connections_per_destination: 10"+
		", domains: {Limited.Test: {max_connections: %d, max_messages_per_connection: %d}}", ownConns, ownPerConn), "")
	w.dns.SetMX("limited.test", bench.MX{Pref: 10, Host: "mx.limited.test"})
	w.dns.SetA("mx.limited.test", "127.0.0.2")
	s := w.sink("127.0.0.2", bench.SinkConfig{MaxConns: ownConns, Faults: bench.Faults{Latency: 2 * time.Millisecond}})
	res, err := bench.RunLoad(context.Background(), bench.LoadConfig{
		Addr: w.srv.Addr("smtp"), Sessions: 10, Messages: n, Size: 1000, Domains: []string{"limited.test"}, Pipelining: true, Seed: 1,
	})
	if err != nil || res.Accepted != n {
		t.Fatalf("load: %d accepted, %v", res.Accepted, err)
	}
	w.waitFor("all delivered", 60*time.Second, func() bool { return s.Stats().Messages >= n && w.srv.Spool().Count() == 0 })
	st := s.Stats()
	t.Logf("%d messages over %d connections (max %d on one), %d refused", st.Messages, st.Connections, st.MaxMessagesPerConn, st.ConnectionsRefused)
	if st.ConnectionsRefused > 0 {
		t.Errorf("%d connections over the domain's limit of %d were refused", st.ConnectionsRefused, ownConns)
	}
	if st.MaxMessagesPerConn > ownPerConn || st.Connections < n/ownPerConn {
		t.Errorf("%d messages on one connection, %d connections; the domain's limit is %d messages per connection",
			st.MaxMessagesPerConn, st.Connections, ownPerConn)
	}
}

// TestHoldReleaseFlushTakeEffectAtOnce defers a message for an hour, then
// checks that flush delivers it at once, that a held message is not
// delivered by a flush, and that release delivers it at once.
func TestHoldReleaseFlushTakeEffectAtOnce(t *testing.T) {
	w := newWorld(t, "", "")
	w.dns.SetA("x.test", "127.0.0.1")
	s := w.sink("127.0.0.1", bench.SinkConfig{Faults: bench.Faults{DataTempFail: 1}})
	// min_backoff is 1s in newWorld; make the retry an hour away by hand.
	first := w.send("app@example.org", []string{"a@x.test"}, msg)
	second := w.send("app@example.org", []string{"b@x.test"}, msg)
	w.waitFor("first attempts", 15*time.Second, func() bool {
		return w.record(first).Recipients[0].Attempts == 1 && w.record(second).Recipients[0].Attempts == 1
	})
	sp := w.srv.Spool()
	for _, id := range []string{first, second} {
		if err := sp.Reschedule(id, time.Now().Add(time.Hour)); err != nil {
			t.Fatal(err)
		}
	}
	s.SetFaults(bench.Faults{})
	store := adminStore{Spool: sp, sched: w.srv.sched}
	if err := store.Hold(second); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Flush(); err != nil {
		t.Fatal(err)
	}
	w.waitFor("flushed message delivered", 5*time.Second, func() bool { return w.gone(first) })
	time.Sleep(1500 * time.Millisecond) // a scan or two: the held one stays
	if w.gone(second) || !w.record(second).Held {
		t.Fatal("a held message was delivered by a flush")
	}
	if err := store.Release(second); err != nil {
		t.Fatal(err)
	}
	w.waitFor("released message delivered", 5*time.Second, func() bool { return w.gone(second) })
	if n := len(s.Messages()); n != 2 {
		t.Fatalf("sink got %d messages, want 2", n)
	}
}

// TestDeliveryWithBDAT: a receiver that offers CHUNKING gets the message
// with BDAT, byte for byte (no dot-stuffing), recipients per domain.
func TestDeliveryWithBDAT(t *testing.T) {
	w := newWorld(t, "", "")
	w.dns.SetA("chunk.test", "127.0.0.1")
	s := w.sink("127.0.0.1", bench.SinkConfig{Chunking: true})
	body := "From: app@example.org\r\nSubject: bdat\r\n\r\n.line with a dot\r\n.\r\nlast\r\n"
	id := w.send("app@example.org", []string{"a@chunk.test", "b@chunk.test"}, body)
	w.waitFor("delivery", 15*time.Second, func() bool { return w.gone(id) })
	got := s.Messages()
	if len(got) != 1 || !strings.HasSuffix(string(got[0].Data), body) || len(got[0].To) != 2 {
		t.Fatalf("sink got %+v", got)
	}
}

// TestEqualPreferenceMXShareTheLoad: each new connection picks among the
// MX hosts of equal preference afresh.
func TestEqualPreferenceMXShareTheLoad(t *testing.T) {
	w := newWorld(t, ", max_messages_per_connection: 2", "")
	w.dns.SetMX("pair.test", bench.MX{Pref: 10, Host: "a.pair.test"}, bench.MX{Pref: 10, Host: "b.pair.test"})
	w.dns.SetA("a.pair.test", "127.0.0.2")
	w.dns.SetA("b.pair.test", "127.0.0.3")
	a := w.sink("127.0.0.2", bench.SinkConfig{})
	b := w.sink("127.0.0.3", bench.SinkConfig{})
	var ids []string
	for i := 0; i < 50; i++ {
		ids = append(ids, w.send("app@example.org", []string{fmt.Sprintf("u%d@pair.test", i)}, msg))
	}
	w.waitFor("delivery", 15*time.Second, func() bool { return w.gone(ids[len(ids)-1]) && len(a.Messages())+len(b.Messages()) == 50 })
	if len(a.Messages()) == 0 || len(b.Messages()) == 0 {
		t.Fatalf("50 messages over 25 or more connections: %d to one MX host, %d to the other", len(a.Messages()), len(b.Messages()))
	}
}

// TestNextTransactionRidesWithTheData: over a reused connection, the next
// message's MAIL, RCPT and DATA go out with the previous message's data
// instead of after its reply, without RSET. When the receiver fails a
// message (4xx at the end of data) or drops the connection in the middle
// of it, the message it had begun behind is not counted as attempted: it
// goes out on the next connection, and every message arrives exactly once,
// byte for byte.
func TestNextTransactionRidesWithTheData(t *testing.T) {
	const n = 300
	w := newWorld(t, ", max_connections_per_destination: 1", "")
	w.dns.SetA("ride.test", "127.0.0.1")
	s := w.sink("127.0.0.1", bench.SinkConfig{Seed: 7, Faults: bench.Faults{DataTempFail: 0.03, DropInData: 0.02}})
	sent := w.queueThenResume("ride.test", n, 1200, 3)
	w.waitFor("all delivered", 60*time.Second, func() bool { return s.Stats().Messages >= n && w.srv.Spool().Count() == 0 })
	st := s.Stats()
	t.Logf("sink: %+v", st)
	seen := map[string]bool{}
	for _, m := range s.Messages() {
		i := strings.Index(string(m.Data), " id ")
		id := string(m.Data[i+4 : i+4+spool.IDLen])
		if want, ok := sent[id]; !ok || seen[id] || !strings.HasSuffix(string(m.Data), string(want)) {
			t.Fatalf("message %s arrived twice, or as %q", id, m.Data)
		}
		seen[id] = true
	}
	if len(seen) != n {
		t.Fatalf("%d distinct messages arrived, want %d", len(seen), n)
	}
	if st.CommandsAfterData < n*3/4 || st.Resets > n/4 {
		t.Errorf("%d of %d messages' data had the next transaction behind it, %d RSET: the next transaction waits for the reply to the data",
			st.CommandsAfterData, st.Messages, st.Resets)
	}
	if st.TempFails == 0 || st.Drops == 0 {
		t.Fatalf("no faults injected (%+v): the test shows nothing", st)
	}
	// One deferral per injected failure: the begun message behind a
	// failed one was given back, not attempted.
	if got, want := metric(t, w.srv.Addr("http"), `mta_delivery_recipients_total{class="mx",outcome="deferred"}`), st.TempFails+st.Drops; got != float64(want) {
		t.Errorf("%v recipients deferred, want %d (one per injected failure)", got, want)
	}
}

// queueThenResume suspends domain, queues n messages of size bytes for
// it over four pipelining sessions (the load generator's seed), and
// resumes it as an operator does, so that delivery begins with the whole
// queue waiting: a connection always has a next message to begin. It
// returns the bytes of each message by queue ID.
func (w *world) queueThenResume(domain string, n, size int, seed int64) map[string][]byte {
	w.t.Helper()
	w.srv.sched.Suspend(domain, time.Hour)
	var mu sync.Mutex
	sent := map[string][]byte{}
	res, err := bench.RunLoad(context.Background(), bench.LoadConfig{
		Addr: w.srv.Addr("smtp"), Sessions: 4, Messages: n, Size: size, Domains: []string{domain}, Pipelining: true, Seed: seed,
		OnAccepted: func(id string, b []byte) { mu.Lock(); sent[id] = append([]byte(nil), b...); mu.Unlock() },
	})
	if err != nil || res.Accepted != n {
		w.t.Fatalf("load: %d accepted, %v", res.Accepted, err)
	}
	if err := (adminStore{Spool: w.srv.Spool(), sched: w.srv.sched}).Resume(domain); err != nil {
		w.t.Fatal(err)
	}
	return sent
}

// metric reads the value of one series (name and labels as exposed) from
// the Prometheus endpoint at addr; 0 when it is absent.
func metric(t *testing.T, addr, series string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return f
		}
	}
	return 0
}
