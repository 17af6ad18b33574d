package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// RelayOptions configure an end-to-end relay scenario: the load generator
// injects over SMTP into a target, which relays to the sink.
type RelayOptions struct {
	MTA      string // mta binary
	WorkDir  string
	Targets  []string // "mta", "postfix", "direct" (generator straight to the sink: the ceiling)
	Sessions int
	Messages int
	Size     int
	Domains  int    // recipient domains, each its own destination for mta
	Faults   Faults // injected at the sink
	// SinkChunking makes the sink offer CHUNKING (BDAT), as the big
	// providers do. Off by default: Postfix's client never uses BDAT.
	SinkChunking bool
	// ReplyStyle makes the sink's injected failures read like a provider's:
	// "", "gmail", "outlook" or "yahoo".
	ReplyStyle string
	Shape      LoadShape
	Runs       int
	DrainLimit time.Duration // how long to wait for delivery after injection ends
	Progress   io.Writer
	// MTAConfig is YAML added to the mta configuration; a section the
	// scenario sets too (dns, delivery, smtp) is merged key by key, these
	// values winning.
	MTAConfig string
	// Profile, if set, is where a 5-second CPU profile of the mta process
	// is written during its first run.
	Profile string
	// Client is the load generator: "" for ours, "smtp-source" for
	// Postfix's (Debian postfix), which does not pipeline, to cross-check
	// ours with an independent one. With it, messages are matched at the
	// sink by count, not by Message-ID: end-to-end latency and duplicates
	// are not measured.
	Client string
}

// RelayRun is one run against one target.
type RelayRun struct {
	Target       string        `json:"target"`
	Injected     int           `json:"injected"`
	Accepted     int           `json:"accepted"`
	Delivered    int           `json:"delivered"`  // distinct messages at the sink
	Duplicates   int           `json:"duplicates"` // extra copies at the sink
	Bounced      int           `json:"bounced"`    // bounces at the sink (null sender)
	Queued       int           `json:"queued"`     // still in the target's queue at the end
	Accounted    bool          `json:"accounted"`  // delivered + failed + queued = accepted
	AcceptRate   float64       `json:"accept_per_second"`
	DeliverRate  float64       `json:"deliver_per_second"` // delivered / (last delivery − first injection)
	AcceptP50    time.Duration `json:"accept_p50_ns"`
	AcceptP99    time.Duration `json:"accept_p99_ns"`
	E2EP50       time.Duration `json:"e2e_p50_ns"` // 250 at the target → arrival at the sink
	E2EP99       time.Duration `json:"e2e_p99_ns"`
	ConnsPer1000 float64       `json:"sink_connections_per_1000"`
	MsgsPerConn  float64       `json:"messages_per_connection"`
	CPUPer1000   float64       `json:"cpu_seconds_per_1000"`   // the target's processes
	FsyncsPerMsg float64       `json:"wal_fsyncs_per_message"` // the mta's WAL fsyncs per delivered message; 0 for others
	PeakRSS      int64         `json:"peak_rss_bytes"`
	Elapsed      time.Duration `json:"elapsed_ns"`
	Series       []Point       `json:"series"` // delivered count over time
}

// Point is one sample of a time series.
type Point struct {
	T time.Duration `json:"t_ns"`
	N int64         `json:"n"`
}

// RelayReport is a scenario's result.
type RelayReport struct {
	Scenario string              `json:"scenario"`
	Date     time.Time           `json:"date"`
	Machine  string              `json:"machine"`
	Options  RelayOptions        `json:"options"`
	Runs     []RelayRun          `json:"runs"`
	Median   map[string]RelayRun `json:"median"`
	Ratios   map[string]float64  `json:"ratios"` // e.g. "mta/postfix" of delivered per second
}

// RunRelay runs the scenario: for each run, each target in turn.
func RunRelay(ctx context.Context, scenario string, o RelayOptions) (RelayReport, error) {
	rep := RelayReport{Scenario: scenario, Date: time.Now().UTC(), Machine: MachineInfo(), Options: o,
		Median: map[string]RelayRun{}, Ratios: map[string]float64{}}
	for i := 0; i < o.Runs; i++ {
		for _, target := range o.Targets {
			run, err := relayOnce(ctx, o, target, i)
			if err != nil {
				return rep, fmt.Errorf("%s run %d: %w", target, i, err)
			}
			rep.Runs = append(rep.Runs, run)
		}
	}
	for _, target := range o.Targets {
		rep.Median[target] = medianRelay(rep.Runs, target)
	}
	if m, ok := rep.Median["mta"]; ok {
		for _, other := range []string{"postfix", "direct"} {
			if x, ok := rep.Median[other]; ok && x.DeliverRate > 0 {
				rep.Ratios["mta/"+other] = m.DeliverRate / x.DeliverRate
			}
		}
	}
	return rep, nil
}

