package server

import (
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/mtaproject/mta/bench"
	"github.com/mtaproject/mta/internal/pytest"
)

// readWithPython parses a message with Python's email package, an
// independent MIME reader, and returns what a mail client would show: each
// leaf's decoded text, and whether the message as sent was all 7-bit.
func readWithPython(t *testing.T, py string, data []byte) string {
	t.Helper()
	const script = `
import sys, email, email.policy
raw = sys.stdin.buffer.read()
m = email.message_from_bytes(raw, policy=email.policy.default)
print("7bit" if all(b < 128 for b in raw) else "8bit")
for part in m.walk():
    if part.is_multipart():
        continue
    print(part.get_content_type(), repr(part.get_payload(decode=True).decode("utf-8", "replace").replace("\r\n", "\n")))
`
	cmd := exec.Command(py, "-c", script)
	cmd.Stdin = strings.NewReader(string(data))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("python email: %v\n%s", err, out)
	}
	return string(out)
}

// TestEightBitToServerWithout8BITMIME: a message with 8-bit MIME parts,
// relayed to a server that does not offer 8BITMIME, arrives 7-bit and reads
// the same in Python's email package as what the client sent; one with an
// 8-bit header cannot be converted and fails with 554 5.6.3.
func TestEightBitToServerWithout8BITMIME(t *testing.T) {
	py := pytest.Python(t, "email")
	w := newWorld(t, "", "")
	w.dns.SetA("old.test", "127.0.0.1")
	s := w.sink("127.0.0.1", bench.SinkConfig{No8BitMIME: true})
	w.bounces()
	body := "From: app@example.org\r\nSubject: receipt\r\nMIME-Version: 1.0\r\n" +
		"Content-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n" +
		"--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" +
		"Grüße, your receipt: 12,50 €\r\n.a line with a dot\r\n" + strings.Repeat("ü", 700) + "\r\n" +
		"--b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n<p>Grüße</p>\r\n--b1--\r\n"
	id := w.send("app@example.org", []string{"a@old.test"}, body)
	bad := w.send("app@example.org", []string{"b@old.test"}, "From: app@example.org\r\nSubject: Grüße\r\n\r\nGrüße\r\n")
	w.waitFor("delivery", 15*time.Second, func() bool { return w.gone(id) })
	rep := w.bounceFor(bad, 15*time.Second)
	got := s.Messages()
	if len(got) != 1 {
		t.Fatalf("sink got %d messages, want 1", len(got))
	}
	sent, arrived := readWithPython(t, py, []byte(body)), readWithPython(t, py, got[0].Data)
	if !strings.HasPrefix(arrived, "7bit\n") {
		t.Errorf("8-bit octets reached a server without 8BITMIME:\n%s", got[0].Data)
	}
	if strings.TrimPrefix(sent, "8bit\n") != strings.TrimPrefix(arrived, "7bit\n") {
		t.Errorf("the message reads differently after conversion:\nsent\n%s\narrived\n%s", sent, arrived)
	}
	// Our own decision: no Remote-MTA, no Diagnostic-Code quoting a remote.
	if f := rep.rcpts["b@old.test"]; f["Status"] != "5.6.3" || f["Diagnostic-Code"] != "" || f["Remote-MTA"] != "" ||
		!strings.Contains(strings.Join(strings.Fields(rep.data), " "), "554 5.6.3 old.test does not offer 8BITMIME") {
		t.Errorf("unconvertible message: bounce fields %v, want 5.6.3 without a remote diagnostic", f)
	}
}
