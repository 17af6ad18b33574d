package server

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mtaproject/mta/spool"
)

// TestPostfixSmtpSinkReceivesEveryMessage: Postfix's smtp-sink, an
// independent SMTP server that offers PIPELINING, as the next hop. A queue
// of messages goes over one connection, each transaction begun in the same
// write as the previous message's data; smtp-sink writes every message it
// receives to a file, and each must be there once, byte for byte (smtp-sink
// stores lines with bare LF), dot-stuffed lines included; and its log of
// the commands it read has no RSET between them.
func TestPostfixSmtpSinkReceivesEveryMessage(t *testing.T) {
	sinkBin, err := exec.LookPath("smtp-sink")
	if err != nil {
		if _, err2 := os.Stat("/usr/sbin/smtp-sink"); err2 != nil {
			t.Skip("smtp-sink not found: apt-get install postfix (make test does)")
		}
		sinkBin = "/usr/sbin/smtp-sink"
	}
	const n = 200
	w := newWorld(t, ", max_connections_per_destination: 1", "")
	w.dns.SetA("postfix.test", "127.0.0.1")
	// smtp-sink drops root privileges to -u; the dump directory must be
	// writable by that user, so it is not under the test's private temp.
	dump, err := os.MkdirTemp("", "smtp-sink-dump-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dump) })
	if err := os.Chmod(dump, 0o777); err != nil {
		t.Fatal(err)
	}
	// -v: smtp-sink logs every command it reads, which shows whether each
	// transaction began behind the previous data (no RSET between them).
	args := []string{"-v", "-d", filepath.Join(dump, "%M."), net.JoinHostPort("127.0.0.1", strconv.Itoa(w.port)), "64"}
	if os.Geteuid() == 0 {
		args = append([]string{"-u", "nobody"}, args...)
	}
	// Under timeout(1), so that a test binary killed before its cleanup
	// (a -timeout panic) does not leave smtp-sink running for good; the
	// cleanup's SIGTERM reaches smtp-sink through it.
	cmd := exec.Command(sinkBin, args...)
	if timeout, err := exec.LookPath("timeout"); err == nil {
		cmd = exec.Command(timeout, append([]string{"-k", "5", "600", sinkBin}, args...)...)
	}
	sinkLog := filepath.Join(t.TempDir(), "smtp-sink.log")
	logFile, err := os.Create(sinkLog)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Signal(syscall.SIGTERM); _ = cmd.Wait() })
	w.waitFor("smtp-sink to listen", 10*time.Second, func() bool {
		c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(w.port)))
		if err == nil {
			c.Close()
		}
		return err == nil
	})

	sent := w.queueThenResume("postfix.test", n, 1500, 11)
	deadline := time.Now().Add(30 * time.Second)
	for w.srv.Spool().Count() != 0 {
		if time.Now().After(deadline) {
			files, _ := filepath.Glob(filepath.Join(dump, "*"))
			t.Fatalf("after 30s, %d messages still queued, smtp-sink holds %d files; outcomes %s; destinations %+v",
				w.srv.Spool().Count(), len(files), outcomes(t, w.srv.Addr("http")), w.srv.sched.Destinations())
		}
		time.Sleep(20 * time.Millisecond)
	}

	files, _ := filepath.Glob(filepath.Join(dump, "*"))
	seen := map[string]bool{}
	dotLines := 0
	for _, f := range files {
		got, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		const ours = "by mta.test (mta) with ESMTP id "
		j := bytes.Index(got, []byte(ours))
		if j < 0 {
			t.Fatalf("%s has no Received line of ours:\n%s", f, got)
		}
		id := string(got[j+len(ours) : j+len(ours)+spool.IDLen])
		want, ok := sent[id]
		lf := bytes.ReplaceAll(want, []byte("\r\n"), []byte("\n"))
		if !ok || seen[id] || !bytes.Contains(got, lf) {
			t.Fatalf("message %s: unknown, arrived twice, or changed:\n%s", id, got)
		}
		seen[id] = true
		dotLines += bytes.Count(lf, []byte("\n."))
	}
	if len(seen) != n {
		said, _ := os.ReadFile(sinkLog)
		t.Fatalf("smtp-sink received %d distinct messages, want %d (it said: %q)", len(seen), n, said)
	}
	if dotLines == 0 {
		t.Fatal("no line began with a dot: dot-stuffing was not exercised")
	}
	if opened := metric(t, w.srv.Addr("http"), "mta_delivery_connections_opened_total"); opened > 2 {
		t.Errorf("%v connections for %d queued messages, want one (two at most)", opened, n)
	}
	said, err := os.ReadFile(sinkLog)
	if err != nil {
		t.Fatal(err)
	}
	data, rset := strings.Count(string(said), "smtp-sink: DATA\n"), strings.Count(string(said), "smtp-sink: RSET\n")
	if data != n || rset > 2 {
		t.Errorf("smtp-sink read %d DATA and %d RSET commands for %d messages: want %d DATA, and no RSET between transactions that follow data", data, rset, n, n)
	}
}

// outcomes lists the server's mta_delivery_recipients_total series, for a
// failure message.
func outcomes(t *testing.T, addr string) string {
	var out []string
	for _, o := range []string{"delivered", "deferred", "failed"} {
		series := `mta_delivery_recipients_total{class="mx",outcome="` + o + `"}`
		out = append(out, fmt.Sprintf("%s %v", o, metric(t, addr, series)))
	}
	return strings.Join(out, ", ")
}