// target is a system under test.
type target interface {
	smtpAddr() string
	usage() (Usage, error)
	queued() int
	stop()
}

type mtaTarget struct{ p *Process }

func (t mtaTarget) smtpAddr() string      { return t.p.SMTP }
func (t mtaTarget) usage() (Usage, error) { return t.p.Usage() }
func (t mtaTarget) stop()                 { _ = t.p.Stop(30 * time.Second) }
func (t mtaTarget) queued() int {
	n, _ := t.p.Metric("mta_spool_messages")
	return int(n)
}

type postfixTarget struct{ p *Postfix }

func (t postfixTarget) smtpAddr() string      { return t.p.SMTP }
func (t postfixTarget) usage() (Usage, error) { return t.p.Usage() }
func (t postfixTarget) queued() int           { return t.p.Queued() }
func (t postfixTarget) stop()                 { _ = t.p.Stop() }

type directTarget struct{ addr string }

func (t directTarget) smtpAddr() string      { return t.addr }
func (t directTarget) usage() (Usage, error) { return Usage{}, nil }
func (t directTarget) queued() int           { return 0 }
func (t directTarget) stop()                 {}

// relayDomains returns the recipient domains of a run.
func relayDomains(n int) []string {
	if n <= 1 {
		return []string{"d0.bench.test"}
	}
	out := make([]string, n)
	for i := range out {
		out[i] = "d" + strconv.Itoa(i) + ".bench.test"
	}
	return out
}

