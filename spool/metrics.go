package spool

import (
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/mtaproject/mta/metrics"
)

type spoolMetrics struct {
	reg        prometheus.Registerer
	commit     prometheus.Histogram
	errors     *prometheus.CounterVec
	collectors []prometheus.Collector
}

func newSpoolMetrics(s *Spool, reg prometheus.Registerer) *spoolMetrics {
	m := &spoolMetrics{
		reg: reg,
		commit: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "mta_spool_commit_duration_seconds",
			Help:    "Time to commit (and, with spool.sync, fsync) the batch that accepts a message.",
			Buckets: metrics.LatencyBuckets,
		}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mta_spool_errors_total",
			Help: "Spool operations that failed, by operation (put_full: refused for lack of free space).",
		}, []string{"op"}),
	}
	for _, op := range []string{"put", "put_full", "put_body", "move", "deliver", "fail", "defer", "lease", "hold", "release", "remove", "bounce"} {
		m.errors.WithLabelValues(op)
	}
	m.collectors = []prometheus.Collector{
		m.commit, m.errors,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mta_spool_messages",
			Help: "Messages in the spool (queued, deferred or held).",
		}, func() float64 { return float64(s.Count()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mta_spool_free_bytes",
			Help: "Free space of the spool's file system, as last checked.",
		}, func() float64 { return float64(s.free.get(s.opts.Now())) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mta_spool_free_reserve_bytes",
			Help: "Free space the spool leaves: below it plus a message, new mail gets 452 (spool.min_free_space, or more on a volume whose Pebble needs more).",
		}, func() float64 { return float64(s.Reserve()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "mta_spool_wal_fsyncs_total",
			Help: "fsync calls made on the spool's write-ahead log.",
		}, func() float64 { return float64(s.WALSyncs()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mta_spool_body_files",
			Help: "Body files: the bytes of large messages (spool.body_file_threshold), kept beside Pebble.",
		}, func() float64 { n, _ := s.bodies.stats(); return float64(n) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mta_spool_body_file_bytes",
			Help: "Bytes in body files, including those of delivered messages not yet removed with their file.",
		}, func() float64 { _, n := s.bodies.stats(); return float64(n) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "mta_spool_body_file_fsyncs_total",
			Help: "fsync calls made on body files.",
		}, func() float64 { return float64(s.bodies.syncCount.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mta_spool_oldest_message_age_seconds",
			Help: "Age of the oldest message in the spool (0 when empty): how long the deferred queue has been waiting.",
		}, func() float64 {
			if t := s.Oldest(); !t.IsZero() {
				return s.opts.Now().Sub(t).Seconds()
			}
			return 0
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mta_spool_healthy",
			Help: "1 while the spool accepts writes, 0 once a fatal storage error broke it.",
		}, func() float64 {
			if s.Healthy() != nil {
				return 0
			}
			return 1
		}),
	}
	m.collectors = append(m.collectors, pebbleCollector{s})
	if reg != nil {
		for _, c := range m.collectors {
			reg.MustRegister(c)
		}
	}
	return m
}

// pebbleCollector reports the health of the Pebble database from one
// snapshot of its metrics per scrape.
type pebbleCollector struct{ s *Spool }

var (
	pebbleDebt      = prometheus.NewDesc("mta_spool_compaction_debt_bytes", "Bytes Pebble estimates it must compact to reach a stable shape; growing debt means writes outrun compactions.", nil, nil)
	pebbleL0Files   = prometheus.NewDesc("mta_spool_l0_files", "Tables in level 0; many slow reads and stall writes.", nil, nil)
	pebbleL0Sublvls = prometheus.NewDesc("mta_spool_l0_sublevels", "Sublevels of level 0 (its read amplification).", nil, nil)
	pebbleWALBytes  = prometheus.NewDesc("mta_spool_wal_bytes", "Bytes of live write-ahead log files on disk.", nil, nil)
	pebbleTableB    = prometheus.NewDesc("mta_spool_table_bytes", "Bytes of live tables on disk.", nil, nil)
	pebbleDiskBytes = prometheus.NewDesc("mta_spool_disk_bytes", "Bytes the spool's database uses on disk in all (tables, WAL, obsolete files not yet deleted).", nil, nil)
)

func (pebbleCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{pebbleDebt, pebbleL0Files, pebbleL0Sublvls, pebbleWALBytes, pebbleTableB, pebbleDiskBytes} {
		ch <- d
	}
}

func (c pebbleCollector) Collect(ch chan<- prometheus.Metric) {
	c.s.closeMu.RLock()
	defer c.s.closeMu.RUnlock()
	if c.s.closed {
		return
	}
	m := c.s.db.Metrics()
	gauge := func(d *prometheus.Desc, v float64) { ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v) }
	gauge(pebbleDebt, float64(m.Compact.EstimatedDebt))
	gauge(pebbleL0Files, float64(m.Levels[0].TablesCount))
	gauge(pebbleL0Sublvls, float64(m.Levels[0].Sublevels))
	gauge(pebbleWALBytes, float64(m.WAL.PhysicalSize))
	var tables int64
	for _, l := range m.Levels {
		tables += l.TablesSize
	}
	gauge(pebbleTableB, float64(tables))
	gauge(pebbleDiskBytes, float64(m.DiskSpaceUsage()))
}

func (m *spoolMetrics) unregister() {
	if m.reg == nil {
		return
	}
	for _, c := range m.collectors {
		m.reg.Unregister(c)
	}
}

// WALSyncs returns how many fsyncs the write-ahead log has done since Open.
func (s *Spool) WALSyncs() uint64 {
	h := s.db.Metrics().LogWriter.FsyncLatency
	if h == nil {
		return 0
	}
	var d dto.Metric
	if err := h.Write(&d); err != nil || d.Histogram == nil {
		return 0
	}
	return d.Histogram.GetSampleCount()
}

// Oldest returns the acceptance time of the oldest message in the spool, or
// the zero time when it is empty. Queue IDs sort by acceptance time, so
// this is the first record.
func (s *Spool) Oldest() time.Time {
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte(prefixMessage), UpperBound: []byte(prefixEnd(prefixMessage))})
	if err != nil {
		return time.Time{}
	}
	defer it.Close()
	if !it.First() {
		return time.Time{}
	}
	return IDTime(string(it.Key()[len(prefixMessage):]))
}

// FreeBytes returns the free space of the spool's file system as last
// checked (see Reserve).
func (s *Spool) FreeBytes() int64 { return s.free.get(s.opts.Now()) }

// DiskBytes returns what the spool uses on disk: its database and its body
// files.
func (s *Spool) DiskBytes() int64 {
	s.closeMu.RLock()
	defer s.closeMu.RUnlock()
	if s.closed {
		return 0
	}
	_, bodies := s.bodies.stats()
	return int64(s.db.Metrics().DiskSpaceUsage()) + bodies
}
