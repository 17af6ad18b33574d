package server

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
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
	secret   []byte // keys the token in each return path, so that nobody can forge a bounce for a message
	hostname string
	sp       *spool.Spool
	events   *eventLog
	suppress *suppressions
	rules    []bounceparse.Rule
	reports  *prometheus.CounterVec
	log      *zap.Logger
}

func newReturnPath(domain, hostname string, secret []byte, sp *spool.Spool, rules []bounceparse.Rule, reg prometheus.Registerer, log *zap.Logger) *returnPath {
	r := &returnPath{domain: domain, secret: secret, hostname: hostname, sp: sp, rules: rules, log: log,
		reports: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mta_return_path_reports_total",
			Help: "Mail received at the bounce domain by outcome (bounce, complaint, delay, unmatched, unparsed)."}, []string{"result"})}
	for _, res := range []string{"bounce", "complaint", "delay", "unmatched", "unparsed"} {
		r.reports.WithLabelValues(res)
	}
	reg.MustRegister(r.reports)
	return r
}

// address is the return path of message id to rcpt:
// bounces+<id>-<token>=<rcpt domain>@<bounce domain>.
func (r *returnPath) address(id, rcpt string) string {
	return "bounces+" + id + "-" + r.token(id) + "=" + mta.Domain(rcpt) + "@" + r.domain
}

// token is 8 hex digits of HMAC-SHA256(secret, id).
func (r *returnPath) token(id string) string {
	mac := hmac.New(sha256.New, r.secret)
	mac.Write([]byte(id))
	return hex.EncodeToString(mac.Sum(nil)[:4])
}

var verpRE = regexp.MustCompile(`(?i)bounces\+([0-9A-Z]{16})-([0-9a-f]{8})=[^@\s<>]*@([^\s<>]+)`)

// idFrom finds the queue ID in a VERP address at our bounce domain whose
// token is right; a wrong token is a forgery (or a typo), not ours.
func (r *returnPath) idFrom(s string) string {
	for _, m := range verpRE.FindAllStringSubmatch(s, -1) {
		id := strings.ToUpper(m[1])
		if strings.EqualFold(strings.TrimSuffix(m[3], "."), r.domain) && hmac.Equal([]byte(strings.ToLower(m[2])), []byte(r.token(id))) {
			return id
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
	if len(env.Recipients) == 1 {
		// A report goes to the one return path it is about: a message to
		// many is no report of ours, and must not try as many tokens.
		sentID = r.idFrom(env.Recipients[0].Address)
	}
	if sentID == "" { // a complaint to a fixed address
		sentID = r.idFrom(rep.OriginalMailFrom)
	}
	if sentID == "" && rep.Original != nil { // or a report that quotes the original
		// Only the return path, with its token: a Message-ID is easy to
		// guess, and a forged report must not suppress anyone.
		sentID = r.idFrom(rep.Original.Get("Return-Path"))
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
		if complaintSuppresses[rep.FeedbackType] {
			r.suppressAddress(sent, "complaint", "feedback report: "+rep.FeedbackType)
		}
		return
	}
	if env.From != "" {
		// Bounces come from the null sender (RFC 5321 §4.5.5): anyone's
		// mail that reaches a valid return path, however it is written,
		// must not suppress a customer.
		r.reports.WithLabelValues("unparsed").Inc()
		r.log.Info("mail at the bounce domain from a sender, not trusted as a bounce", zap.String("id", id), zap.String("sent_id", sentID))
		return
	}
	if !rep.Standard {
		// A bounce read by a rule, not from a delivery-status part, counts
		// only as a server's (from the null sender) and only about the
		// recipient the message was sent to: anyone's mail that reaches a
		// valid return path must not suppress a customer.
		if len(rep.Recipients) == 0 || !strings.EqualFold(rep.Recipients[0].Address, sent.Recipient) {
			r.reports.WithLabelValues("unparsed").Inc()
			r.log.Info("mail at the bounce domain read by a rule but not trusted as a bounce", zap.String("id", id), zap.String("sent_id", sentID))
			return
		}
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
		// Suppressed only when the report is about the address we sent
		// to: a failed forward names another in its Final-Recipient (and
		// often ours in Original-Recipient), and the address we sent to
		// may still take mail.
		if r.suppress != nil && r.suppress.matches(rc.Status) && strings.EqualFold(rc.Address, sent.Recipient) {
			r.suppressAddress(sent, "bounce", rc.Status+" "+reply)
		}
		return // one message, one recipient: the first failed one is it
	}
}

// complaintSuppresses are the feedback types (RFC 5965 §7.3) whose
// complaint suppresses its recipient: not "not-spam" (the user says the
// opposite) nor "auth-failure" (about our authentication, not the user).
var complaintSuppresses = map[string]bool{"abuse": true, "fraud": true, "virus": true, "other": true, "": true}

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

// verpSecret reads the key of the return-path tokens, making it (32
// random bytes, mode 0600) on the first start: it must outlive restarts,
// or the bounces of mail sent before one would no longer match.
func verpSecret(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	switch {
	case err == nil && len(b) >= 32:
		return b, nil
	case err == nil:
		return nil, fmt.Errorf("%s holds %d bytes, want 32: remove it to make a new key (the bounces of mail sent before then will no longer match)", path, len(b))
	case !errors.Is(err, os.ErrNotExist):
		return nil, err
	}
	b = make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("making %s: %w", path, err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return nil, err
	}
	return b, f.Close()
}