func relayOnce(ctx context.Context, o RelayOptions, name string, run int) (RelayRun, error) {
	res := RelayRun{Target: name, Injected: o.Messages}
	dir := filepath.Join(o.WorkDir, fmt.Sprintf("relay-%s-%d", name, run))
	_ = os.RemoveAll(dir)
	defer os.RemoveAll(dir)

	sink, err := StartSink(SinkConfig{Seed: int64(run + 1), Faults: o.Faults, Chunking: o.SinkChunking, ReplyStyle: o.ReplyStyle})
	if err != nil {
		return res, err
	}
	defer sink.Close()
	domains := relayDomains(o.Domains)

	// Match each message at the sink to its acceptance by Message-ID.
	var mu sync.Mutex
	acceptedAt := map[string]time.Time{}
	arrived := map[string]int{}
	var e2e Durations
	var lastArrival time.Time
	seq := 0
	sink.OnMessage(func(m SinkMessage) {
		id := messageID(m.Data)
		mu.Lock()
		defer mu.Unlock()
		if m.From == "" {
			res.Bounced++
			return
		}
		if o.Client == "smtp-source" { // its messages carry no Message-ID of ours
			seq++
			id = strconv.Itoa(seq)
		}
		arrived[id]++
		lastArrival = m.Received
		if t0, ok := acceptedAt[id]; ok && arrived[id] == 1 {
			e2e = append(e2e, m.Received.Sub(t0))
		}
	})

	var tgt target
	switch name {
	case "mta":
		dns, err := startDomainsDNS(domains)
		if err != nil {
			return res, err
		}
		defer dns.Close()
		_, port, _ := net.SplitHostPort(sink.Addr())
		// No suppression list: the generator sends every message to the
		// same few addresses (user1@, user2@, …), so the first injected
		// 550 5.1.1 would suppress one of them and refuse all the mail
		// after it, and Postfix keeps no such list. --mta-config can turn
		// it back on.
		cfg := fmt.Sprintf("dns: {servers: [%q], ipv6: false}\ndelivery: {port: %s, tls: none, min_backoff: 1s, max_backoff: 5s}\nsmtp: {max_connections_per_ip: %d}\nsuppression: {enabled: false}\n%s\n",
			dns.Addr(), port, o.Sessions+10, o.MTAConfig)
		if o.Profile != "" && run == 0 {
			cfg = "debug: {pprof: true}\n" + cfg // before --mta-config, which wins
		}
		p, err := StartMTA(o.MTA, dir, cfg)
		if err != nil {
			return res, err
		}
		defer p.Kill()
		tgt = mtaTarget{p}
		if o.Profile != "" && run == 0 {
			go saveProfile(p.HTTP, "profile?seconds=5", o.Profile)
		}
	case "postfix":
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return res, err
		}
		listen := l.Addr().String()
		l.Close()
		host, port, _ := net.SplitHostPort(sink.Addr())
		pf, err := StartPostfix(dir, listen, "["+host+"]:"+port)
		if err != nil {
			return res, err
		}
		defer pf.Stop()
		tgt = postfixTarget{pf}
	case "direct":
		tgt = directTarget{sink.Addr()}
	default:
		return res, fmt.Errorf("unknown target %q", name)
	}
	u0, _ := tgt.usage()
	fsyncs0 := walFsyncs(tgt)

	start := time.Now()
	stopSampling := make(chan struct{})
	var sampling sync.WaitGroup
	sampling.Add(1)
	go func() {
		defer sampling.Done()
		t := time.NewTicker(250 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stopSampling:
				return
			case <-t.C:
				st := sink.Stats()
				mu.Lock()
				res.Series = append(res.Series, Point{T: time.Since(start), N: st.Messages})
				mu.Unlock()
				if o.Progress != nil {
					fmt.Fprintf(o.Progress, "\r%-8s run %d: %7d delivered, %6.0f msg/s   ", name, run, st.Messages, float64(st.Messages)/time.Since(start).Seconds())
				}
			}
		}
	}()
	lc := LoadConfig{
		Addr: tgt.smtpAddr(), Sessions: o.Sessions, Messages: o.Messages, Size: o.Size,
		Domains: domains, Seed: int64(run + 1),
		OnAccepted: func(_ string, msg []byte) {
			id := messageID(msg)
			mu.Lock()
			acceptedAt[id] = time.Now()
			mu.Unlock()
		},
	}
	o.Shape.apply(&lc)
	if o.Client == "smtp-source" {
		elapsed, err := runSMTPSource(ctx, tgt.smtpAddr(), o, domains[0])
		if err != nil {
			close(stopSampling)
			sampling.Wait()
			return res, err
		}
		res.Accepted = o.Messages
		res.AcceptRate = float64(o.Messages) / elapsed.Seconds()
	} else {
		load, err := RunLoad(ctx, lc)
		if err != nil && !errors.Is(err, context.Canceled) {
			close(stopSampling)
			sampling.Wait()
			return res, err
		}
		res.Accepted = load.Accepted
		res.AcceptRate = load.Rate()
		res.AcceptP50, res.AcceptP99 = load.Latency.Percentile(50), load.Latency.Percentile(99)
	}

	// Wait until every accepted message reached the sink: delivered, or
	// refused for good there (one recipient per message).
	deadline := time.Now().Add(o.DrainLimit)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		st := sink.Stats()
		mu.Lock()
		n := len(arrived)
		mu.Unlock()
		if n+int(st.PermFails) >= res.Accepted {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	close(stopSampling)
	sampling.Wait()
	if o.Progress != nil {
		fmt.Fprintln(o.Progress)
	}
	u1, _ := tgt.usage()
	st := sink.Stats()
	mu.Lock()
	res.Delivered = len(arrived)
	for _, n := range arrived {
		res.Duplicates += n - 1
	}
	res.E2EP50, res.E2EP99 = e2e.Percentile(50), e2e.Percentile(99)
	if !lastArrival.IsZero() {
		res.Elapsed = lastArrival.Sub(start)
	}
	mu.Unlock()
	res.Queued = tgt.queued()
	if res.Elapsed > 0 {
		res.DeliverRate = float64(res.Delivered) / res.Elapsed.Seconds()
	}
	if res.Delivered > 0 {
		res.ConnsPer1000 = float64(st.Connections) * 1000 / float64(res.Delivered)
		res.MsgsPerConn = float64(res.Delivered) / float64(max(st.Connections, 1))
		res.CPUPer1000 = (u1.CPU - u0.CPU).Seconds() * 1000 / float64(res.Delivered)
		res.FsyncsPerMsg = (walFsyncs(tgt) - fsyncs0) / float64(res.Delivered)
	}
	res.PeakRSS = u1.PeakRSS
	failed := int(st.PermFails) // recipients refused for good (one recipient per message here)
	res.Accounted = res.Delivered+failed+res.Queued >= res.Accepted
	tgt.stop()
	return res, nil
}

