package server

import (
	"strings"
	"time"

	"github.com/mtaproject/mta/mta/accounting"
	"github.com/mtaproject/mta/mta/inject"
	"github.com/mtaproject/mta/mta/webhook"
	"github.com/mtaproject/mta/spool"
)

// defaultTenant owns the mail that no API tenant submitted (SMTP from
// trusted networks and AUTH users): its suppression list and webhooks.
const defaultTenant = "default"

// tenantSet names the API tenants.
type tenantSet map[string]bool

// of is the tenant of mail submitted by authUser: an API tenant (its
// messages carry "api:<name>"), or the default one.
func (t tenantSet) of(authUser string) string {
	if name, ok := strings.CutPrefix(authUser, inject.AuthPrefix); ok && t[name] {
		return name
	}
	return defaultTenant
}

// eventLog is where message events go: the accounting log and the
// webhooks of the event's tenant. A nil *eventLog discards them.
type eventLog struct {
	acct     *accounting.Log
	hooks    *webhook.Dispatcher
	byTenant map[string][]string // webhook names by tenant
}

// on reports whether anything takes events, so that callers can skip
// building them.
func (l *eventLog) on() bool { return l != nil && (l.acct != nil || len(l.byTenant) > 0) }

// Write sends one event on; e.Tenant picks the webhooks.
func (l *eventLog) Write(e *accounting.Event) {
	if !l.on() {
		return
	}
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	l.acct.Write(e)
	names := l.byTenant[e.Tenant]
	if len(names) == 0 {
		return
	}
	b := e.AppendJSON(nil)
	for _, n := range names {
		l.hooks.Enqueue(n, b)
	}
}

// Close closes the accounting log.
func (l *eventLog) Close() error {
	if l == nil {
		return nil
	}
	return l.acct.Close()
}

// eventStore is the webhooks' queue in the spool.
type eventStore struct{ sp *spool.Spool }

func (s eventStore) AppendEvents(hook string, evs []webhook.StoredEvent) error {
	out := make([]spool.StoredEvent, len(evs))
	for i, e := range evs {
		out[i] = spool.StoredEvent(e)
	}
	return s.sp.AppendEvents(hook, out)
}

func (s eventStore) Events(hook string, limit int) ([]webhook.StoredEvent, error) {
	evs, err := s.sp.Events(hook, limit)
	out := make([]webhook.StoredEvent, len(evs))
	for i, e := range evs {
		out[i] = webhook.StoredEvent(e)
	}
	return out, err
}

func (s eventStore) DeleteEvents(hook string, through uint64) error {
	return s.sp.DeleteEvents(hook, through)
}

func (s eventStore) EventBacklog(hook string) (int, int64, uint64, error) {
	return s.sp.EventBacklog(hook)
}
