package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"
)

// InjectOptions configure the injection scenario: the same recipients
// handed over by SMTP and by the HTTP injection API, spool only.
type InjectOptions struct {
	MTA        string
	WorkDir    string
	Sessions   int // SMTP sessions, and concurrent HTTP clients
	Recipients int // per run
	Size       int // message size
	PerRequest int // recipients per API request
	Runs       int
	DKIM       string // "", "rsa" or "ed25519": sign with a key of that type in both modes
	Progress   io.Writer
}

// InjectRun is one run of one mode.
type InjectRun struct {
	Mode       string        `json:"mode"` // smtp or api
	Recipients int           `json:"recipients"`
	Elapsed    time.Duration `json:"elapsed_ns"`
	Rate       float64       `json:"recipients_per_second"`
	CPUPer1000 float64       `json:"cpu_seconds_per_1000"`
	PeakRSS    int64         `json:"peak_rss_bytes"`
}

// InjectReport is the scenario's result.
type InjectReport struct {
	Scenario string        `json:"scenario"`
	Date     time.Time     `json:"date"`
	Machine  string        `json:"machine"`
	Options  InjectOptions `json:"options"`
	Runs     []InjectRun   `json:"runs"`
	SMTP     InjectRun     `json:"median_smtp"`
	API      InjectRun     `json:"median_api"`
	Ratio    float64       `json:"api_over_smtp"`
}

// RunInject alternates SMTP and API runs so that noise hits both alike.
func RunInject(ctx context.Context, o InjectOptions) (InjectReport, error) {
	rep := InjectReport{Scenario: "inject", Date: time.Now().UTC(), Machine: MachineInfo(), Options: o}
	for i := 0; i < o.Runs; i++ {
		for _, mode := range []string{"smtp", "api"} {
			run, err := injectOnce(ctx, o, mode, i)
			if err != nil {
				return rep, err
			}
			rep.Runs = append(rep.Runs, run)
		}
	}
	median := func(mode string) InjectRun {
		var rs []InjectRun
		for _, r := range rep.Runs {
			if r.Mode == mode {
				rs = append(rs, r)
			}
		}
		m := rs[len(rs)/2]
		pick := func(f func(InjectRun) float64) float64 { return MedianBy(rs, f) }
		m.Rate = pick(func(r InjectRun) float64 { return r.Rate })
		m.CPUPer1000 = pick(func(r InjectRun) float64 { return r.CPUPer1000 })
		m.PeakRSS = int64(pick(func(r InjectRun) float64 { return float64(r.PeakRSS) }))
		return m
	}
	rep.SMTP, rep.API = median("smtp"), median("api")
	if rep.SMTP.Rate > 0 {
		rep.Ratio = rep.API.Rate / rep.SMTP.Rate
	}
	return rep, nil
}

