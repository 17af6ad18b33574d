package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
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

// mtaProcess is `mta serve` running as a child process.
type mtaProcess struct {
	cmd  *exec.Cmd
	smtp string
	http string
	done chan struct{}
	mu   sync.Mutex
	logs strings.Builder
}

// startMTA runs `mta serve` on dataDir with every listener on a free
// loopback port, and waits until it logs that it started. extra is YAML
// appended to the configuration.
func startMTA(t *testing.T, dataDir, extra string) *mtaProcess {
	t.Helper()
	cfg := filepath.Join(t.TempDir(), "mta.yaml")
	yaml := fmt.Sprintf(`data_dir: %s
hostname: mx.test
listen:
  smtp: 127.0.0.1:0
  submission: ""
  pop3: ""
  http: 127.0.0.1:0
%s`, dataDir, extra)
	if err := os.WriteFile(cfg, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	p := &mtaProcess{cmd: exec.Command(mtaBinary(t), "serve", "--config", cfg), done: make(chan struct{})}
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	started := make(chan map[string]any, 1)
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			p.logs.WriteString(line + "\n")
			p.mu.Unlock()
			var entry map[string]any
			if json.Unmarshal([]byte(line), &entry) == nil && entry["msg"] == "mta started" {
				started <- entry
			}
		}
		io.Copy(io.Discard, stderr)
		_ = p.cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("mta log:\n%s", p.log())
		}
	})
	select {
	case entry := <-started:
		p.smtp, _ = entry["smtp"].(string)
		p.http, _ = entry["http"].(string)
	case <-p.done:
		t.Fatalf("mta exited during start:\n%s", p.log())
	case <-time.After(30 * time.Second):
		t.Fatalf("mta did not start:\n%s", p.log())
	}
	return p
}

func (p *mtaProcess) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.String()
}

// wait waits for the process to exit.
func (p *mtaProcess) wait(t *testing.T, timeout time.Duration) {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(timeout):
		t.Fatalf("mta did not exit within %v", timeout)
	}
}
