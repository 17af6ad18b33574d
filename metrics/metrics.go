// Package metrics owns the Prometheus registry of the appliance, the
// /metrics handler and the conventions shared by every instrument: names
// start with mta_, durations are in seconds, and latency histograms use
// LatencyBuckets. Each package declares its own instruments and registers
// them on the prometheus.Registerer it is given; nothing registers in init().
package metrics

import (
	"net/http"
	"runtime"
	"runtime/debug"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// LatencyBuckets spans 50 µs to 30 s: fsyncs and local commits at the low
// end, remote SMTP replies at the high end.
var LatencyBuckets = []float64{
	0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
	0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
}

// NewRegistry returns a registry with the Go runtime and process collectors.
func NewRegistry() *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}

// Handler serves the registry in the Prometheus exposition format.
func Handler(r *prometheus.Registry) http.Handler {
	return promhttp.HandlerFor(r, promhttp.HandlerOpts{Registry: r})
}

// BuildInfo returns mta_build_info: always 1, with the version, the VCS
// revision and the Go version as labels, so that dashboards and alerts can
// tell releases apart.
func BuildInfo(version string) prometheus.Collector {
	revision, goVersion := "unknown", runtime.Version()
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				revision = s.Value
			}
		}
	}
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "mta_build_info", Help: "Always 1; the labels say which build is running."},
		[]string{"version", "revision", "goversion"})
	g.WithLabelValues(version, revision, goVersion).Set(1)
	return g
}