func injectOnce(ctx context.Context, o InjectOptions, mode string, i int) (InjectRun, error) {
	dir := filepath.Join(o.WorkDir, fmt.Sprintf("inject-%s-%d", mode, i))
	_ = os.RemoveAll(dir)
	defer os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return InjectRun{}, err
	}
	token := "bench-token-0123456789abcdef"
	if err := os.WriteFile(filepath.Join(dir, "token"), []byte(token+"\n"), 0o600); err != nil {
		return InjectRun{}, err
	}
	extra := fmt.Sprintf("smtp: {max_connections_per_ip: %d}\ndelivery: {enabled: false}\ndns: {servers: [\"127.0.0.1:1\"]}\n"+
		"api: {max_recipients: %d, tenants: [{name: bench, token_file: %s}]}\n", o.Sessions+10, max(o.PerRequest, 1), filepath.Join(dir, "token"))
	if o.DKIM != "" {
		key := filepath.Join(dir, "dkim.pem")
		if out, err := exec.Command(o.MTA, "dkim", "keygen", "bench.example", "s1", "--type", o.DKIM, "--out", key).CombinedOutput(); err != nil {
			return InjectRun{}, fmt.Errorf("dkim keygen: %v: %s", err, out)
		}
		extra += "dkim: {keys: [{domain: bench.example, selector: s1, key_file: " + key + "}]}\n"
	}
	p, err := StartMTA(o.MTA, dir, extra)
	if err != nil {
		return InjectRun{}, err
	}
	defer p.Kill()
	before, err := p.Usage()
	if err != nil {
		return InjectRun{}, err
	}
	start := time.Now()
	var n int
	switch mode {
	case "smtp":
		lc := LoadConfig{Addr: p.SMTP, Sessions: o.Sessions, Messages: o.Recipients, Size: o.Size, Seed: int64(i + 1), From: "app@bench.example", Pipelining: true}
		res, err := RunLoad(ctx, lc)
		if err != nil {
			return InjectRun{}, err
		}
		n = res.Accepted
	case "api":
		n, err = injectAPI(ctx, "http://"+p.API+"/api/v1/messages", token, o)
		if err != nil {
			return InjectRun{}, err
		}
	}
	elapsed := time.Since(start)
	after, err := p.Usage()
	if err != nil {
		return InjectRun{}, err
	}
	run := InjectRun{Mode: mode, Recipients: n, Elapsed: elapsed, Rate: float64(n) / elapsed.Seconds(), PeakRSS: after.PeakRSS}
	if n > 0 {
		run.CPUPer1000 = (after.CPU - before.CPU).Seconds() * 1000 / float64(n)
	}
	if o.Progress != nil {
		fmt.Fprintf(o.Progress, "%s run %d: %d recipients in %v (%.0f/s)\n", mode, i+1, n, elapsed.Round(time.Millisecond), run.Rate)
	}
	return run, p.Stop(30 * time.Second)
}

// injectAPI posts the recipients in requests of PerRequest from Sessions
// clients at once, each message of about Size bytes, and returns how many
// were accepted.
func injectAPI(ctx context.Context, url, token string, o InjectOptions) (int, error) {
	text := strings.Repeat("This is a line of a typical transactional message body.\n", max(o.Size/58, 1))
	requests := (o.Recipients + o.PerRequest - 1) / o.PerRequest
	var next, accepted atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, o.Sessions)
	client := &http.Client{Timeout: 5 * time.Minute}
	for range o.Sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				r := int(next.Add(1)) - 1
				if r >= requests {
					return
				}
				count := min(o.PerRequest, o.Recipients-r*o.PerRequest)
				rcpts := make([]map[string]any, count)
				for j := range rcpts {
					rcpts[j] = map[string]any{"email": fmt.Sprintf("r%d-%d@dest.example", r, j), "substitutions": map[string]any{"n": j}}
				}
				body, _ := json.Marshal(map[string]any{
					"message":    map[string]any{"from": "app@bench.example", "subject": "Your code {{.n}}", "text": text + "Code: {{.n}}\n"},
					"recipients": rcpts,
				})
				req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("Authorization", "Bearer "+token)
				resp, err := client.Do(req)
				if err != nil {
					errs <- err
					return
				}
				var res struct{ Accepted int }
				_ = json.NewDecoder(resp.Body).Decode(&res)
				resp.Body.Close()
				accepted.Add(int64(res.Accepted))
			}
		}()
	}
	wg.Wait()
	select {
	case err := <-errs:
		return int(accepted.Load()), err
	default:
	}
	return int(accepted.Load()), nil
}

// WriteTable prints the report.
func (r InjectReport) WriteTable(w io.Writer) {
	fmt.Fprintf(w, "injection: %d recipients per run of ~%d B messages, %d SMTP sessions / HTTP clients, %d recipients per request, DKIM %q, %d runs per mode (medians)\n",
		r.Options.Recipients, r.Options.Size, r.Options.Sessions, r.Options.PerRequest, r.Options.DKIM, r.Options.Runs)
	fmt.Fprintf(w, "machine: %s\n\n", r.Machine)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "mode\trecipients/s\tCPU s/1000\tpeak RSS MiB\t")
	for _, m := range []InjectRun{r.SMTP, r.API} {
		fmt.Fprintf(tw, "%s\t%.0f\t%.3f\t%.0f\t\n", m.Mode, m.Rate, m.CPUPer1000, float64(m.PeakRSS)/(1<<20))
	}
	tw.Flush()
	fmt.Fprintf(w, "\napi / smtp rate: %.0f %%\n", r.Ratio*100)
}
