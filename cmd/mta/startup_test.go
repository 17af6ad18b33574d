package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mtaproject/mta/bench"
)

// TestStartUpErrorsAreClear starts `mta serve` wrong in every way a new
// user might, and checks that it stops with a message naming the field
// (and its line) instead of a panic, and that `mta config check` finds
// the same problem without starting anything.
func TestStartUpErrorsAreClear(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	dir := t.TempDir()
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, nil, 0o600)
	garbage := filepath.Join(dir, "garbage.pem")
	os.WriteFile(garbage, []byte("not a certificate\n"), 0o600)
	tenantToken := filepath.Join(dir, "tenant.token")
	os.WriteFile(tenantToken, []byte("0123456789abcdef0123\n"), 0o600)
	base := "data_dir: " + filepath.Join(dir, "data") + "\nlisten: {smtp: \"127.0.0.1:0\", submission: \"\", http: \"127.0.0.1:0\"}\n"
	for _, tc := range []struct {
		name, yaml string
		want       string
		check      bool // config check finds it too (port in use cannot be known without binding)
	}{
		{"port in use", "data_dir: " + filepath.Join(dir, "d1") + "\nlisten: {smtp: \"" + busy.Addr().String() + "\", submission: \"\", http: \"\"}\n",
			"listen.smtp: " + busy.Addr().String() + " is already in use by another process (line 2)", false},
		{"missing certificate", base + "tls: {cert_file: /nope/cert.pem, key_file: /nope/key.pem}\n", "tls.cert_file: /nope/cert.pem: no such file or directory (line 3)", true},
		{"bad certificate", base + "tls: {cert_file: " + garbage + ", key_file: " + garbage + "}\n", "tls.cert_file:", true},
		{"missing users file", base + "auth:\n  users_file: /nope/users\n", "auth.users_file: /nope/users: no such file or directory (line 4)", true},
		{"missing token file", base + "admin: {token_file: /nope/token}\n", "admin.token_file: /nope/token: no such file or directory (line 3)", true},
		{"empty token file", base + "admin: {token_file: " + empty + "}\n", "admin.token_file: " + empty + ": the token is 0 characters, want at least 16 (e.g. openssl rand -hex 32) (line 3)", true},
		{"missing password file", base + "routes:\n  example.com:\n    hosts: [smart.example.net]\n    auth: {username: u, password_file: /nope/pw}\n",
			"routes.example.com.auth.password_file: /nope/pw: no such file or directory (line 6)", true},
		{"bad route host", base + "routes:\n  example.com: {hosts: [\"smart.example.net:99999\"]}\n", "routes.example.com.hosts[0]: \"smart.example.net:99999\": bad port \"99999\" (line 4)", true},
		{"bad port", "listen: {smtp: \"127.0.0.1:70000\"}\n", "listen.smtp: \"127.0.0.1:70000\": bad port \"70000\" (line 1)", true},
		{"listeners collide", "listen: {smtp: \"127.0.0.1:2999\", submission: \"0.0.0.0:2999\"}\n", "listen.submission: \"0.0.0.0:2999\": the same port as listen.smtp", true},
		{"admin API open", "listen: {http: \"0.0.0.0:9999\"}\n", "listen.http: \"0.0.0.0:9999\" is not a loopback address", true},
		{"API TLS without a certificate", "data_dir: " + filepath.Join(dir, "d2") + "\nlisten: {smtp: \"127.0.0.1:0\", submission: \"\", pop3: \"\", http: \"127.0.0.1:0\", api: \"127.0.0.1:0\"}\n" +
			"tls: {self_signed: false}\napi: {tls: true, tenants: [{name: a, token_file: " + tenantToken + "}]}\n", "api.tls: needs a certificate", true},
		{"garbage bounce rules", base + "local_domains: [b.test]\nbounces: {domain: b.test, rules_file: " + garbage + "}\n", "bounces.rules_file: " + garbage, true},
		{"accounting log in no folder", base + "log: {accounting: {file: /nope/dir/a.log}}\n", "log.accounting.file:", true},
		{"data_dir a file", "data_dir: " + garbage + "\nlisten: {smtp: \"127.0.0.1:0\", submission: \"\", http: \"\"}\n", "data_dir: " + garbage + ": not a directory", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "mta.yaml")
			os.WriteFile(path, []byte(tc.yaml), 0o600)
			out := mtaCmd(t, false, "serve", "--config", path)
			if strings.Contains(out, "panic") || strings.Contains(out, "goroutine") {
				t.Fatalf("serve panicked:\n%s", out)
			}
			if !strings.Contains(out, tc.want) {
				t.Fatalf("serve: %q, want it to contain %q", out, tc.want)
			}
			out = mtaCmd(t, !tc.check, "config", "check", "--config", path)
			if tc.check && !strings.Contains(out, tc.want) {
				t.Fatalf("config check: %q, want it to contain %q", out, tc.want)
			}
		})
	}
}

func TestSpoolLockedByAnotherProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	dir := t.TempDir()
	startMTA(t, dir, "")
	path := filepath.Join(t.TempDir(), "mta.yaml")
	os.WriteFile(path, []byte("data_dir: "+dir+"\nlisten: {smtp: \"127.0.0.1:0\", submission: \"\", http: \"\"}\n"), 0o600)
	done := make(chan string, 1)
	go func() { done <- mtaCmd(t, false, "serve", "--config", path) }()
	select {
	case out := <-done:
		if !strings.Contains(out, "is locked by another process") || strings.Contains(out, "panic") {
			t.Fatalf("second serve on the same data_dir: %q", out)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("second serve on a locked data_dir did not stop")
	}
}

func TestConfigCheckWarnsAboutHostname(t *testing.T) {
	path := filepath.Join(t.TempDir(), "mta.yaml")
	os.WriteFile(path, []byte("hostname: mail\nlisten: {smtp: \"0.0.0.0:2525\"}\n"), 0o600)
	out := mtaCmd(t, true, "config", "check", path)
	if !strings.Contains(out, "warning: hostname \"mail\" is not a fully qualified domain name") {
		t.Fatalf("config check: %q", out)
	}
}

// TestOperatorEndpointsNeedTheToken: with a token, the admin API and
// pprof need it; metrics and health checks stay open; changes need JSON.
func TestOperatorEndpointsNeedTheToken(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	token := filepath.Join(t.TempDir(), "token")
	os.WriteFile(token, []byte("s3cret-0123456789\n"), 0o600)
	data := t.TempDir()
	p := startMTA(t, data, "debug: {pprof: true}\nadmin: {token_file: "+token+"}\n")
	get := func(path, auth string) int {
		req, _ := http.NewRequest("GET", "http://"+p.HTTP+path, nil)
		if auth != "" {
			req.Header.Set("Authorization", "Bearer "+auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for path, want := range map[string]int{"/metrics": 200, "/healthz": 200, "/readyz": 200, "/api/v1/queue": 401, "/debug/pprof/": 401} {
		if got := get(path, ""); got != want {
			t.Errorf("GET %s without the token: %d, want %d", path, got, want)
		}
	}
	for _, path := range []string{"/api/v1/queue", "/debug/pprof/"} {
		if got := get(path, "s3cret-0123456789"); got != 200 {
			t.Errorf("GET %s with the token: %d", path, got)
		}
	}
	req, _ := http.NewRequest("POST", "http://"+p.HTTP+"/api/v1/queue/flush", strings.NewReader("x=1"))
	req.Header.Set("Authorization", "Bearer s3cret-0123456789")
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnsupportedMediaType {
		t.Errorf("form POST to the admin API: %d, want 415", resp.StatusCode)
	}
	// The CLI still works.
	if out := mtaCmd(t, true, "queue", "flush", "--admin=http://"+p.HTTP, "--admin-token=s3cret-0123456789"); !strings.Contains(out, "due now") {
		t.Errorf("queue flush with the token: %q", out)
	}
	// Without the token the reload is not let in, and says so, not that
	// the configuration was refused; with --config it reads the token
	// file the configuration names.
	if out := mtaCmd(t, false, "reload", "--admin=http://"+p.HTTP); !strings.Contains(out, "reload not done: admin API token") {
		t.Errorf("reload without the token: %q", out)
	}
	if out := mtaCmd(t, true, "reload", "--admin=http://"+p.HTTP, "--config", filepath.Join(data, "mta.yaml")); !strings.Contains(out, "configuration reloaded") {
		t.Errorf("reload with --config naming admin.token_file: %q", out)
	}
}

// TestGracefulStopOverTheWire: on SIGTERM an idle client hears
// "421 4.3.2 Service shutting down", a client inside a transaction
// finishes it with a 250, and the process exits cleanly.
func TestGracefulStopOverTheWire(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	p := startMTA(t, t.TempDir(), "")
	dialRead := func() (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", p.SMTP)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c, bufio.NewReader(c)
	}
	expect := func(r *bufio.Reader, c net.Conn, prefix string) {
		t.Helper()
		for {
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			line, err := r.ReadString('\n')
			if err != nil {
				t.Fatalf("want %q: %v", prefix, err)
			}
			if len(line) >= 4 && line[3] == '-' {
				continue
			}
			if !strings.HasPrefix(line, prefix) {
				t.Fatalf("got %q, want %q", line, prefix)
			}
			return
		}
	}
	idle, ir := dialRead()
	expect(ir, idle, "220 ")
	idle.Write([]byte("EHLO idle.test\r\n"))
	expect(ir, idle, "250 ")
	busy, br := dialRead()
	expect(br, busy, "220 ")
	busy.Write([]byte("EHLO busy.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@remote.test>\r\n"))
	expect(br, busy, "250 ")
	expect(br, busy, "250 ")
	expect(br, busy, "250 ")
	busy.Write([]byte("DATA\r\n"))
	expect(br, busy, "354 ")
	busy.Write([]byte("Subject: in flight\r\n\r\n"))
	stopped := make(chan error, 1)
	go func() { stopped <- p.Stop(30 * time.Second) }()
	expect(ir, idle, "421 4.3.2 ")
	time.Sleep(200 * time.Millisecond)
	busy.Write([]byte("still here\r\n.\r\n"))
	expect(br, busy, "250 2.0.0 Ok: queued as ")
	expect(br, busy, "421 4.3.2 ")
	if err := <-stopped; err != nil {
		t.Fatalf("stop: %v\n%s", err, p.Log())
	}
}

// TestStopWithinItsDeadline: smtp.shutdown_timeout bounds the whole stop,
// with a client stuck in DATA and deliveries in flight to a slow peer: the
// SMTP drain and the delivery grace run together, not one after the other.
func TestStopWithinItsDeadline(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	slow := startSink(t, bench.SinkConfig{Faults: bench.Faults{Latency: 20 * time.Second}})
	p := startMTA(t, t.TempDir(), "smtp: {shutdown_timeout: 2s}\ndns: {servers: [\"127.0.0.1:1\"]}\n"+
		"routes: {\"*\": {hosts: [\"["+strings.Replace(slow.Addr(), ":", "]:", 1)+"\"], tls: none}}\n")
	c, err := smtp.Dial(p.SMTP)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		if err := c.SendMail("app@example.org", []string{fmt.Sprintf("u%d@slow.test", i)}, strings.NewReader("Subject: slow\r\n\r\nx\r\n")); err != nil {
			t.Fatal(err)
		}
	}
	c.Close()
	// A client stuck inside DATA.
	stuck, err := net.Dial("tcp", p.SMTP)
	if err != nil {
		t.Fatal(err)
	}
	defer stuck.Close()
	stuck.Write([]byte("EHLO stuck.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@slow.test>\r\n"))
	time.Sleep(300 * time.Millisecond)
	stuck.Write([]byte("DATA\r\n"))
	time.Sleep(300 * time.Millisecond)
	stuck.Write([]byte("Subject: never ends\r\n"))
	time.Sleep(time.Second) // deliveries to the slow peer are in flight
	start := time.Now()
	if err := p.Stop(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 3500*time.Millisecond {
		t.Fatalf("stop took %v with smtp.shutdown_timeout 2s", took)
	}
}

// TestOutcomesAreLogged: each recipient's outcome is one info line with
// what an operator greps for; operator actions are logged too.
func TestOutcomesAreLogged(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	sink := startSink(t, bench.SinkConfig{})
	p := startMTA(t, t.TempDir(), "dns: {servers: [\"127.0.0.1:1\"]}\n"+
		"routes: {\"*\": {hosts: [\"["+strings.Replace(sink.Addr(), ":", "]:", 1)+"\"], tls: none}}\n")
	c, err := smtp.Dial(p.SMTP)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SendMail("app@example.org", []string{"someone@remote.test"}, strings.NewReader("Subject: log\r\nMessage-ID: <log-1@example.org>\r\n\r\nx\r\n")); err != nil {
		t.Fatal(err)
	}
	c.Close()
	raw, err := net.Dial("tcp", p.SMTP)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprint(raw, "EHLO client.test\r\nRCPT TO:<x@remote.test>\r\nQUIT\r\n")
	io.Copy(io.Discard, raw)
	raw.Close()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(p.Log(), `"msg":"delivery outcome"`) {
		if time.Now().After(deadline) {
			t.Fatalf("no outcome logged:\n%s", p.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
	var line, accepted string
	for _, l := range strings.Split(p.Log(), "\n") {
		if strings.Contains(l, `"msg":"delivery outcome"`) {
			line = l
		}
		if strings.Contains(l, `"msg":"message accepted"`) {
			accepted = l
		}
	}
	for _, want := range []string{`"outcome":"delivered"`, `"rcpt":"someone@remote.test"`, `"ip":"` + sink.Addr() + `"`, `"code":250`, `"attempt":1`, `"delay":`, `"id":"`, `"tls":"none"`} {
		if !strings.Contains(line, want) {
			t.Errorf("outcome line lacks %s: %s", want, line)
		}
	}
	refused := regexp.MustCompile(`"msg":"refused",("listener":"smtp",)?"reason":"bad_sequence","client_ip":"127.0.0.1","helo":"client.test","code":503,"enhanced":"5.5.1"`)
	for deadline := time.Now().Add(5 * time.Second); !refused.MatchString(p.Log()) && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond) // the log is written out every 100 ms
	}
	if !refused.MatchString(p.Log()) {
		t.Errorf("RCPT before MAIL: no refusal logged:\n%s", p.Log())
	}
	for _, want := range []string{`"id":"`, `"client_ip":"127.0.0.1"`, `"helo":"localhost"`, `"from":"app@example.org"`, `"rcpts":1`, `"tls":"none"`, `"message_id":"<log-1@example.org>"`} {
		if !strings.Contains(accepted, want) {
			t.Errorf("acceptance line lacks %s: %s", want, accepted)
		}
	}
	for metric, want := range map[string]float64{
		`mta_delivery_end_to_end_seconds_count{outcome="delivered"}`:   1,
		`mta_delivery_replies_total{code="2.0.0",outcome="delivered"}`: 1,
		`mta_delivery_attempts_per_delivery_count`:                     1,
		`mta_delivery_starttls_total{result="disabled"}`:               1, // the route says tls: none
	} {
		v, err := p.Metric(metric)
		if err != nil || v != want {
			t.Errorf("%s = %v (%v), want %v", metric, v, err, want)
		}
	}
	mtaCmd(t, true, "queue", "flush", "--admin=http://"+p.HTTP)
	time.Sleep(200 * time.Millisecond)
	if !logHas(p, `"msg":"operator action","action":"flush"`) {
		t.Errorf("flush not logged")
	}
}

// TestBufferedLogIsWrittenAtStop: with a log.flush_interval longer than
// the test, info lines wait in memory, and a stop still writes every one
// of them, up to "mta stopped".
func TestBufferedLogIsWrittenAtStop(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	p := startMTA(t, t.TempDir(), "log: {flush_interval: 1m}\n")
	c, err := smtp.Dial(p.SMTP)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if err := c.SendMail("app@example.org", []string{fmt.Sprintf("u%d@remote.test", i)}, strings.NewReader("Subject: buffered\r\n\r\nx\r\n")); err != nil {
			t.Fatal(err)
		}
	}
	c.Close()
	time.Sleep(200 * time.Millisecond)
	if strings.Contains(p.Log(), `"msg":"message accepted"`) {
		t.Error("an info line was written before log.flush_interval (1m) passed")
	}
	if err := p.Stop(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	log := p.Log()
	if n := strings.Count(log, `"msg":"message accepted"`); n != 3 || !strings.Contains(log, `"msg":"mta stopped"`) {
		t.Fatalf("after the stop the log has %d accepted lines (want 3) and no \"mta stopped\" line:\n%s", n, log)
	}
}
