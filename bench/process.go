package bench

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Process is an `mta serve` child process, for benchmarks and end-to-end
// tests that need the real binary: its own process, so that its CPU time
// and memory can be measured and it can be killed.
type Process struct {
	Cmd  *exec.Cmd
	SMTP string // bound SMTP address
	HTTP string // bound HTTP address
	POP3 string // bound POP3 address
	API  string // bound injection API address, when listen.api is set
	done chan struct{}
	mu   sync.Mutex
	logs bytes.Buffer
}

// StartMTA runs `binary serve` with data in dataDir, every listener on a
// free loopback port (listen.api too when extraYAML names API tenants),
// and extraYAML appended to the configuration. It
// returns once the server logged that it started.
func StartMTA(binary, dataDir, extraYAML string) (*Process, error) {
	cfgPath := filepath.Join(dataDir, "mta.yaml")
	api := ""
	if strings.Contains(extraYAML, "tenants:") {
		api = "  api: 127.0.0.1:0\n" // the injection API, for the tenants named
	}
	// A section given twice (a scenario's own and --mta-config's) is merged.
	yaml, err := mergeSections(fmt.Sprintf("data_dir: %s\nhostname: mx.test\nlisten:\n  smtp: 127.0.0.1:0\n  submission: \"\"\n  pop3: 127.0.0.1:0\n  http: 127.0.0.1:0\n%s%s", dataDir, api, extraYAML))
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dataDir, 0o750); err != nil {
		return nil, err
	}
	if err := os.WriteFile(cfgPath, []byte(yaml), 0o600); err != nil {
		return nil, err
	}
	p := &Process{Cmd: exec.Command(binary, "serve", "--config", cfgPath), done: make(chan struct{})}
	stderr, err := p.Cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := p.Cmd.Start(); err != nil {
		return nil, err
	}
	started := make(chan map[string]any, 1)
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Bytes()
			p.mu.Lock()
			if p.logs.Len() < 16<<20 {
				p.logs.Write(line)
				p.logs.WriteByte('\n')
			}
			p.mu.Unlock()
			if bytes.Contains(line, []byte(`"mta started"`)) {
				var entry map[string]any
				if json.Unmarshal(line, &entry) == nil {
					started <- entry
				}
			}
		}
		_, _ = io.Copy(io.Discard, stderr)
		_ = p.Cmd.Wait()
	}()
	select {
	case entry := <-started:
		p.SMTP, _ = entry["smtp"].(string)
		p.HTTP, _ = entry["http"].(string)
		p.POP3, _ = entry["pop3"].(string)
		p.API, _ = entry["api"].(string)
		return p, nil
	case <-p.done:
		return nil, fmt.Errorf("mta exited during start:\n%s", p.Log())
	case <-time.After(60 * time.Second):
		p.Kill()
		return nil, fmt.Errorf("mta did not start within 60s:\n%s", p.Log())
	}
}

// Log returns what the process has logged so far (up to 16 MiB).
func (p *Process) Log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logs.String()
}

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Kill sends SIGKILL and waits for the process to exit.
func (p *Process) Kill() {
	_ = p.Cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// Stop sends SIGTERM and waits up to timeout for a graceful exit.
func (p *Process) Stop(timeout time.Duration) error {
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		if st := p.Cmd.ProcessState; st != nil && !st.Success() {
			return fmt.Errorf("mta exited with %v", st)
		}
		return nil
	case <-time.After(timeout):
		p.Kill()
		return fmt.Errorf("mta did not stop within %v", timeout)
	}
}

// Usage is the resource use of a process so far.
type Usage struct {
	CPU     time.Duration // user + system time
	PeakRSS int64         // bytes (VmHWM)
}

// Usage reads /proc for the process's CPU time and peak resident memory.
func (p *Process) Usage() (Usage, error) { return ProcUsage(p.Cmd.Process.Pid) }

// ProcUsage reads /proc/<pid> for CPU time and peak resident memory.
func ProcUsage(pid int) (Usage, error) {
	var u Usage
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return u, err
	}
	// Fields after the command name, which is in parentheses.
	rest := stat[bytes.LastIndexByte(stat, ')')+2:]
	f := strings.Fields(string(rest))
	if len(f) < 13 {
		return u, errors.New("short /proc stat")
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	const ticks = 100 // USER_HZ on Linux
	u.CPU = time.Duration(utime+stime) * time.Second / ticks
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return u, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(line, "VmHWM:") {
			kb, _ := strconv.ParseInt(strings.Fields(line)[1], 10, 64)
			u.PeakRSS = kb << 10
		}
	}
	return u, nil
}

// Metric scrapes /metrics and returns the sum of every sample of the named
// metric (all label sets), or an error if it is absent.
func (p *Process) Metric(name string) (float64, error) {
	resp, err := http.Get("http://" + p.HTTP + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sum, found := 0.0, false
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) || len(line) <= len(name) || (line[len(name)] != ' ' && line[len(name)] != '{') {
			continue
		}
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err == nil {
			sum += v
			found = true
		}
	}
	if !found {
		return 0, fmt.Errorf("metric %s not found", name)
	}
	return sum, sc.Err()
}
