package bench

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

// AcceptOptions configure the acceptance scenario: SMTP in, spool only.
type AcceptOptions struct {
	MTA       string // path of the mta binary
	WorkDir   string // data directories are made under it
	Sessions  int
	Messages  int // per run
	Size      int
	Shape     LoadShape
	Runs      int    // runs per mode; medians are reported
	ExtraYAML string // added to the mta configuration of every run, merged with the scenario's sections
	// MinSyncInterval is the mta's spool.min_sync_interval.
	MinSyncInterval time.Duration
	// MemTableSize is the mta's spool.memtable_size ("32MiB"); "" for its default.
	MemTableSize string
	// Warmup messages are accepted before each measured run, so that the
	// run sees the spool in its steady state: Pebble then writes its WAL
	// into recycled files instead of a fresh, preallocated one, whose
	// first writes make every fsync also commit a file-system journal
	// transaction (BENCHMARKS.md).
	Warmup int
	// Profile, if set, is where a 5-second CPU profile of the mta in the
	// first run of each mode is written, with the mode before the
	// extension ("cpu.pprof" gives "cpu-fsync.pprof" and "cpu-no-fsync.pprof").
	Profile  string
	Progress io.Writer // live progress; nil for none
}

// AcceptRun is the outcome of one run.
type AcceptRun struct {
	Mode            string        `json:"mode"` // "fsync" or "no-fsync"
	Accepted        int           `json:"accepted"`
	Failed          int           `json:"failed"`      // attempted but not accepted
	TempFailed      int           `json:"temp_failed"` // of Failed: refused with 4xx (e.g. 451 over memory_budget)
	Errors          int           `json:"errors"`      // of Failed: I/O or protocol errors
	Elapsed         time.Duration `json:"elapsed_ns"`
	Rate            float64       `json:"messages_per_second"`
	P50             time.Duration `json:"p50_ns"`
	P99             time.Duration `json:"p99_ns"`
	FsyncsPerMsg    float64       `json:"wal_fsyncs_per_message"`
	CPUPer1000      float64       `json:"cpu_seconds_per_1000"`
	PeakRSS         int64         `json:"peak_rss_bytes"`
	StoredAfterRun  int64         `json:"spool_messages_after"`
	LoadGenCPUPer1k float64       `json:"loadgen_cpu_seconds_per_1000"`
}

// AcceptReport is the whole scenario's result.
type AcceptReport struct {
	Scenario string        `json:"scenario"`
	Date     time.Time     `json:"date"`
	Machine  string        `json:"machine"`
	Options  AcceptOptions `json:"options"`
	Runs     []AcceptRun   `json:"runs"`
	Synced   AcceptRun     `json:"median_fsync"`
	Unsynced AcceptRun     `json:"median_no_fsync"`
	Ratio    float64       `json:"fsync_over_no_fsync"`
}

// RunAccept measures acceptance with the spool syncing (the production
// setting) and without (the ceiling of our own code path), alternating the
// two so that a noisy neighbour hits both alike.
func RunAccept(ctx context.Context, o AcceptOptions) (AcceptReport, error) {
	rep := AcceptReport{Scenario: "accept", Date: time.Now().UTC(), Machine: MachineInfo(), Options: o}
	for i := 0; i < o.Runs; i++ {
		for _, sync := range []bool{true, false} {
			run, err := acceptOnce(ctx, o, sync, i)
			if err != nil {
				return rep, err
			}
			rep.Runs = append(rep.Runs, run)
		}
	}
	rep.Synced = medianRun(rep.Runs, "fsync")
	rep.Unsynced = medianRun(rep.Runs, "no-fsync")
	if rep.Unsynced.Rate > 0 {
		rep.Ratio = rep.Synced.Rate / rep.Unsynced.Rate
	}
	return rep, nil
}