// walFsyncs returns the mta's WAL fsyncs so far (group commit shares one
// among the messages accepted while it runs), or 0 for other targets.
func walFsyncs(t target) float64 {
	mt, ok := t.(mtaTarget)
	if !ok {
		return 0
	}
	n, _ := mt.p.Metric("mta_spool_wal_fsyncs_total")
	return n
}

// messageID returns the Message-ID header value of a message.
func messageID(b []byte) string {
	i := bytes.Index(b, []byte("\nMessage-ID: "))
	if i < 0 {
		return ""
	}
	rest := b[i+len("\nMessage-ID: "):]
	if j := bytes.IndexByte(rest, '\r'); j >= 0 {
		rest = rest[:j]
	}
	return string(rest)
}

func medianRelay(runs []RelayRun, target string) RelayRun {
	var rs []RelayRun
	for _, r := range runs {
		if r.Target == target {
			rs = append(rs, r)
		}
	}
	if len(rs) == 0 {
		return RelayRun{}
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].DeliverRate < rs[j].DeliverRate })
	m := rs[len(rs)/2]
	med := func(f func(RelayRun) float64) float64 { return MedianBy(rs, f) }
	m.AcceptRate = med(func(r RelayRun) float64 { return r.AcceptRate })
	m.CPUPer1000 = med(func(r RelayRun) float64 { return r.CPUPer1000 })
	m.FsyncsPerMsg = med(func(r RelayRun) float64 { return r.FsyncsPerMsg })
	m.ConnsPer1000 = med(func(r RelayRun) float64 { return r.ConnsPer1000 })
	m.MsgsPerConn = med(func(r RelayRun) float64 { return r.MsgsPerConn })
	m.PeakRSS = int64(med(func(r RelayRun) float64 { return float64(r.PeakRSS) }))
	m.E2EP50 = time.Duration(med(func(r RelayRun) float64 { return float64(r.E2EP50) }))
	m.E2EP99 = time.Duration(med(func(r RelayRun) float64 { return float64(r.E2EP99) }))
	m.AcceptP50 = time.Duration(med(func(r RelayRun) float64 { return float64(r.AcceptP50) }))
	m.AcceptP99 = time.Duration(med(func(r RelayRun) float64 { return float64(r.AcceptP99) }))
	return m
}

// saveProfile saves a pprof profile ("heap", "profile?seconds=5") of the
// mta process whose HTTP listener is addr.
func saveProfile(addr, which, path string) {
	resp, err := http.Get("http://" + addr + "/debug/pprof/" + which)
	if err != nil {
		return
	}
	defer resp.Body.Close()
	f, err := os.Create(path)
	if err != nil {
		return
	}
	defer f.Close()
	_, _ = io.Copy(f, resp.Body)
}

// startDomainsDNS serves each domain with its own MX host on 127.0.0.1, so
// that each is its own destination.
func startDomainsDNS(domains []string) (*DNSStub, error) {
	dns, err := StartDNSStub()
	if err != nil {
		return nil, err
	}
	for i, d := range domains {
		mx := fmt.Sprintf("mx%d.bench.test", i)
		dns.SetMX(d, MX{Pref: 10, Host: mx})
		dns.SetA(mx, "127.0.0.1")
	}
	return dns, nil
}

// runSMTPSource injects o.Messages with Postfix's smtp-source: o.Sessions
// sessions, each reusing its connection (-d), messages of o.Size bytes to
// one recipient at domain. It fails unless every message was accepted.
func runSMTPSource(ctx context.Context, addr string, o RelayOptions, domain string) (time.Duration, error) {
	bin, err := exec.LookPath("smtp-source")
	if err != nil {
		if _, serr := os.Stat("/usr/sbin/smtp-source"); serr != nil {
			return 0, errors.New("smtp-source is not installed (apt-get install postfix)")
		}
		bin = "/usr/sbin/smtp-source"
	}
	args := []string{"-d", "-s", strconv.Itoa(o.Sessions), "-m", strconv.Itoa(o.Messages), "-l", strconv.Itoa(o.Size),
		"-f", "loadgen@bench.test", "-t", "user1@" + domain, addr}
	start := time.Now()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("smtp-source %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return time.Since(start), nil
}
