package main

import (
	"crypto/rand"
	"encoding/base64"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mtaproject/mta/bench"
	"github.com/mtaproject/mta/internal/testvol"
)

func randomMessage(t *testing.T, kb int) string {
	b := make([]byte, kb*750)
	rand.Read(b)
	enc := base64.StdEncoding.EncodeToString(b)
	var m strings.Builder
	m.WriteString("Subject: incompressible\r\n\r\n")
	for len(enc) > 0 {
		n := min(76, len(enc))
		m.WriteString(enc[:n] + "\r\n")
		enc = enc[n:]
	}
	return m.String()
}

// TestSmallVolume: on a 150 MiB volume with a 100 MiB reserve, mail is
// accepted up to the reserve (not refused after 4 MB, as when Pebble's WAL
// preallocation for a 64 MiB memtable took most of the rest), refused with
// 452 past it, and accepted again by itself once the queue drains.
func TestSmallVolume(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	p, sinkAddr := startOnVolume(t, "150m", "")
	accepted, refusal := sendUntilRefused(t, p, 50, 2000)
	if accepted < 400 { // 20 MB: far beyond the 4 MB of old, well within the 50 MB above the reserve
		t.Fatalf("only %d messages of 50 KB accepted on a 150 MiB volume: %v", accepted, refusal)
	}
	if refusal == nil || !strings.Contains(refusal.Error(), "452") {
		t.Fatalf("after %d messages: %v, want 452 past the reserve", accepted, refusal)
	}
	sink, err := bench.StartSink(bench.SinkConfig{Addr: sinkAddr})
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	sendOnceAccepted(t, p, sink, 50)
}

// startOnVolume starts the mta on a small volume of size (see testvol.Tmpfs),
// relaying everything to a loopback port where nothing listens yet, and
// returns that port's address.
func startOnVolume(t *testing.T, size, extraCfg string) (*bench.Process, string) {
	t.Helper()
	vol := testvol.Tmpfs(t, size)
	sinkAddr := "127.0.0.1:" + freePort(t)
	p := startMTA(t, filepath.Join(vol, "data"), extraCfg+"delivery: {min_backoff: 1s, max_backoff: 1s}\ndns: {servers: [\"127.0.0.1:1\"]}\n"+
		"routes: {\"*\": {hosts: [\"["+strings.Replace(sinkAddr, ":", "]:", 1)+"\"], tls: none}}\n")
	return p, sinkAddr
}

// sendUntilRefused sends messages of kb KB over one session until one is
// refused or limit were accepted.
func sendUntilRefused(t *testing.T, p *bench.Process, kb, limit int) (accepted int, refusal error) {
	t.Helper()
	c, err := smtp.Dial(p.SMTP)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for accepted < limit {
		if refusal = c.SendMail("app@example.org", []string{"u@remote.test"}, strings.NewReader(randomMessage(t, kb))); refusal != nil {
			return accepted, refusal
		}
		accepted++
	}
	return accepted, nil
}

// sendOnceAccepted retries one message of kb KB, each time on a new
// session, until it is accepted: the queue drains into sink meanwhile.
func sendOnceAccepted(t *testing.T, p *bench.Process, sink *bench.Sink, kb int) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := smtp.Dial(p.SMTP)
		if err == nil {
			err = c.SendMail("app@example.org", []string{"u@remote.test"}, strings.NewReader(randomMessage(t, kb)))
			c.Close()
		}
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("still refusing a minute after the receiver came back: %v (delivered %d)", err, sink.Stats().Messages)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// TestStartOnAFullDisk: a start with no space left stops at once with one
// clear error, not a panic or a flood of background errors.
func TestStartOnAFullDisk(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	vol := testvol.Tmpfs(t, "8m")
	f, _ := os.Create(filepath.Join(vol, "filler"))
	f.Write(make([]byte, 8<<20))
	f.Close()
	cfg := filepath.Join(t.TempDir(), "mta.yaml")
	os.WriteFile(cfg, []byte("data_dir: "+filepath.Join(vol, "data")+"\nlisten: {smtp: \"127.0.0.1:0\", submission: \"\", http: \"\"}\n"), 0o600)
	start := time.Now()
	out := mtaCmd(t, false, "serve", "--config", cfg)
	if strings.Contains(out, "panic") || strings.Contains(out, "goroutine") || !strings.Contains(out, "no space left on device") {
		t.Fatalf("start on a full disk:\n%s", out)
	}
	if took := time.Since(start); took > 10*time.Second || strings.Count(out, "\n") > 5 {
		t.Fatalf("took %v, %d lines of output", took, strings.Count(out, "\n"))
	}
}

// freePort returns a loopback port nobody listens on now.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	return port
}

// TestBodyFilesFillTheDisk: with almost no reserve configured, large
// messages fill a small volume until the spool's own headroom for Pebble.
// That is a temporary 452, not a broken spool (as when the body files
// took the space of the next WAL file, and a WAL write failed); once the
// queue drains, the body files are removed and mail is accepted again.
func TestBodyFilesFillTheDisk(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	p, sinkAddr := startOnVolume(t, "48m", "spool: {min_free_space: 1MiB}\n")
	accepted, refusal := sendUntilRefused(t, p, 200, 1000)
	if refusal == nil || !strings.Contains(refusal.Error(), "452") {
		t.Fatalf("after %d messages of 200 KB on a 48 MiB volume: %v, want 452", accepted, refusal)
	}
	if accepted < 50 { // 10 MB: the body files took most of the volume
		t.Fatalf("only %d messages of 200 KB accepted on a 48 MiB volume", accepted)
	}
	// Full for a message of this size, not broken: /readyz goes to 503
	// only once the reserve itself is reached (a smaller message may still
	// be taken), so here it may say either; it must not say broken.
	if code, body := httpGet(t, "http://"+p.HTTP+"/readyz"); code != 200 && !strings.Contains(body, "free space below the reserve") {
		t.Fatalf("/readyz after a full disk: %d %q: the spool broke", code, body)
	}
	sink, err := bench.StartSink(bench.SinkConfig{Addr: sinkAddr})
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	sendOnceAccepted(t, p, sink, 200)
	for deadline := time.Now().Add(60 * time.Second); sink.Stats().Messages < int64(accepted+1); {
		if time.Now().After(deadline) {
			t.Fatalf("the sink got %d messages, want %d", sink.Stats().Messages, accepted+1)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if strings.Contains(p.Log(), "pebble fatal error") || strings.Contains(p.Log(), "spool broken") {
		t.Fatal("the spool broke on the way")
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		code, body := httpGet(t, "http://"+p.HTTP+"/readyz")
		if code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz %d %q after the mail left and freed the space", code, body)
		}
	}
	t.Logf("%d accepted before %v; all delivered after it", accepted, refusal)
}
