package main

import (
	"crypto/tls"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

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
	if !strings.Contains(p.Log(), `"applied":["log.level","tls certificate","users file"]`) || !strings.Contains(p.Log(), `"changed_needing_restart":["memory_budget"]`) {
		t.Errorf("reload line:\n%s", p.Log())
	}
	// A broken file: refused, field named, the server goes on.
	os.WriteFile(cfgPath, append(append([]byte{}, orig...), "smtp: {max_recipients: -1}\n"...), 0o600)
	if out := mtaCmd(t, false, "reload", "--admin=http://"+p.HTTP); !strings.Contains(out, "smtp.max_recipients") || !strings.Contains(out, "running configuration stays") {
		t.Errorf("mta reload of a broken file: %q", out)
	}
	waitLog(`"msg":"configuration reload refused; the running configuration stays"`)
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
