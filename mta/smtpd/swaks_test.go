package smtpd

import (
	"net"
	"os/exec"
	"strings"
	"testing"
)

// TestSwaks drives the edge with swaks, the Swiss Army knife of SMTP
// testing (an independent client in Perl): pipelining, STARTTLS with AUTH
// PLAIN and LOGIN, and a refused password, over real TCP.
func TestSwaks(t *testing.T) {
	swaks, err := exec.LookPath("swaks")
	if err != nil {
		t.Skip("swaks not found: install swaks and libnet-ssleay-perl (apt) to run the swaks interoperability test; `make test` does")
	}
	ts := startServer(t, func(o *Options) { o.CleartextAuthFromLoopback = false })
	host, port, _ := net.SplitHostPort(ts.addr)
	run := func(wantOK bool, args ...string) string {
		t.Helper()
		args = append([]string{"--server", host, "--port", port, "--from", "app@example.org", "--to", "user@remote.test",
			"--helo", "swaks.test", "--header", "Subject: swaks", "--body", "line one\n.leading dot\n", "--timeout", "10"}, args...)
		out, err := exec.Command(swaks, args...).CombinedOutput()
		if (err == nil) != wantOK {
			t.Fatalf("swaks %v: err=%v\n%s", args, err, out)
		}
		return string(out)
	}
	before := ts.spool.Count()
	out := run(true, "--pipeline")
	if strings.Contains(out, "<** ") || !strings.Contains(out, "250 2.0.0 Ok: queued as ") || !strings.Contains(out, "PIPELINING") {
		t.Fatalf("pipelined send:\n%s", out)
	}
	for _, mech := range []string{"PLAIN", "LOGIN"} {
		out = run(true, "--tls", "--auth", mech, "--auth-user", "alice", "--auth-password", "s3cret")
		if !strings.Contains(out, "235 2.7.0") || !strings.Contains(out, "250 2.0.0 Ok: queued as ") {
			t.Fatalf("STARTTLS + AUTH %s:\n%s", mech, out)
		}
	}
	out = run(false, "--tls", "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", "wrong")
	if !strings.Contains(out, "535 5.7.8") {
		t.Fatalf("wrong password:\n%s", out)
	}
	if got := ts.spool.Count() - before; got != 3 {
		t.Fatalf("%d messages stored, want 3", got)
	}
	list, _ := ts.spool.List("", 10)
	for _, m := range list {
		_, body := storedMessage(t, ts.spool, m.ID)
		if !strings.Contains(body, "\r\nline one\r\n.leading dot\r\n") || hasBareLineEnding([]byte(body)) {
			t.Fatalf("stored %q", body)
		}
	}
}
