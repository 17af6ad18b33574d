package scheduler

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mtaproject/mta/mta"
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
	endToEnd        *prometheus.HistogramVec
	replyCodes      *prometheus.CounterVec
	attempts        prometheus.Histogram
}

// endToEndBuckets span a delivery in milliseconds to one after days of
// retries (delivery.max_lifetime is 5 days by default).
var endToEndBuckets = []float64{0.01, 0.1, 0.5, 1, 5, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 86400, 2 * 86400, 5 * 86400}

// commonCodes are the enhanced status codes that get a label of their own
// in mta_delivery_replies_total; any other is counted as its class and
// subject ("5.7.x"), and a reply without one by its class ("4.x.x"), so
// the label set stays bounded whatever remote servers say.
var commonCodes = map[string]bool{"2.0.0": true, "2.1.5": true, "2.6.0": true,
	"4.2.2": true, "4.3.0": true, "4.3.2": true, "4.4.1": true, "4.4.2": true, "4.7.0": true, "4.7.1": true, "4.7.28": true,
	"5.0.0": true, "5.1.1": true, "5.1.2": true, "5.1.10": true, "5.2.1": true, "5.2.2": true, "5.3.4": true,
	"5.4.6": true, "5.4.7": true, "5.6.3": true, "5.6.7": true, "5.7.1": true, "5.7.26": true}

// codeLabel is the bounded label of a reply (or "none" for an outcome
// decided without one).
func codeLabel(r *mta.Reply) string {
	if r == nil {
		return "none"
	}
	e := r.Enhanced
	if e == (mta.Enhanced{}) {
		return fmt.Sprintf("%d.x.x", min(max(r.Code/100, 2), 5))
	}
	if code := e.String(); commonCodes[code] {
		return code
	}
	return fmt.Sprintf("%d.%d.x", min(max(e[0], 2), 5), min(e[1], 7))
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
		endToEnd: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "mta_delivery_end_to_end_seconds", Help: "From arrival to a recipient's final outcome (delivered, failed, expired).",
			Buckets: endToEndBuckets,
		}, []string{"outcome"}),
		replyCodes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mta_delivery_replies_total", Help: "Recipient outcomes by outcome and enhanced status code (common codes by name, others as 5.7.x; none: decided without a reply).",
		}, []string{"outcome", "code"}),
		attempts: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "mta_delivery_attempts_per_delivery", Help: "Attempts a recipient took to be delivered.",
			Buckets: []float64{1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50},
		}),
	}
	for _, o := range []string{"delivered", "failed", "expired"} {
		m.endToEnd.WithLabelValues(o)
	}
	// The outcomes of every day, at their usual codes, from the start.
	m.replyCodes.WithLabelValues("delivered", "2.0.0")
	m.replyCodes.WithLabelValues("deferred", "4.x.x")
	m.replyCodes.WithLabelValues("failed", "5.x.x")
	m.replyCodes.WithLabelValues("deferred", "none") // a connection failure
	m.replyCodes.WithLabelValues("expired", "none")
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
			m.endToEnd, m.replyCodes, m.attempts,
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
