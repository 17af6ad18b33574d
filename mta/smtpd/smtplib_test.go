package smtpd

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net"
	"os/exec"
	"strings"
	"testing"
)

// TestPythonSmtplib drives the edge with Python's smtplib, an independent
// client implementation, over real TCP.
func TestPythonSmtplib(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not found: install python3 to run the smtplib interoperability test")
	}
	ts := startServer(t, func(o *Options) { o.CleartextAuthFromLoopback = false })
	host, port, _ := net.SplitHostPort(ts.addr)
	out, err := exec.Command(py, "testdata/smtplib_client.py", host, port).CombinedOutput()
	if err != nil {
		t.Fatalf("smtplib client failed: %v\n%s", err, out)
	}
	type result struct {
		Scenario string
		Code     int
		Reply    string
	}
	got := map[string]result{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		var r result
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("bad line %q", sc.Text())
		}
		got[r.Scenario] = r
	}
	expect := func(scenario string, code int, replyPrefix string) {
		t.Helper()
		r, ok := got[scenario]
		if !ok {
			t.Errorf("%s: no result in\n%s", scenario, out)
			return
		}
		if r.Code != code || !strings.HasPrefix(r.Reply, replyPrefix) {
			t.Errorf("%s: %d %q, want %d %q…", scenario, r.Code, r.Reply, code, replyPrefix)
		}
	}
	expect("plain", 250, "2.0.0 Ok: queued as ")
	for _, mech := range []string{"PLAIN", "LOGIN"} {
		expect("auth-offered-"+mech, 0, "PLAIN LOGIN")
		expect("auth-wrong-"+mech, 535, "5.7.8")
		expect("auth-"+mech, 235, "2.7.0")
		expect("tls-send-"+mech, 250, "2.0.0 Ok: queued as ")
	}
	expect("size-param", 552, "5.3.4")
	expect("size-data", 552, "5.3.4 Message size exceeds fixed limit")
	expect("rcpt-limit", 452, "[250, 250, 250, 250, 250, 452]")

	// The three accepted messages are stored as sent, dot-unstuffed.
	msgs, err := ts.spool.List("", 10)
	if err != nil || len(msgs) != 3 {
		t.Fatalf("spool holds %d messages (%v), want 3", len(msgs), err)
	}
	for _, m := range msgs {
		_, body := storedMessage(t, ts.spool, m.ID)
		if !strings.HasSuffix(body, "\r\n\r\nHello from smtplib.\r\n.line starting with a dot\r\n") {
			t.Errorf("%s stored %q", m.ID, body)
		}
	}
	if msgs[1].AuthUser != "alice" || msgs[2].AuthUser != "alice" || msgs[0].AuthUser != "" {
		t.Errorf("auth users %q %q %q", msgs[0].AuthUser, msgs[1].AuthUser, msgs[2].AuthUser)
	}
}
