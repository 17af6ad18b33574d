package scheduler

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtaproject/mta/mta"
)

// rcpts returns n addresses at domain.
func rcpts(n int, domain string) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("r%d@%s", i, domain)
	}
	return out
}

// recipientRun queues one message to n recipients of x.test, waits until
// nothing of it is queued or it was deferred, and returns what the store
// and the transport saw.
func recipientRun(t *testing.T, n int, edit func(*Options), tr *fakeTransport) (store *memStore, txns []int, defers int) {
	t.Helper()
	store = newMemStore()
	h := start(t, edit, store, tr)
	now := time.Now()
	store.add("m1", now, now.Add(time.Hour), rcpts(n, "x.test")...)
	h.s.Submit("m1", []string{"x.test"}, mta.PriorityBulk)
	waitFor(t, "the attempt", func() bool {
		store.mu.Lock()
		defer store.mu.Unlock()
		return len(store.done)+len(store.failures) == n || store.defers[workKey{"m1", "x.test"}] > 0
	})
	h.stop()
	store.mu.Lock()
	defer store.mu.Unlock()
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return store, slices.Clone(tr.txns), store.defers[workKey{"m1", "x.test"}]
}

// A server that takes fewer recipients per transaction than the message
// has (452 4.5.3 past its limit, RFC 5321 §4.5.3.1.10) gets the rest in
// further transactions on the same connection, in the same attempt: no
// recipient waits a backoff for the server's limit.
func TestRecipientsPastTheServersLimitGoInTheNextTransaction(t *testing.T) {
	for _, tooMany := range []*mta.Reply{
		{Code: 452, Enhanced: mta.Enhanced{4, 5, 3}, Text: "Too many recipients"},
		{Code: 452, Text: "too many recipients"},
		// RFC 821's code for it, which RFC 5321 asks clients to take as
		// temporary: not a bounce.
		{Code: 552, Enhanced: mta.Enhanced{5, 5, 3}, Text: "Too many recipients"},
		{Code: 552, Text: "Too many recipients"},
	} {
		t.Run(tooMany.Error(), func(t *testing.T) {
			tr := newFakeTransport()
			tr.rcptLimit, tr.tooMany = 2, tooMany
			store, txns, defers := recipientRun(t, 5, nil, tr)
			if len(store.done) != 5 || len(store.failures) != 0 || defers != 0 {
				t.Fatalf("delivered %d, failed %v, deferred %d times; want all 5 delivered in the attempt", len(store.done), store.failures, defers)
			}
			if !slices.Equal(txns, []int{5, 2, 1}) { // sized to what the server took
				t.Errorf("transactions of %v recipients, want [5 2 1]", txns)
			}
			if c, _, _ := tr.stats("x.test"); c != 1 {
				t.Errorf("%d connections, want 1", c)
			}
			for _, r := range store.msgs["m1"].Recipients {
				if r.Attempts > 1 {
					t.Errorf("%s: %d attempts", r.Address, r.Attempts)
				}
			}
		})
	}
}

// Recipients past delivery's own limit per transaction go in further
// transactions of the attempt.
func TestRecipientLimitPerTransaction(t *testing.T) {
	tr := newFakeTransport()
	store, txns, defers := recipientRun(t, 250, func(o *Options) { o.MaxRecipientsPerTransaction = 100 }, tr)
	if len(store.done) != 250 || defers != 0 {
		t.Fatalf("delivered %d, deferred %d times", len(store.done), defers)
	}
	if !slices.Equal(txns, []int{100, 100, 50}) {
		t.Errorf("transactions of %v recipients, want [100 100 50]", txns)
	}
}

// A domain's own limit per transaction applies to its mail.
func TestDomainRecipientLimit(t *testing.T) {
	tr := newFakeTransport()
	store, txns, _ := recipientRun(t, 5, func(o *Options) {
		o.Domains = map[string]DestinationLimits{"x.test": {MaxRecipientsPerTransaction: 2}}
	}, tr)
	if len(store.done) != 5 || !slices.Equal(txns, []int{2, 2, 1}) {
		t.Errorf("delivered %d in transactions of %v recipients, want 5 in [2 2 1]", len(store.done), txns)
	}
}

// A limit reply to the first recipient, which makes no progress, is a
// deferral like any other 4xx: no loop of empty transactions. A 452 that
// is not about the limit (4.2.2, a full mailbox) is not sent again at once.
func TestRecipientRefusalsThatAreNotTheLimit(t *testing.T) {
	t.Run("no progress", func(t *testing.T) {
		tr := newFakeTransport()
		tr.rcptLimit = 1
		tr.replies = func(string) *mta.Reply {
			return &mta.Reply{Code: 452, Enhanced: mta.Enhanced{4, 5, 3}, Text: "Too many recipients"}
		}
		store, txns, defers := recipientRun(t, 3, nil, tr)
		if defers != 1 || len(txns) != 1 || len(store.done) != 0 {
			t.Fatalf("transactions %v, deferred %d times, delivered %d; want one transaction and one deferral", txns, defers, len(store.done))
		}
	})
	t.Run("mailbox full", func(t *testing.T) {
		tr := newFakeTransport()
		tr.replies = func(rcpt string) *mta.Reply {
			if strings.HasPrefix(rcpt, "r1@") {
				return &mta.Reply{Code: 452, Enhanced: mta.Enhanced{4, 2, 2}, Text: "mailbox full"}
			}
			return &mta.Reply{Code: 250, Text: "ok"}
		}
		store, txns, defers := recipientRun(t, 3, nil, tr)
		if defers != 1 || len(txns) != 1 || len(store.done) != 2 {
			t.Fatalf("transactions %v, deferred %d times, delivered %d; want one transaction, 2 delivered, one deferral", txns, defers, len(store.done))
		}
	})
}

// The last attempt of a message, at the end of its lifetime, that
// delivers to some recipients and is deferred by others expires only
// those: the delivered ones are not reported as expired too.
func TestLastAttemptExpiresOnlyTheRecipientsLeft(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.replies = func(rcpt string) *mta.Reply {
		if strings.HasPrefix(rcpt, "later") {
			return &mta.Reply{Code: 451, Text: "try later"}
		}
		return &mta.Reply{Code: 250, Text: "ok"}
	}
	var mu sync.Mutex
	outcomes := map[string][]string{}
	h := start(t, func(o *Options) {
		o.MaxLifetime = 90 * time.Minute
		o.Observe = func(e OutcomeEvent) {
			mu.Lock()
			defer mu.Unlock()
			outcomes[e.Recipient] = append(outcomes[e.Recipient], e.Outcome)
		}
	}, store, tr)
	now := time.Now()
	store.add("old", now.Add(-90*time.Minute), now, "good@x.test", "later@x.test")
	h.s.Submit("old", []string{"x.test"}, mta.PriorityBulk)
	waitFor(t, "expiry", func() bool { _, f := store.counts(); return f == 1 })
	h.stop()
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(outcomes["good@x.test"], []string{"delivered"}) || !slices.Equal(outcomes["later@x.test"], []string{"deferred", "expired"}) {
		t.Errorf("outcomes %v", outcomes)
	}
}