func acceptOnce(ctx context.Context, o AcceptOptions, sync bool, i int) (AcceptRun, error) {
	mode := map[bool]string{true: "fsync", false: "no-fsync"}[sync]
	dir := filepath.Join(o.WorkDir, fmt.Sprintf("accept-%s-%d", mode, i))
	_ = os.RemoveAll(dir)
	defer os.RemoveAll(dir)
	// Info logging stays on: it is part of the production path.
	// Acceptance only: delivery is off, and the resolver points at a
	// closed loopback port anyway.
	spool := fmt.Sprintf("spool:\n  sync: %v\n  min_sync_interval: %v\n", sync, o.MinSyncInterval)
	if o.MemTableSize != "" {
		spool += "  memtable_size: " + o.MemTableSize + "\n"
	}
	cfg := fmt.Sprintf("%ssmtp:\n  max_connections_per_ip: %d\ndelivery: {enabled: false}\ndns: {servers: [\"127.0.0.1:1\"]}\n%s",
		spool, o.Sessions+10, o.ExtraYAML)
	profile := o.Profile != "" && i == 0
	if profile {
		cfg = "debug: {pprof: true}\n" + cfg // before --mta-config, which wins
	}
	p, err := StartMTA(o.MTA, dir, cfg)
	if err != nil {
		return AcceptRun{}, err
	}
	defer p.Kill()
	if o.Warmup > 0 {
		wl := LoadConfig{Addr: p.SMTP, Sessions: o.Sessions, Messages: o.Warmup, Size: o.Size, Seed: int64(1000 + i)}
		o.Shape.apply(&wl)
		if _, err := RunLoad(ctx, wl); err != nil {
			return AcceptRun{}, fmt.Errorf("%s warm-up %d: %w", mode, i, err)
		}
	}
	if profile {
		ext := filepath.Ext(o.Profile)
		go saveProfile(p.HTTP, "profile?seconds=5", strings.TrimSuffix(o.Profile, ext)+"-"+mode+ext)
	}
	before, err := p.Usage()
	if err != nil {
		return AcceptRun{}, err
	}
	fsyncs0, _ := p.Metric("mta_spool_wal_fsyncs_total")
	self0 := selfCPU()
	lc := LoadConfig{
		Addr: p.SMTP, Sessions: o.Sessions, Messages: o.Messages, Size: o.Size, Seed: int64(i + 1),
		Progress: progressPrinter(o.Progress, mode, o.Messages),
	}
	o.Shape.apply(&lc)
	res, err := RunLoad(ctx, lc)
	if o.Progress != nil {
		fmt.Fprintln(o.Progress)
	}
	if err != nil {
		return AcceptRun{}, fmt.Errorf("%s run %d: %w", mode, i, err)
	}
	self := selfCPU() - self0
	after, err := p.Usage()
	if err != nil {
		return AcceptRun{}, err
	}
	fsyncs1, _ := p.Metric("mta_spool_wal_fsyncs_total")
	stored, _ := p.Metric("mta_spool_messages")
	run := AcceptRun{
		Mode: mode, Accepted: res.Accepted, Failed: res.Attempted - res.Accepted,
		TempFailed: res.TempFailed, Errors: res.Errors,
		Elapsed: res.Elapsed, Rate: res.Rate(),
		P50: res.Latency.Percentile(50), P99: res.Latency.Percentile(99),
		PeakRSS: after.PeakRSS, StoredAfterRun: int64(stored),
	}
	if res.Accepted > 0 {
		run.FsyncsPerMsg = (fsyncs1 - fsyncs0) / float64(res.Accepted)
		run.CPUPer1000 = (after.CPU - before.CPU).Seconds() * 1000 / float64(res.Accepted)
		run.LoadGenCPUPer1k = self.Seconds() * 1000 / float64(res.Accepted)
	}
	if err := p.Stop(30 * time.Second); err != nil {
		return run, err
	}
	return run, nil
}

func medianRun(runs []AcceptRun, mode string) AcceptRun {
	var rs []AcceptRun
	for _, r := range runs {
		if r.Mode == mode {
			rs = append(rs, r)
		}
	}
	if len(rs) == 0 {
		return AcceptRun{}
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].Rate < rs[j].Rate })
	m := rs[len(rs)/2]
	med := func(f func(AcceptRun) float64) float64 { return MedianBy(rs, f) }
	m.P50 = time.Duration(med(func(r AcceptRun) float64 { return float64(r.P50) }))
	m.P99 = time.Duration(med(func(r AcceptRun) float64 { return float64(r.P99) }))
	m.FsyncsPerMsg = med(func(r AcceptRun) float64 { return r.FsyncsPerMsg })
	m.CPUPer1000 = med(func(r AcceptRun) float64 { return r.CPUPer1000 })
	m.PeakRSS = int64(med(func(r AcceptRun) float64 { return float64(r.PeakRSS) }))
	return m
}

// WriteTable prints the report as a table.
func (r AcceptReport) WriteTable(w io.Writer) {
	fmt.Fprintf(w, "acceptance: %d sessions, %d × %d B messages per run, pipelining %v, %d runs per mode (medians)\n",
		r.Options.Sessions, r.Options.Messages, r.Options.Size, !r.Options.Shape.NoPipelining, r.Options.Runs)
	fmt.Fprintf(w, "machine: %s\n\n", r.Machine)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "mode\tmsg/s\tp50 ms\tp99 ms\tfsyncs/msg\tCPU s/1000 msg\tpeak RSS MiB\t")
	for _, m := range []AcceptRun{r.Synced, r.Unsynced} {
		fmt.Fprintf(tw, "%s\t%.0f\t%.2f\t%.2f\t%.3f\t%.3f\t%.0f\t\n", m.Mode, m.Rate,
			millis(m.P50), millis(m.P99), m.FsyncsPerMsg, m.CPUPer1000, float64(m.PeakRSS)/(1<<20))
	}
	tw.Flush()
	fmt.Fprintf(w, "\nfsync / no-fsync rate: %.0f %%\n", r.Ratio*100)
}

func millis(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// MachineInfo describes the machine in one line: CPU model, cores, kernel.
func MachineInfo() string {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(line, "model name") {
				model = strings.TrimSpace(line[strings.IndexByte(line, ':')+1:])
				break
			}
		}
	}
	kernel := ""
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = ", Linux " + strings.TrimSpace(string(b))
	}
	return fmt.Sprintf("%s, %d cores%s, %s", model, runtime.NumCPU(), kernel, runtime.Version())
}

// selfCPU is this process's CPU time so far.
func selfCPU() time.Duration {
	u, err := ProcUsage(os.Getpid())
	if err != nil {
		return 0
	}
	return u.CPU
}

// progressPrinter returns a Progress callback that rewrites one line.
func progressPrinter(w io.Writer, label string, total int) func(sent, accepted int) {
	if w == nil {
		return nil
	}
	start := time.Now()
	return func(sent, accepted int) {
		el := time.Since(start).Seconds()
		fmt.Fprintf(w, "\r%-10s %8d / %d sent, %8d accepted, %8.0f msg/s", label, sent, total, accepted, float64(accepted)/max(el, 1e-9))
	}
}
