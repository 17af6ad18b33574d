package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// BacklogOptions configure the backlog drain scenario: queue many messages
// while the receiver is down, then bring it up and time the drain, watching
// the mta's memory.
type BacklogOptions struct {
	MTA      string
	WorkDir  string
	Sessions int
	Messages int
	Size     int
	Domains  int
	Shape    LoadShape
	Progress io.Writer
	Profile  string // if set, a heap profile of the mta with the backlog queued is written here
	// ExtraYAML is added to the mta configuration; a section the scenario
	// sets too (dns, delivery, smtp, debug) is merged key by key.
	ExtraYAML string
}

// BacklogReport is the scenario's result.
type BacklogReport struct {
	Scenario     string         `json:"scenario"`
	Date         time.Time      `json:"date"`
	Machine      string         `json:"machine"`
	Options      BacklogOptions `json:"options"`
	Accepted     int            `json:"accepted"`
	AcceptRate   float64        `json:"accept_per_second"`
	RSSQueued    int64          `json:"rss_with_backlog_bytes"` // resident memory with everything queued, receiver down
	GoHeapQueued int64          `json:"go_heap_inuse_with_backlog_bytes"`
	Delivered    int            `json:"delivered"`
	DrainTime    time.Duration  `json:"drain_ns"`
	DrainRate    float64        `json:"drain_per_second"`
	PeakRSS      int64          `json:"peak_rss_bytes"`
	DiskBytes    int64          `json:"spool_disk_bytes"` // spool size on disk with the backlog
	ConnAttempts int64          `json:"connections_refused_while_down"`
	// Postponed is how many times the mta put a message back for later
	// without an attempt while the receiver was down (its record rewritten).
	Postponed int64 `json:"postponed_while_down"`
	Accounted bool  `json:"accounted"`
}

// RunBacklog runs the scenario against the mta binary.
func RunBacklog(ctx context.Context, o BacklogOptions) (BacklogReport, error) {
	rep := BacklogReport{Scenario: "backlog", Date: time.Now().UTC(), Machine: MachineInfo(), Options: o}
	dir := filepath.Join(o.WorkDir, "backlog")
	_ = os.RemoveAll(dir)
	defer os.RemoveAll(dir)
	sink, err := StartSink(SinkConfig{Down: true})
	if err != nil {
		return rep, err
	}
	defer sink.Close()
	domains := relayDomains(o.Domains)
	dns, err := startDomainsDNS(domains)
	if err != nil {
		return rep, err
	}
	defer dns.Close()
	_, port, _ := net.SplitHostPort(sink.Addr())
	cfg := fmt.Sprintf("dns: {servers: [%q], ipv6: false}\ndelivery: {port: %s, tls: none, min_backoff: 2s, max_backoff: 10s}\nsmtp: {max_connections_per_ip: %d}\ndebug: {pprof: true}\n%s",
		dns.Addr(), port, o.Sessions+10, o.ExtraYAML)
	p, err := StartMTA(o.MTA, dir, cfg)
	if err != nil {
		return rep, err
	}
	defer p.Kill()

	var peakMu sync.Mutex
	var peak int64
	stopWatch := make(chan struct{})
	go func() {
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stopWatch:
				return
			case <-t.C:
				if u, err := p.Usage(); err == nil {
					peakMu.Lock()
					peak = max(peak, u.PeakRSS)
					peakMu.Unlock()
				}
			}
		}
	}()
	defer close(stopWatch)

	lc := LoadConfig{Addr: p.SMTP, Sessions: o.Sessions, Messages: o.Messages, Size: o.Size,
		Domains: domains, Seed: 1, Progress: progressPrinter(o.Progress, "queueing", o.Messages)}
	o.Shape.apply(&lc)
	load, err := RunLoad(ctx, lc)
	if o.Progress != nil {
		fmt.Fprintln(o.Progress)
	}
	if err != nil {
		return rep, err
	}
	rep.Accepted, rep.AcceptRate = load.Accepted, load.Rate()
	time.Sleep(3 * time.Second) // let the scheduler settle with the receiver down
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.Cmd.Process.Pid)); err == nil {
		rep.RSSQueued = statusField(string(st), "VmRSS:")
	}
	rep.DiskBytes = dirSize(filepath.Join(dir, "spool"))
	if h, err := p.Metric("go_memstats_heap_inuse_bytes"); err == nil {
		rep.GoHeapQueued = int64(h)
	}
	if o.Profile != "" {
		saveProfile(p.HTTP, "heap", o.Profile)
	}
	rep.ConnAttempts = sink.Stats().ConnectionsRefused
	if n, err := p.Metric("mta_delivery_postponed_total"); err == nil {
		rep.Postponed = int64(n)
	}

	start := time.Now()
	sink.SetDown(false)
	for ctx.Err() == nil {
		st := sink.Stats()
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, "\rdraining %8d / %d delivered, %6.0f msg/s   ", st.Messages, rep.Accepted, float64(st.Messages)/time.Since(start).Seconds())
		}
		if int(st.Messages) >= rep.Accepted {
			break
		}
		if time.Since(start) > time.Hour {
			return rep, fmt.Errorf("drain did not finish within an hour (%d of %d)", st.Messages, rep.Accepted)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if o.Progress != nil {
		fmt.Fprintln(o.Progress)
	}
	rep.DrainTime = time.Since(start)
	rep.Delivered = int(sink.Stats().Messages)
	rep.DrainRate = float64(rep.Delivered) / rep.DrainTime.Seconds()
	queued, _ := p.Metric("mta_spool_messages")
	rep.Accounted = rep.Delivered+int(queued) >= rep.Accepted
	if u, err := p.Usage(); err == nil {
		peakMu.Lock()
		peak = max(peak, u.PeakRSS)
		peakMu.Unlock()
	}
	peakMu.Lock()
	rep.PeakRSS = peak
	peakMu.Unlock()
	return rep, p.Stop(time.Minute)
}

