package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtaproject/mta/bench"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// mtaBinary builds the mta binary once per test run.
func mtaBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "mta-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "mta")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// startMTA runs the binary on dataDir and stops it when the test ends,
// showing its log if the test failed.
//
// Unless extra configures DNS, delivery is off and the resolver points at
// a closed loopback port: tests never send traffic off the machine.
func startMTA(t *testing.T, dataDir, extra string) *bench.Process {
	t.Helper()
	if !strings.Contains(extra, "dns:") {
		extra += "delivery: {enabled: false}\ndns: {servers: [\"127.0.0.1:1\"]}\n"
	}
	p, err := bench.StartMTA(mtaBinary(t), dataDir, extra)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Kill()
		if t.Failed() {
			t.Logf("mta log:\n%s", p.Log())
		}
	})
	return p
}

// waitExit waits for the process to exit.
func waitExit(t *testing.T, p *bench.Process, timeout time.Duration) {
	t.Helper()
	select {
	case <-p.Done():
	case <-time.After(timeout):
		t.Fatalf("mta did not exit within %v", timeout)
	}
}

// startSink starts a receiver on loopback, closed when the test ends.
func startSink(t *testing.T, cfg bench.SinkConfig) *bench.Sink {
	t.Helper()
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:0"
	}
	s, err := bench.StartSink(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// waitMessages waits until the sink has received n messages.
func waitMessages(t *testing.T, s *bench.Sink, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for len(s.Messages()) < n {
		if time.Now().After(deadline) {
			t.Fatalf("the sink got %d messages, want %d", len(s.Messages()), n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// logHas waits (the log is written out every 100 ms) until the server's
// log holds every one of subs, and reports whether it came to.
func logHas(p *bench.Process, subs ...string) bool {
	deadline := time.Now().Add(5 * time.Second)
	for {
		all := true
		for _, s := range subs {
			all = all && strings.Contains(p.Log(), s)
		}
		if all || time.Now().After(deadline) {
			return all
		}
		time.Sleep(20 * time.Millisecond)
	}
}
