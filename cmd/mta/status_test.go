package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mtaproject/mta/bench"
)

// chromium returns the headless browser, or skips.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Skip("chromium not found: apt-get install chromium (make test does)")
	return ""
}

// TestStatusPageInChromium loads /status in headless Chromium against a
// running server with mail flowing (deliveries, a deferral, a permanent
// failure), behind the admin token, and checks what the page shows.
func TestStatusPageInChromium(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	browser := chromium(t)
	ok := startSink(t, bench.SinkConfig{RcptReplies: map[string]string{"gone@x.test": "550 5.1.1 gone for good"}})
	slow := startSink(t, bench.SinkConfig{Faults: bench.Faults{RcptTempFail: 1}})
	host := func(s *bench.Sink) string { return `["[` + strings.Replace(s.Addr(), ":", "]:", 1) + `"]` }
	tokenFile := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tokenFile, []byte("status-token-0123\n"), 0o600)
	p := startMTA(t, t.TempDir(), "dns: {servers: [\"127.0.0.1:1\"]}\nadmin: {token_file: "+tokenFile+"}\n"+
		"routes: {\"slow.test\": {hosts: "+host(slow)+", tls: none}, \"*\": {hosts: "+host(ok)+", tls: none}}\n")
	c, err := smtp.Dial(p.SMTP)
	if err != nil {
		t.Fatal(err)
	}
	for _, to := range []string{"a@x.test", "b@x.test", "c@x.test", "gone@x.test", "later@slow.test"} {
		if err := c.SendMail("app@example.org", []string{to}, strings.NewReader("Subject: s\r\n\r\nx\r\n")); err != nil {
			t.Fatal(err)
		}
	}
	c.Close()
	time.Sleep(time.Second) // the outcomes are in

	run := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(browser, append([]string{"--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
			"--user-data-dir=" + t.TempDir(), "--virtual-time-budget=8000"}, args...)...)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("chromium: %v\n%s", err, out)
		}
		return string(out)
	}
	page := "http://" + p.HTTP + "/status"
	dom := run("--dump-dom", page+"#token=status-token-0123")
	// What the page shows, without its script and style.
	visible := func(dom string) string {
		dom = regexp.MustCompile(`(?s)<script>.*?</script>|<style>.*?</style>`).ReplaceAllString(dom, " ")
		return strings.Join(strings.Fields(regexp.MustCompile(`<[^>]+>`).ReplaceAllString(dom, " ")), " ")
	}
	text := visible(dom)
	// Four delivered: three messages and the bounce of the fourth.
	for _, want := range []string{
		`id="delivered">4<`, `id="failed">1<`, `id="received">5<`, `id="deferred">1<`,
	} {
		if !strings.Contains(dom, want) {
			t.Errorf("the page lacks %s", want)
		}
	}
	for _, want := range []string{"gone@x.test", "550 5.1.1 gone for good", "slow.test 1 1", "452 4.2.2 Mailbox full 1", "per second", "deferred 1, held 0", "mta mx.test"} {
		if !strings.Contains(text, want) {
			t.Errorf("the page does not show %q:\n%s", want, text)
		}
	}
	errorBox := regexp.MustCompile(`<div id="error">([^<]*)</div>`)
	if m := errorBox.FindStringSubmatch(dom); m == nil || m[1] != "" {
		t.Errorf("the page could not read its data:\n%s", text)
	}
	// Without the token the page says so, and shows no data.
	bare := run("--dump-dom", page)
	if m := errorBox.FindStringSubmatch(bare); m == nil || !strings.Contains(m[1], "the admin token is missing or wrong") || strings.Contains(visible(bare), "gone@x.test") {
		t.Errorf("without the token:\n%s", visible(bare))
	}
	if shot := os.Getenv("STATUS_SCREENSHOT"); shot != "" {
		run("--screenshot="+shot, "--window-size=1100,1250", page+"#token=status-token-0123")
	}
}
