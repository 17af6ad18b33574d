package main

import (
	"bytes"
	"errors"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-msgauth/dkim"
	"github.com/emersion/go-smtp"

	"github.com/mtaproject/mta/bench"
	"github.com/mtaproject/mta/internal/pytest"
)

// TestDKIMSignedEndToEnd: with a key made by `mta dkim keygen`, mail
// submitted over SMTP and injected over HTTP arrives at the receiver with
// a signature that go-msgauth and dkimpy verify against the printed DNS
// record; a changed body fails; mail from a domain without a key is not
// signed.
func TestDKIMSignedEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	sink := startSink(t, bench.SinkConfig{Keep: true})
	keyDir := t.TempDir()
	keyFile := filepath.Join(keyDir, "shop.pem")
	out := mtaCmd(t, true, "dkim", "keygen", "shop.example", "s2026", "--out", keyFile)
	var record strings.Builder
	for _, m := range regexp.MustCompile(`"([^"]*)"`).FindAllStringSubmatch(out[strings.Index(out, "IN TXT"):], -1) {
		record.WriteString(m[1])
	}
	if !strings.HasPrefix(record.String(), "v=DKIM1; k=rsa; p=") {
		t.Fatalf("keygen printed %q", out)
	}
	p, token := startInjecting(t, sink, "dkim: {keys: [{domain: shop.example, selector: s2026, key_file: "+keyFile+"}]}\n")

	c, err := smtp.Dial(p.SMTP)
	if err != nil {
		t.Fatal(err)
	}
	for _, from := range []string{"orders@shop.example", "someone@elsewhere.example"} {
		msg := "From: " + from + "\r\nTo: ann@example.org\r\nSubject: Order 1\r\n\r\nHello,\r\n\r\nyour order has shipped.\r\n"
		if err := c.SendMail(from, []string{"ann@example.org"}, strings.NewReader(msg)); err != nil {
			t.Fatal(err)
		}
	}
	c.Close()
	if code, body := postJSON(t, "http://"+p.API+"/api/v1/messages", token, map[string]any{
		"message":    map[string]any{"from": "noreply@shop.example", "subject": "Code {{.code}}", "text": "Your code: {{.code}}"},
		"recipients": []map[string]any{{"email": "bob@example.org", "substitutions": map[string]any{"code": "42"}}},
	}); code != 200 {
		t.Fatalf("inject: %d %s", code, body)
	}
	waitMessages(t, sink, 3, 10*time.Second)
	lookup := func(name string) ([]string, error) {
		if name == "s2026._domainkey.shop.example" {
			return []string{record.String()}, nil
		}
		return nil, errors.New("no record for " + name)
	}
	verify := func(data []byte) (int, error) {
		vs, err := dkim.VerifyWithOptions(bytes.NewReader(data), &dkim.VerifyOptions{LookupTXT: lookup})
		if err != nil {
			return 0, err
		}
		for _, v := range vs {
			if v.Err != nil {
				return len(vs), v.Err
			}
		}
		return len(vs), nil
	}
	var signed [][]byte
	for _, m := range sink.Messages() {
		n, err := verify(m.Data)
		switch {
		case m.From == "someone@elsewhere.example":
			if n != 0 {
				t.Errorf("mail from a domain without a key has %d signatures", n)
			}
		case n != 1 || err != nil:
			t.Errorf("mail from %s: %d signatures, %v\n%s", m.From, n, err, m.Data)
		default:
			signed = append(signed, m.Data)
		}
	}
	if len(signed) != 2 {
		t.Fatalf("%d verified messages, want the SMTP one and the injected one", len(signed))
	}
	tampered := bytes.Replace(signed[0], []byte("shipped"), []byte("shopped"), 1)
	tampered = bytes.Replace(tampered, []byte("Your code: 42"), []byte("Your code: 43"), 1)
	if _, err := verify(tampered); err == nil {
		t.Error("a changed body still verifies")
	}
	if _, metrics := httpGet(t, "http://"+p.HTTP+"/metrics"); !strings.Contains(metrics, `mta_dkim_signatures_total{result="signed"} 2`) ||
		!strings.Contains(metrics, `mta_dkim_signatures_total{result="no_key"} 1`) {
		t.Errorf("signing metric:\n%s", metrics)
	}

	py := pytest.Python(t, "dkim")
	script := `
import sys, dkim
record = sys.argv[1].encode()
def dnsfunc(name, timeout=5):
    return record if name.rstrip(b".") == b"s2026._domainkey.shop.example" else None
print("ok" if dkim.verify(sys.stdin.buffer.read(), dnsfunc=dnsfunc) else "fail")
`
	for i, data := range append(signed, tampered) {
		cmd := exec.Command(py, "-c", script, record.String())
		cmd.Stdin = bytes.NewReader(data)
		res, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("dkimpy: %v\n%s", err, res)
		}
		want := "ok"
		if i == len(signed) {
			want = "fail"
		}
		if got := strings.TrimSpace(string(res)); got != want {
			t.Errorf("dkimpy on message %d: %q, want %q", i, got, want)
		}
	}
}
