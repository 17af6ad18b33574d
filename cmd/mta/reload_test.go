package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mtaproject/mta/bench"
	"github.com/mtaproject/mta/mta/certs"
)

// TestReloadOnSIGHUPAndCommand: SIGHUP and `mta reload` apply the file
// again: a new TLS certificate is served to the next STARTTLS, the log
// level changes, a setting that needs a restart is named; a broken file is
// refused with the field named, and the server goes on as it was.
func TestReloadOnSIGHUPAndCommand(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	data := t.TempDir()
	p := startMTA(t, data, "")
	cfgPath := filepath.Join(data, "mta.yaml")
	orig, _ := os.ReadFile(cfgPath)
	waitLog := func(what string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !strings.Contains(p.Log(), what) {
			if time.Now().After(deadline) {
				t.Fatalf("no %q in the log:\n%s", what, p.Log())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	peerNames := func() []string {
		t.Helper()
		c, err := smtp.DialStartTLS(p.SMTP, &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Noop(); err != nil { // the handshake is done by now
			t.Fatal(err)
		}
		st, ok := c.TLSConnectionState()
		if !ok || len(st.PeerCertificates) == 0 {
			t.Fatal("no TLS session after STARTTLS")
		}
		return st.PeerCertificates[0].DNSNames
	}
	if names := peerNames(); !strings.Contains(strings.Join(names, " "), "mx.test") {
		t.Fatalf("first certificate names %v", names)
	}
	// A new certificate in place of the self-signed one, a new log level
	// and a changed setting that needs a restart.
	other := t.TempDir()
	if _, err := certs.SelfSigned(other, "renewed.test"); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"cert.pem", "key.pem"} {
		b, _ := os.ReadFile(filepath.Join(other, f))
		os.WriteFile(filepath.Join(data, "tls", f), b, 0o600)
	}
	os.WriteFile(cfgPath, append(append([]byte{}, orig...), "log: {level: debug}\nmemory_budget: 512MiB\n"...), 0o600)
	p.Cmd.Process.Signal(syscall.SIGHUP)
	waitLog(`"msg":"configuration reloaded"`)
	if names := peerNames(); !strings.Contains(strings.Join(names, " "), "renewed.test") {
		t.Errorf("after the reload the certificate names %v", names)
	}
	if !logHas(p, `"applied":["log.level","tls certificate","users file"]`, `"changed_needing_restart":["memory_budget"]`) {
		t.Errorf("reload line:\n%s", p.Log())
	}
	// A broken file: refused, field named, the server goes on.
	os.WriteFile(cfgPath, append(append([]byte{}, orig...), "smtp: {max_recipients: -1}\n"...), 0o600)
	if out := mtaCmd(t, false, "reload", "--admin=http://"+p.HTTP); !strings.Contains(out, "smtp.max_recipients") || !strings.Contains(out, "running configuration stays") {
		t.Errorf("mta reload of a broken file: %q", out)
	}
	waitLog(`"msg":"configuration reload refused; the running configuration stays"`)
	for _, line := range strings.Split(p.Log(), "\n") {
		if strings.Contains(line, "configuration reload refused") && (!strings.Contains(line, `"level":"warn"`) || strings.Contains(line, "stacktrace")) {
			t.Errorf("a refused reload is an operator's mistake, a warning without a stack trace: %s", line)
		}
	}
	if v, err := p.Metric(`mta_config_reloads_total{result="failed"}`); err != nil || v != 1 {
		t.Errorf("failed reloads: %v %v", v, err)
	}
	os.WriteFile(cfgPath, orig, 0o600)
	if out := mtaCmd(t, true, "reload", "--admin=http://"+p.HTTP); !strings.Contains(out, "configuration reloaded") {
		t.Errorf("mta reload: %q", out)
	}
	if v, err := p.Metric(`mta_config_reloads_total{result="ok"}`); err != nil || v != 2 {
		t.Errorf("good reloads: %v %v", v, err)
	}
	c, err := smtp.Dial(p.SMTP)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SendMail("a@example.org", []string{"b@example.com"}, strings.NewReader("Subject: after\r\n\r\nx\r\n")); err != nil {
		t.Errorf("after the reloads: %v", err)
	}
}

// TestReloadUnderLoad: SIGHUP every 100 ms while 10,000 messages flow in and
// out loses and doubles nothing, and drops no session.
func TestReloadUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	sink := startSink(t, bench.SinkConfig{})
	var mu sync.Mutex
	got := map[string]int{}
	sink.OnMessage(func(m bench.SinkMessage) {
		if sm := receivedID.FindSubmatch(m.Data); sm != nil {
			mu.Lock()
			got[string(sm[1])]++
			mu.Unlock()
		}
	})
	p := startMTA(t, t.TempDir(), "dns: {servers: [\"127.0.0.1:1\"]}\nroutes: {\"*\": {hosts: [\"["+strings.Replace(sink.Addr(), ":", "]:", 1)+"\"], tls: none}}\n")
	stop := make(chan struct{})
	var hups atomic.Int32
	go func() {
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				p.Cmd.Process.Signal(syscall.SIGHUP)
				hups.Add(1)
			}
		}
	}()
	acked := map[string]bool{}
	res, err := bench.RunLoad(context.Background(), bench.LoadConfig{
		Addr: p.SMTP, Sessions: 20, Messages: 10000, Size: 1024, Pipelining: true, Seed: 11,
		Domains: []string{"a.test", "b.test"}, Timeout: 10 * time.Second,
		OnAccepted: func(id string, _ []byte) { acked[id] = true },
	})
	close(stop)
	if err != nil {
		t.Fatal(err)
	}
	if res.Accepted != 10000 || len(acked) != 10000 {
		t.Fatalf("accepted %d of 10000 (%d acknowledged) while reloading: %+v", res.Accepted, len(acked), res)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		mu.Lock()
		n := len(got)
		mu.Unlock()
		if n >= len(acked) || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	for id := range acked {
		if got[id] != 1 {
			t.Errorf("message %s arrived %d times", id, got[id])
		}
	}
	if v, err := p.Metric(`mta_config_reloads_total{result="ok"}`); err != nil || v < 10 {
		t.Errorf("reloads counted: %v (%v) of %d signals", v, err, hups.Load())
	}
	t.Logf("10,000 messages with %d reloads: every one delivered once", hups.Load())
}

// TestReloadChangesRoutes: a reload with a new route sends mail for
// domains routed from then on to the new next hop, without a restart.
func TestReloadChangesRoutes(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	a := startSink(t, bench.SinkConfig{Keep: true})
	b := startSink(t, bench.SinkConfig{Keep: true})
	route := func(s *bench.Sink) string {
		return "routes: {\"*\": {hosts: [\"[" + strings.Replace(s.Addr(), ":", "]:", 1) + "\"], tls: none}}\n"
	}
	data := t.TempDir()
	base := "dns: {servers: [\"127.0.0.1:1\"]}\n"
	p := startMTA(t, data, base+route(a))
	send := func(to string) {
		t.Helper()
		c, err := smtp.Dial(p.SMTP)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.SendMail("app@example.org", []string{to}, strings.NewReader("Subject: r\r\n\r\nx\r\n")); err != nil {
			t.Fatal(err)
		}
	}
	wait := func(s *bench.Sink, n int) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for len(s.Messages()) < n {
			if time.Now().After(deadline) {
				t.Fatalf("the sink got %d messages, want %d", len(s.Messages()), n)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	send("x@one.test")
	wait(a, 1)
	cfgPath := filepath.Join(data, "mta.yaml")
	orig, _ := os.ReadFile(cfgPath)
	os.WriteFile(cfgPath, []byte(strings.Replace(string(orig), route(a), route(b), 1)), 0o600)
	if out := mtaCmd(t, true, "reload", "--admin=http://"+p.HTTP); !strings.Contains(out, "reloaded") {
		t.Fatalf("reload: %q", out)
	}
	if !logHas(p, `"applied":["routes","tls certificate","users file"]`) || strings.Contains(p.Log(), `"changed_needing_restart":["routes"`) {
		t.Errorf("reload line:\n%s", p.Log())
	}
	send("y@two.test")
	wait(b, 1)
	if len(a.Messages()) != 1 {
		t.Errorf("the old next hop got %d messages after the reload", len(a.Messages()))
	}
}

// TestReloadAppliesLimitsAndDeliverySettings: a reload changes the SMTP
// limits for the sessions that connect afterwards (EHLO advertises the new
// SIZE, a larger message gets 552) and the delivery settings for the next
// connections (one message per connection), and names neither as needing
// a restart.
func TestReloadAppliesLimitsAndDeliverySettings(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	sink := startSink(t, bench.SinkConfig{Keep: true})
	data := t.TempDir()
	p := startMTA(t, data, "dns: {servers: [\"127.0.0.1:1\"]}\nroutes: {\"*\": {hosts: [\"["+strings.Replace(sink.Addr(), ":", "]:", 1)+"\"], tls: none}}\n")
	body := "Subject: limits\r\n\r\n" + strings.Repeat("0123456789abcdef\r\n", 200) // 3.6 kB
	send := func() error {
		t.Helper()
		c, err := smtp.Dial(p.SMTP)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.SendMail("app@example.org", []string{"r@remote.test"}, strings.NewReader(body))
	}
	sendAndWait := func(n int) {
		t.Helper()
		if err := send(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for len(sink.Messages()) < n {
			if time.Now().After(deadline) {
				t.Fatalf("the sink got %d messages, want %d", len(sink.Messages()), n)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	connIDs := func() map[int64]bool {
		ids := map[int64]bool{}
		for _, m := range sink.Messages() {
			ids[m.ConnID] = true
		}
		return ids
	}
	for i := 1; i <= 3; i++ {
		sendAndWait(i)
	}
	if n := len(connIDs()); n != 1 {
		t.Fatalf("3 messages one after another came over %d connections, want 1 reused", n)
	}

	cfgPath := filepath.Join(data, "mta.yaml")
	orig, _ := os.ReadFile(cfgPath)
	os.WriteFile(cfgPath, append(append([]byte{}, orig...), "smtp: {max_message_size: 2000}\ndelivery: {max_messages_per_connection: 1}\n"...), 0o600)
	if out := mtaCmd(t, true, "reload", "--admin=http://"+p.HTTP); !strings.Contains(out, "reloaded") {
		t.Fatalf("reload: %q", out)
	}
	if !logHas(p, `"applied":["smtp.max_message_size","delivery.max_messages_per_connection","tls certificate","users file"]`, `"changed_needing_restart":[]`) {
		t.Errorf("reload line:\n%s", p.Log())
	}
	c, err := smtp.Dial(p.SMTP)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	if ok, size := c.Extension("SIZE"); !ok || size != "2000" {
		t.Errorf("EHLO after the reload: SIZE %q, want 2000", size)
	}
	c.Close()
	var se *smtp.SMTPError
	if err := send(); !errors.As(err, &se) || se.Code != 552 {
		t.Fatalf("a 3.6 kB message after the size limit was lowered to 2000: %v, want 552", err)
	}

	// The cached connection carried a message already: the next message
	// goes over a new one, and so does each after it.
	os.WriteFile(cfgPath, append(append([]byte{}, orig...), "delivery: {max_messages_per_connection: 1}\n"...), 0o600)
	p.Cmd.Process.Signal(syscall.SIGHUP)
	deadline := time.Now().Add(10 * time.Second)
	for strings.Count(p.Log(), `"msg":"configuration reloaded"`) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("no second reload in the log:\n%s", p.Log())
		}
		time.Sleep(20 * time.Millisecond)
	}
	for i := 4; i <= 6; i++ {
		sendAndWait(i)
	}
	if n := len(connIDs()); n != 4 {
		t.Errorf("3 more messages with one message per connection: %d connections in all, want 1 + 3", n)
	}
}

// TestReloadOfTheHostnameWaitsForTheRestart: hostname needs a restart, and
// so does the EHLO name that follows it when delivery.helo_name is not
// set: a reload does not change the one without the other.
func TestReloadOfTheHostnameWaitsForTheRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	data := t.TempDir()
	p := startMTA(t, data, "")
	cfgPath := filepath.Join(data, "mta.yaml")
	orig, _ := os.ReadFile(cfgPath)
	renamed := regexp.MustCompile(`(?m)^hostname: .*$`).ReplaceAll(orig, []byte("hostname: renamed.test"))
	if bytes.Equal(renamed, orig) {
		t.Fatalf("no hostname line in\n%s", orig)
	}
	os.WriteFile(cfgPath, renamed, 0o600)
	if out := mtaCmd(t, true, "reload", "--admin=http://"+p.HTTP); !strings.Contains(out, "configuration reloaded") {
		t.Fatalf("mta reload: %q", out)
	}
	if !logHas(p, `"msg":"configuration reloaded"`) {
		t.Fatalf("no reload line:\n%s", p.Log())
	}
	for _, line := range strings.Split(p.Log(), "\n") {
		if strings.Contains(line, `"msg":"configuration reloaded"`) && (strings.Contains(line, "helo_name") || !strings.Contains(line, `"changed_needing_restart":["hostname"]`)) {
			t.Errorf("reload line %s: want hostname needing a restart and the EHLO name left as it is", line)
		}
	}
}
