package resolve

import (
	"errors"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the optional Prometheus counters; a nil *metrics counts
// nothing.
type metrics struct {
	queries  *prometheus.CounterVec
	hits     prometheus.Counter
	duration prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		queries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mta_dns_queries_total",
			Help: "DNS queries sent to servers, by query type and result (ok, nxdomain, nodata, servfail, timeout, error).",
		}, []string{"qtype", "result"}),
		hits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "mta_dns_cache_hits_total",
			Help: "DNS lookups answered from the cache.",
		}),
	}
	// Another Resolver may have registered the counters already: share them.
	if err := reg.Register(m.queries); err != nil {
		var are prometheus.AlreadyRegisteredError
		if !errors.As(err, &are) {
			return nil, err
		}
		c, ok := are.ExistingCollector.(*prometheus.CounterVec)
		if !ok {
			return nil, err
		}
		m.queries = c
	}
	for _, qtype := range []string{"MX", "A", "AAAA"} {
		for _, r := range []string{"ok", "nxdomain", "nodata", "servfail", "timeout", "error"} {
			m.queries.WithLabelValues(qtype, r)
		}
	}
	if err := reg.Register(m.hits); err != nil {
		var are prometheus.AlreadyRegisteredError
		if !errors.As(err, &are) {
			return nil, err
		}
		c, ok := are.ExistingCollector.(prometheus.Counter)
		if !ok {
			return nil, err
		}
		m.hits = c
	}
	m.duration = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "mta_dns_query_duration_seconds", Help: "Time of one DNS exchange with a server (retries over TCP included).",
		Buckets: []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10},
	})
	if err := reg.Register(m.duration); err != nil {
		var are prometheus.AlreadyRegisteredError
		if !errors.As(err, &are) {
			return nil, err
		}
		c, ok := are.ExistingCollector.(prometheus.Histogram)
		if !ok {
			return nil, err
		}
		m.duration = c
	}
	return m, nil
}

// took observes one exchange's duration.
func (m *metrics) took(d time.Duration) {
	if m == nil {
		return
	}
	m.duration.Observe(d.Seconds())
}

func (m *metrics) query(qtype uint16, result string) {
	if m == nil {
		return
	}
	m.queries.WithLabelValues(dns.TypeToString[qtype], result).Inc()
}

func (m *metrics) hit() {
	if m == nil {
		return
	}
	m.hits.Inc()
}
