package admin

import (
	"net/url"
	"testing"
	"time"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/spool"
)

func msg(from string, received time.Time, held bool, rcpts ...spool.RecipientState) *spool.Message {
	return &spool.Message{ID: "X", From: from, Received: received, Held: held, Recipients: rcpts}
}

func rcpt(addr string, attempts int, reply string) spool.RecipientState {
	return spool.RecipientState{Recipient: mta.Recipient{Address: addr}, Domain: mta.Domain(addr), Status: spool.Queued, Attempts: attempts, LastReply: reply}
}

// TestStates: a message waiting out its destination's backoff (no attempt
// of its own, but a reason) is deferred, like one that was tried.
func TestStates(t *testing.T) {
	now := time.Now()
	for want, m := range map[string]*spool.Message{
		"queued":   msg("a@x", now, false, rcpt("b@y.test", 0, "")),
		"deferred": msg("a@x", now, false, rcpt("b@y.test", 0, "451 4.4.1 destination backed off after a connection failure")),
		"held":     msg("a@x", now, true, rcpt("b@y.test", 3, "451 4.7.1 later")),
	} {
		if got := State(m); got != want {
			t.Errorf("State = %s, want %s", got, want)
		}
	}
	if got := State(msg("a@x", now, false, rcpt("b@y.test", 2, "421 4.4.2 timeout"))); got != "deferred" {
		t.Errorf("tried: %s", got)
	}
}

func TestFilterMatch(t *testing.T) {
	now := time.Now()
	m := msg("App@Example.org", now.Add(-2*time.Hour), false,
		rcpt("a@gmail.test", 2, "421 4.7.28 rate limited"), rcpt("b@yahoo.test", 0, ""))
	delivered := rcpt("c@done.test", 1, "250 ok")
	delivered.Status = spool.Delivered
	m.Recipients = append(m.Recipients, delivered)
	for q, want := range map[string]bool{
		"":                              true,
		"domain=gmail.test":             true,
		"domain=done.test":              false, // not queued there any more
		"sender=app@example.org":        true,
		"sender=@example.org":           true,
		"sender=@other.test":            false,
		"sender=<>":                     false,
		"state=deferred":                true,
		"state=held":                    false,
		"older_than=1h":                 true,
		"older_than=3h":                 false,
		"reply=4.7.*":                   true,
		"reply=5.*":                     false,
		"reply=rate+limited":            true,
		"domain=yahoo.test&reply=4.7.*": false, // both on the same recipient
	} {
		v, _ := url.ParseQuery(q)
		f, err := ParseFilter(v)
		if err != nil {
			t.Fatalf("%q: %v", q, err)
		}
		if got := f.Match(m, now); got != want {
			t.Errorf("%q: match %v, want %v", q, got, want)
		}
	}
	for _, q := range []string{"state=active", "older_than=soon", "reply=[", "older_than=-1h"} {
		v, _ := url.ParseQuery(q)
		if _, err := ParseFilter(v); err == nil {
			t.Errorf("%q accepted", q)
		}
	}
}
