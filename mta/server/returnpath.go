package server

import (
	"errors"
	"regexp"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/mta/accounting"
	"github.com/mtaproject/mta/mta/bounceparse"
	"github.com/mtaproject/mta/spool"
)

// returnPath handles mail that comes back to the VERP return paths of
// injected messages (docs/return-path.md): it reads the report, matches
// it to the message sent, and turns it into an event and, for hard
// bounces and complaints, a suppression. The report itself is stored like
// any mail to a local domain (the users file's catch-all for the bounce
// domain), readable over POP3.
type returnPath struct {
	domain   string
	hostname string
	sp       *spool.Spool
	events   *eventLog
	suppress *suppressions
	rules    []bounceparse.Rule
	reports  *prometheus.CounterVec
	log      *zap.Logger
}

func newReturnPath(domain, hostname string, sp *spool.Spool, rules []bounceparse.Rule, reg prometheus.Registerer, log *zap.Logger) *returnPath {
	r := &returnPath{domain: domain, hostname: hostname, sp: sp, rules: rules, log: log,
		reports: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mta_return_path_reports_total",
			Help: "Mail received at the bounce domain by outcome (bounce, complaint, delay, unmatched, unparsed)."}, []string{"result"})}
	for _, res := range []string{"bounce", "complaint", "delay", "unmatched", "unparsed"} {
		r.reports.WithLabelValues(res)
	}
	reg.MustRegister(r.reports)
	return r
}

// address is the return path of message id to rcpt.
func (r *returnPath) address(id, rcpt string) string {
	return "bounces+" + id + "=" + mta.Domain(rcpt) + "@" + r.domain
}

var verpRE = regexp.MustCompile(`(?i)bounces\+([0-9A-Z]{16})=[^@\s<>]*@([^\s<>]+)`)

// idFrom finds the queue ID in a VERP address at our bounce domain.
func (r *returnPath) idFrom(s string) string {
	for _, m := range verpRE.FindAllStringSubmatch(s, -1) {
		if strings.EqualFold(strings.TrimSuffix(m[2], "."), r.domain) {
			return strings.ToUpper(m[1])
		}
	}
	return ""
}

// ours reports whether every recipient is at the bounce domain.
func (r *returnPath) ours(env *mta.Envelope) bool {
	if r == nil || len(env.Recipients) == 0 {
		return false
	}
	for _, rc := range env.Recipients {
		if mta.Domain(rc.Address) != r.domain {
			return false
		}
	}
	return true
}

// process reads one message received at the bounce domain. It never
// fails the message: whatever it cannot use is counted and logged.
func (r *returnPath) process(id string, env *mta.Envelope, body []byte) {
	rep, err := bounceparse.Parse(body, r.rules)
	if err != nil {
		r.reports.WithLabelValues("unparsed").Inc()
		r.log.Info("mail at the bounce domain is no report", zap.String("id", id), zap.Error(err))
		return
	}
	sentID := ""
	for _, rc := range env.Recipients {
		if sentID = r.idFrom(rc.Address); sentID != "" {
			break
		}
	}
	if sentID == "" { // a complaint to a fixed address
		sentID = r.idFrom(rep.OriginalMailFrom)
	}
	if sentID == "" && rep.Original != nil { // or a report that quotes the original
		sentID = r.idFrom(rep.Original.Get("Return-Path"))
		if mid := strings.Trim(rep.Original.Get("Message-Id"), "<> "); sentID == "" && strings.HasSuffix(mid, "@"+r.hostname) {
			sentID = strings.TrimSuffix(mid, "@"+r.hostname)
		}
	}
	sent, err := r.sp.Sent(sentID)
	if sentID == "" || err != nil {
		if err != nil && !errors.Is(err, mta.ErrNotFound) {
			r.log.Warn("reading a sent-message record", zap.String("id", sentID), zap.Error(err))
		}
		r.reports.WithLabelValues("unmatched").Inc()
		r.log.Info("report at the bounce domain matches no message sent", zap.String("id", id), zap.String("kind", rep.Kind), zap.String("sent_id", sentID))
		return
	}
	if rep.Kind == bounceparse.Complaint {
		r.reports.WithLabelValues("complaint").Inc()
		r.events.Write(&accounting.Event{Event: accounting.Complaint, ID: sentID, MessageID: sent.MessageID, Recipient: sent.Recipient,
			Reply: rep.FeedbackType, Tenant: sent.Tenant, Metadata: sent.Metadata, DSNID: id})
		r.suppressAddress(sent, "complaint", "feedback report: "+rep.FeedbackType)
		return
	}
	for _, rc := range rep.Recipients {
		if rc.Action != "failed" {
			if rc.Action == "delayed" {
				r.reports.WithLabelValues("delay").Inc()
			}
			continue
		}
		r.reports.WithLabelValues("bounce").Inc()
		reply := rc.Diagnostic
		if reply == "" {
			reply = rc.Status
		}
		r.events.Write(&accounting.Event{Event: accounting.AsyncBounce, ID: sentID, MessageID: sent.MessageID, Recipient: sent.Recipient,
			Enhanced: rc.Status, Reply: reply, Tenant: sent.Tenant, Metadata: sent.Metadata, DSNID: id})
		if r.suppress != nil && r.suppress.matches(rc.Status) {
			r.suppressAddress(sent, "bounce", rc.Status+" "+reply)
		}
		return // one message, one recipient: the first failed one is it
	}
}

func (r *returnPath) suppressAddress(sent *spool.SentRecord, source, reason string) {
	if r.suppress == nil {
		return
	}
	if err := r.sp.Suppress(spool.Suppression{Tenant: sent.Tenant, Address: sent.Recipient, Source: source, Reason: reason}); err != nil {
		r.log.Warn("could not suppress", zap.String("rcpt", sent.Recipient), zap.Error(err))
		return
	}
	r.log.Info("recipient suppressed", zap.String("tenant", sent.Tenant), zap.String("rcpt", sent.Recipient), zap.String("source", source))
}

// expire drops the records of messages older than keep, every hour.
func (r *returnPath) expire(keep time.Duration) {
	if err := r.sp.ExpireSent(time.Now().Add(-keep)); err != nil {
		r.log.Warn("expiring sent-message records", zap.Error(err))
	}
}