// WriteTable prints the report.
func (r BacklogReport) WriteTable(w io.Writer) {
	fmt.Fprintf(w, "backlog: %d messages of %d B to %d domain(s) queued while the receiver is down, then drained\n",
		r.Options.Messages, r.Options.Size, max(r.Options.Domains, 1))
	fmt.Fprintf(w, "machine: %s\n\n", r.Machine)
	fmt.Fprintf(w, "accepted            %d at %.0f msg/s\n", r.Accepted, r.AcceptRate)
	fmt.Fprintf(w, "refused connections %d while the receiver was down\n", r.ConnAttempts)
	fmt.Fprintf(w, "postponed           %d times without an attempt while it was down\n", r.Postponed)
	fmt.Fprintf(w, "RSS with backlog    %.0f MiB, of which Go heap in use %.0f MiB (spool on disk %.0f MiB)\n",
		float64(r.RSSQueued)/(1<<20), float64(r.GoHeapQueued)/(1<<20), float64(r.DiskBytes)/(1<<20))
	fmt.Fprintf(w, "drain               %d delivered in %.1f s = %.0f msg/s\n", r.Delivered, r.DrainTime.Seconds(), r.DrainRate)
	fmt.Fprintf(w, "peak RSS            %.0f MiB\n", float64(r.PeakRSS)/(1<<20))
	fmt.Fprintf(w, "accounted           %v\n", r.Accounted)
}

func statusField(status, key string) int64 {
	var kb int64
	for _, line := range strings.Split(status, "\n") {
		if len(line) > len(key) && line[:len(key)] == key {
			fmt.Sscanf(line[len(key):], "%d", &kb)
		}
	}
	return kb << 10
}

func dirSize(dir string) int64 {
	var n int64
	_ = filepath.Walk(dir, func(_ string, info os.FileInfo, err error) error {
		if err == nil && info.Mode().IsRegular() {
			n += info.Size()
		}
		return nil
	})
	return n
}
