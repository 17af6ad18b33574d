package server

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/mta/accounting"
	"github.com/mtaproject/mta/mta/dsn"
	"github.com/mtaproject/mta/spool"
)

// notifier makes the delivery status notifications that spool transitions
// owe (it is the spool's Notifier): a bounce for recipients that failed, a
// warning for recipients that asked for NOTIFY=DELAY and have waited
// longer than dsn.delay_warning, a "relayed" notice for NOTIFY=SUCCESS
// when the next hop did not offer DSN. mta/dsn decides what NOTIFY asks
// for and writes the bytes; this wires it to the spool, the configuration,
// the log and the metrics.
type notifier struct {
	hostname     string
	maxReturned  int
	delayWarning time.Duration // 0: no delay notices
	maxLifetime  time.Duration
	postmaster   string // "" drops undeliverable notices
	newID        func() string
	log          *zap.Logger
	generated    *prometheus.CounterVec
	dropped      prometheus.Counter
	events       *eventLog // the accounting log and webhooks
	tenants      tenantSet
}

func newNotifier(hostname string, maxReturned int, delayWarning, maxLifetime time.Duration, postmaster string,
	newID func() string, log *zap.Logger, reg prometheus.Registerer) *notifier {
	n := &notifier{hostname: hostname, maxReturned: maxReturned, delayWarning: delayWarning, maxLifetime: maxLifetime,
		postmaster: postmaster, newID: newID, log: log,
		generated: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mta_dsn_generated_total", Help: "Delivery status notifications made, by action (failed, delayed, relayed, delivered).",
		}, []string{"action"}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "mta_dsn_dropped_total", Help: "Notifications that could not be delivered and were dropped (no dsn.postmaster, or a notice to the postmaster failed).",
		}),
	}
	for _, a := range []dsn.Action{dsn.Failed, dsn.Delayed, dsn.Relayed, dsn.Delivered} {
		n.generated.WithLabelValues(string(a))
	}
	if reg != nil {
		reg.MustRegister(n.generated, n.dropped)
	}
	return n
}

// notice is the spool.Notifier.
func (n *notifier) notice(t *spool.Transition, body func() ([]byte, error)) (*spool.Notice, error) {
	m := t.Message
	to, kind := m.From, spool.SenderNotice
	if m.From == "" {
		// Never a notice to the null sender (RFC 3461 §6.2, RFC 5321
		// §4.5.5): that is how bounces loop. A notice of ours that failed
		// goes on to the postmaster once, or is dropped.
		if m.Notice == spool.NotNotice || !n.anyFailed(t) {
			return nil, nil
		}
		if m.Notice == spool.PostmasterNotice || n.postmaster == "" {
			n.dropped.Inc()
			n.log.Warn("notification undeliverable; dropped", zap.String("id", m.ID), zap.String("rcpt", m.Recipients[t.Changed[0]].Address),
				zap.String("reply", m.Recipients[t.Changed[0]].LastReply))
			return nil, nil
		}
		to, kind = n.postmaster, spool.PostmasterNotice
	}
	if mta.Domain(to) == "" {
		return nil, nil
	}
	var rcpts []dsn.Recipient
	for _, i := range t.Changed {
		r := &m.Recipients[i]
		action, ok := n.action(t, r, kind)
		if !ok {
			continue
		}
		rc := dsn.Recipient{Address: r.Address, ORcptType: r.ORcptType, ORcpt: r.ORcpt, Action: action,
			Reply: r.LastReply, RemoteMTA: r.RemoteMTA, Diagnostic: r.Diagnostic, LastAttempt: r.LastAttempt}
		if action == dsn.Delayed {
			r.DelayNotified = true
			rc.WillRetryUntil = m.Received.Add(n.maxLifetime)
		}
		rcpts = append(rcpts, rc)
	}
	if len(rcpts) == 0 {
		return nil, nil
	}
	original, err := body()
	if err != nil {
		// The bounce matters more than the copy of the original: without
		// it the message could never leave the queue.
		n.log.Error("notification without the original: its bytes are unreadable", zap.String("id", m.ID), zap.Error(err))
		original = nil
	}
	rep := &dsn.Report{Hostname: n.hostname, ID: n.newID(), OriginalID: m.ID, Sender: to, EnvID: m.EnvID, Ret: m.Ret,
		SMTPUTF8: m.SMTPUTF8, Arrival: m.Received, Date: t.Now, Recipients: rcpts, Original: original, MaxReturned: n.maxReturned}
	data, eightBit := dsn.Build(rep)
	// A trace field like every message's, naming the notice's queue ID.
	data = append([]byte("Received: by "+n.hostname+" (mta) id "+rep.ID+"; "+t.Now.Format(time.RFC1123Z)+"\r\n"), data...)
	// The original's submitter and metadata, so that the notice's own
	// delivery events go to its tenant (its webhooks), as the events of
	// the message it is about: not to the default tenant's, which must not
	// see another's return paths.
	notice := &spool.Message{ID: rep.ID, Notice: kind, SMTPUTF8: m.SMTPUTF8, Body8Bit: eightBit, AuthUser: m.AuthUser, Metadata: m.Metadata,
		Recipients: []spool.RecipientState{{Recipient: mta.Recipient{Address: to, Notify: mta.NotifyNever}}}}
	action := string(rcpts[0].Action)
	addrs := make([]string, len(rcpts))
	for i, r := range rcpts {
		addrs[i] = r.Address
	}
	id := m.ID
	committed := func() {
		n.events.Write(&accounting.Event{Event: accounting.Bounce, ID: id, MessageID: m.MessageID, Sender: m.From,
			Recipient: to, DSNID: rep.ID, Action: action, Size: int64(len(data)), Tenant: n.tenants.of(m.AuthUser), Metadata: m.Metadata})
		n.generated.WithLabelValues(action).Inc()
		n.log.Info("notification made", zap.String("id", id), zap.String("dsn_id", rep.ID), zap.String("action", action),
			zap.String("to", to), zap.Strings("rcpts", addrs))
	}
	return &spool.Notice{Message: notice, Data: data, Committed: committed}, nil
}

// action returns the notice a changed recipient owes, if any.
func (n *notifier) action(t *spool.Transition, r *spool.RecipientState, kind spool.NoticeKind) (dsn.Action, bool) {
	switch r.Status {
	case spool.Failed:
		// A failed notice goes to the postmaster whatever its NOTIFY=NEVER.
		return dsn.Failed, kind == spool.PostmasterNotice || dsn.Wanted(r.Notify, dsn.Failed)
	case spool.Delivered:
		if t.Local {
			return dsn.Delivered, dsn.Wanted(r.Notify, dsn.Delivered)
		}
		// A server that offered DSN got NOTIFY and reports the delivery
		// itself (RFC 3461 §5.2.2); one that did not gets "relayed".
		return dsn.Relayed, !t.RemoteDSN && dsn.Wanted(r.Notify, dsn.Relayed)
	case spool.Queued:
		// Not once the lifetime is over: the bounce is on its way.
		age := t.Now.Sub(t.Message.Received)
		warn := n.delayWarning > 0 && !r.DelayNotified && age >= n.delayWarning && age < n.maxLifetime
		return dsn.Delayed, warn && dsn.Wanted(r.Notify, dsn.Delayed)
	}
	return "", false
}

// anyFailed reports whether the transition failed a recipient.
func (n *notifier) anyFailed(t *spool.Transition) bool {
	for _, i := range t.Changed {
		if t.Message.Recipients[i].Status == spool.Failed {
			return true
		}
	}
	return false
}
