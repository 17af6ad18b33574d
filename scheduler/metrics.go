package scheduler

import (
	"github.com/prometheus/client_golang/prometheus"
)

// classUnrouted labels outcomes decided without a destination (routing
// failed, or the message expired while waiting): no empty label values.
const classUnrouted = "unrouted"

// Known label values, registered up front so that dashboards and alerts
// see every series from the start, at zero.
var (
	knownOutcomes     = []string{"delivered", "deferred", "failed", "expired"}
	knownClasses      = []string{"mx", "route", "local", classUnrouted}
	knownCloseReasons = []string{"error", "shutdown", "stale", "idle_timeout", "unusable", "message_limit", "too_many_idle"}
)

// deliveryBuckets span a local loopback reply to the longest SMTP client
// timeout (delivery.timeouts.data_done, 10 minutes by default).
var deliveryBuckets = []float64{0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}

type instruments struct {
	outcomes        *prometheus.CounterVec
	attemptLatency  prometheus.Histogram
	connectLatency  prometheus.Histogram
	connOpened      prometheus.Counter
	connReused      prometheus.Counter
	connFailed      prometheus.Counter
	connClosed      *prometheus.CounterVec
	messagesPerConn prometheus.Histogram
	activeConns     *prometheus.GaugeVec
	destBackoffs    prometheus.Counter
	postponed       prometheus.Counter
	routeErrors     prometheus.Counter
	submitDropped   prometheus.Counter
	freshToScan     prometheus.Counter
	panics          prometheus.Counter
}

func newMetrics(s *Scheduler, reg prometheus.Registerer) *instruments {
	m := &instruments{
		outcomes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mta_delivery_recipients_total",
			Help: "Recipient delivery outcomes (delivered, deferred, failed, expired) by destination class (mx, route; unrouted when routing failed or the message expired waiting).",
		}, []string{"outcome", "class"}),
		attemptLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "mta_delivery_attempt_duration_seconds", Help: "Time of one SMTP transaction, MAIL to the reply to the end of data.",
			Buckets: deliveryBuckets,
		}),
		connectLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "mta_delivery_connect_duration_seconds", Help: "Time to open a connection: TCP, greeting, EHLO, STARTTLS, AUTH.",
			Buckets: deliveryBuckets,
		}),
		connOpened: prometheus.NewCounter(prometheus.CounterOpts{Name: "mta_delivery_connections_opened_total", Help: "Outbound connections opened."}),
		connReused: prometheus.NewCounter(prometheus.CounterOpts{Name: "mta_delivery_connections_reused_total", Help: "Outbound connections taken from the connection cache."}),
		connFailed: prometheus.NewCounter(prometheus.CounterOpts{Name: "mta_delivery_connections_failed_total", Help: "Outbound connections that could not be opened to any host of a destination."}),
		connClosed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mta_delivery_connections_closed_total", Help: "Outbound connections closed, by reason.",
		}, []string{"reason"}),
		messagesPerConn: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "mta_delivery_messages_per_connection", Help: "Messages sent over one outbound connection in its whole life, observed when it is closed.",
			Buckets: []float64{1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000},
		}),
		activeConns: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "mta_delivery_connections_active", Help: "Outbound connections carrying messages now, by destination class.",
		}, []string{"class"}),
		destBackoffs:  prometheus.NewCounter(prometheus.CounterOpts{Name: "mta_delivery_destination_backoffs_total", Help: "Destinations backed off after connection failures or 421."}),
		postponed:     prometheus.NewCounter(prometheus.CounterOpts{Name: "mta_delivery_postponed_total", Help: "Work postponed without an attempt because its destination was backed off."}),
		routeErrors:   prometheus.NewCounter(prometheus.CounterOpts{Name: "mta_delivery_route_errors_total", Help: "Domains that could not be resolved to a destination."}),
		submitDropped: prometheus.NewCounter(prometheus.CounterOpts{Name: "mta_delivery_submit_dropped_total", Help: "Fresh messages not handed over in memory (scheduler busy); the due scan finds them."}),
		freshToScan:   prometheus.NewCounter(prometheus.CounterOpts{Name: "mta_delivery_fresh_to_scan_total", Help: "Fresh messages left to the due scan because their domain was at its share of the window and the overflow was full."}),
		panics:        prometheus.NewCounter(prometheus.CounterOpts{Name: "mta_delivery_panics_total", Help: "Panics recovered while delivering a message (the message is deferred)."}),
	}
	for _, o := range knownOutcomes {
		for _, c := range knownClasses {
			m.outcomes.WithLabelValues(o, c)
		}
	}
	for _, r := range knownCloseReasons {
		m.connClosed.WithLabelValues(r)
	}
	for _, c := range knownClasses[:2] {
		m.activeConns.WithLabelValues(c)
	}
	if reg != nil {
		reg.MustRegister(m.outcomes, m.attemptLatency, m.connectLatency, m.connOpened, m.connReused, m.connFailed,
			m.connClosed, m.messagesPerConn, m.activeConns, m.destBackoffs, m.postponed, m.routeErrors, m.submitDropped, m.freshToScan, m.panics,
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "mta_delivery_window_size", Help: "Work items (message, domain) in the scheduler's active window.",
			}, func() float64 { return float64(s.windowSize.Load()) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "mta_delivery_fresh_waiting", Help: "Fresh work items waiting in memory for room in the window (their domain is at its share).",
			}, func() float64 { return float64(s.freshWaiting.Load()) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "mta_delivery_destinations_backed_off", Help: "Destinations currently backed off after connection failures.",
			}, func() float64 { return float64(s.backedOff.Load()) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "mta_delivery_destinations_active", Help: "Destinations with queued work or open connections.",
			}, func() float64 { return float64(s.activeDests.Load()) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "mta_delivery_connections_idle", Help: "Idle outbound connections in the connection cache.",
			}, func() float64 { return float64(s.cache.Idle()) }),
		)
	}
	return m
}
