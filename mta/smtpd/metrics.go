package smtpd

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the edge's instruments, shared by all its listeners.
type Metrics struct {
	connections *prometheus.CounterVec
	active      *prometheus.GaugeVec
	refused     *prometheus.CounterVec
	accepted    *prometheus.CounterVec
	bytes       *prometheus.CounterVec
	rejected    *prometheus.CounterVec
	auth        *prometheus.CounterVec
	authBlocks  prometheus.Counter
	starttls    *prometheus.CounterVec
	panics      prometheus.Counter
}

// NewMetrics creates the edge's instruments and registers them on reg
// (nil: not registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		connections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mta_smtpd_connections_total", Help: "SMTP connections accepted, by listener.",
		}, []string{"listener"}),
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "mta_smtpd_connections_active", Help: "SMTP connections open now, by listener.",
		}, []string{"listener"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mta_smtpd_connections_refused_total", Help: "SMTP connections refused with 421, by listener and limit.",
		}, []string{"listener", "reason"}),
		accepted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mta_smtpd_messages_accepted_total", Help: "Messages accepted (250 after the spool sync), by listener.",
		}, []string{"listener"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mta_smtpd_bytes_accepted_total", Help: "Bytes of accepted messages as stored, by listener.",
		}, []string{"listener"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mta_smtpd_rejections_total", Help: "Commands or messages refused, by listener and reason.",
		}, []string{"listener", "reason"}),
		auth: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mta_smtpd_auth_total", Help: "AUTH attempts by result (success, failure, blocked: refused unchecked because the client address is blocked).",
		}, []string{"result"}),
		authBlocks: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "mta_smtpd_auth_blocks_total", Help: "Client addresses blocked from AUTH after too many failures within the window.",
		}),
		starttls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mta_smtpd_starttls_total", Help: "Inbound STARTTLS handshakes by result (ok, failed).",
		}, []string{"result"}),
		panics: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "mta_smtpd_panics_total", Help: "Panics recovered in SMTP session handlers (each answered 451).",
		}),
	}
	// Known label values exist from the start, so that dashboards and
	// alerts see zeros instead of nothing.
	for _, l := range []string{"smtp", "submission"} {
		m.connections.WithLabelValues(l)
		m.active.WithLabelValues(l)
		m.accepted.WithLabelValues(l)
		m.bytes.WithLabelValues(l)
		for _, r := range []string{"max_connections", "max_connections_per_ip", "shutting_down"} {
			m.refused.WithLabelValues(l, r)
		}
		for _, r := range rejectionReasons {
			m.rejected.WithLabelValues(l, r)
		}
	}
	for _, r := range []string{"success", "failure", "blocked"} {
		m.auth.WithLabelValues(r)
	}
	for _, r := range []string{"ok", "failed"} {
		m.starttls.WithLabelValues(r)
	}
	if reg != nil {
		reg.MustRegister(m.connections, m.active, m.refused, m.accepted, m.bytes, m.rejected, m.auth, m.authBlocks, m.starttls, m.panics)
	}
	return m
}

// rejectionReasons are the reason labels of mta_smtpd_rejections_total.
var rejectionReasons = []string{"auth_cancelled", "auth_required", "bad_parameter", "bad_recipient", "bad_sender",
	"bad_sequence", "bad_syntax", "bare_line_ending", "encryption_required", "line_too_long", "mailbox_full",
	"memory_budget", "message_too_big", "not_implemented", "not_smtp", "nul_byte", "relay_denied",
	"sender_not_owned", "shutting_down", "spool_error", "storage_full", "suppressed", "sync_error", "too_many_hops",
	"too_many_recipients", "unknown_command", "unknown_parameter", "unknown_recipient"}
