package bench

import (
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

// WriteTable prints the medians per target and the ratios.
func (r RelayReport) WriteTable(w io.Writer) {
	o := r.Options
	fmt.Fprintf(w, "%s: %d messages of %d B to %d domain(s), %d sessions, sink faults %+v, %d run(s), medians\n",
		r.Scenario, o.Messages, o.Size, max(o.Domains, 1), o.Sessions, o.Faults, o.Runs)
	fmt.Fprintf(w, "machine: %s\n\n", r.Machine)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "target\taccepted/s\tdelivered/s\taccept p50 ms\tp99 ms\te2e p50 ms\tp99 ms\tconns/1000\tmsgs/conn\tCPU s/1000\tfsyncs/msg\tpeak RSS MiB\taccounted\t")
	for _, name := range o.Targets {
		m := r.Median[name]
		fmt.Fprintf(tw, "%s\t%.0f\t%.0f\t%.2f\t%.2f\t%.1f\t%.1f\t%.1f\t%.0f\t%.3f\t%.2f\t%.0f\t%v\t\n", name,
			m.AcceptRate, m.DeliverRate, millis(m.AcceptP50), millis(m.AcceptP99), millis(m.E2EP50), millis(m.E2EP99),
			m.ConnsPer1000, m.MsgsPerConn, m.CPUPer1000, m.FsyncsPerMsg, float64(m.PeakRSS)/(1<<20), m.Accounted)
	}
	tw.Flush()
	keys := make([]string, 0, len(r.Ratios))
	for k := range r.Ratios {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(w, "delivered/s %s: %.2f\n", k, r.Ratios[k])
	}
}

// WriteSVG draws delivered messages over time for each target's median
// run, as a small standalone SVG line chart.
func (r RelayReport) WriteSVG(path string) error {
	const W, H, pad = 720, 360, 50
	var maxT time.Duration
	var maxN int64
	for _, m := range r.Median {
		for _, p := range m.Series {
			maxT = max(maxT, p.T)
			maxN = max(maxN, p.N)
		}
	}
	if maxT == 0 || maxN == 0 {
		return fmt.Errorf("no samples to draw")
	}
	colors := map[string]string{"mta": "#1f77b4", "postfix": "#d62728", "direct": "#7f7f7f"}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`, W, H)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`)
	fmt.Fprintf(&b, `<text x="%d" y="20" font-size="14">%s: messages delivered over time (%s)</text>`, pad, r.Scenario, r.Date.Format("2006-01-02"))
	fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>`, pad, H-pad, W-pad, H-pad)
	fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>`, pad, pad, pad, H-pad)
	fmt.Fprintf(&b, `<text x="%d" y="%d">%.1f s</text>`, W-pad-20, H-pad+20, maxT.Seconds())
	fmt.Fprintf(&b, `<text x="5" y="%d">%d</text>`, pad+4, maxN)
	fmt.Fprintf(&b, `<text x="%d" y="%d">0</text>`, pad-12, H-pad+15)
	i := 0
	for _, name := range r.Options.Targets {
		m, ok := r.Median[name]
		if !ok || len(m.Series) == 0 {
			continue
		}
		var pts []string
		for _, p := range m.Series {
			x := pad + float64(W-2*pad)*p.T.Seconds()/maxT.Seconds()
			y := float64(H-pad) - float64(H-2*pad)*float64(p.N)/float64(maxN)
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x, y))
		}
		c := colors[name]
		if c == "" {
			c = "#2ca02c"
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>`, c, strings.Join(pts, " "))
		fmt.Fprintf(&b, `<text x="%d" y="%d" fill="%s">%s %.0f msg/s</text>`, W-pad-170, pad+20+18*i, c, name, m.DeliverRate)
		i++
	}
	b.WriteString(`</svg>`)
	return os.WriteFile(path, []byte(b.String()), 0o644)
}
