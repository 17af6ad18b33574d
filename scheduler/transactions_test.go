package scheduler

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtaproject/mta/mta"
)

// observed collects the outcome events by recipient.
type observed struct {
	mu sync.Mutex
	by map[string][]string
}

func (o *observed) fn(e OutcomeEvent) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.by == nil {
		o.by = map[string][]string{}
	}
	o.by[e.Recipient] = append(o.by[e.Recipient], fmt.Sprintf("%s#%d", e.Outcome, e.Attempt))
}

func (o *observed) get(r string) []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.by[r])
}

// A connection found stale between two transactions of one message (no
// reply to the RSET of the second, on a connection that carried a message
// before) leaves the recipients left deferred, once: they are not also
// retried at once on a new connection.
func TestStaleBetweenTransactionsOfAMessageDefersOnce(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.delay["x.test"] = 30 * time.Millisecond
	conns := 0
	tr.sendErr = func(dest string, n int) error {
		// The first connection: m0 (n=1), m1 txn 1 (n=2), m1 txn 2 (n=3) stale.
		if n == 3 && conns == 0 {
			conns++
			return fmt.Errorf("%w: RSET: EOF", ErrStale)
		}
		return nil
	}
	var obs observed
	h := start(t, func(o *Options) {
		o.MaxPerDestination, o.InitialPerDestination = 1, 1
		o.Domains = map[string]DestinationLimits{"x.test": {MaxRecipientsPerTransaction: 2}}
		o.Observe = obs.fn
	}, store, tr)
	now := time.Now()
	store.add("m0", now, now.Add(time.Hour), "a@x.test")
	store.add("m1", now, now.Add(time.Hour), "r0@x.test", "r1@x.test", "r2@x.test")
	h.s.Submit("m0", []string{"x.test"}, mta.PriorityBulk)
	time.Sleep(5 * time.Millisecond)
	h.s.Submit("m1", []string{"x.test"}, mta.PriorityBulk)
	waitFor(t, "m1 settled", func() bool {
		store.mu.Lock()
		defer store.mu.Unlock()
		_, done := store.done["m1 r2@x.test"]
		return done || store.defers[workKey{"m1", "x.test"}] > 0
	})
	time.Sleep(200 * time.Millisecond)
	h.stop()
	store.mu.Lock()
	defer store.mu.Unlock()
	_, delivered := store.done["m1 r2@x.test"]
	defers := store.defers[workKey{"m1", "x.test"}]
	t.Logf("r2 outcomes %v; deferred %d times; delivered %v; events %q", obs.get("r2@x.test"), defers, delivered, store.events)
	if defers > 0 && delivered {
		t.Errorf("r2 was deferred (Store.Defer, attempt counted, backoff) AND delivered at once on a new connection: %v", obs.get("r2@x.test"))
	}
}

// A 421 that would send the mail to another host (ErrOtherHost), in a
// later transaction of a message, defers what is left: a recipient an
// earlier transaction of the attempt deferred (a 450) is recorded once and
// not sent again at once.
func TestOtherHostInALaterTransactionDefersWhatIsLeft(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.replies = func(rcpt string) *mta.Reply {
		if strings.HasPrefix(rcpt, "grey@") {
			return &mta.Reply{Code: 450, Enhanced: mta.Enhanced{4, 7, 1}, Text: "greylisted"}
		}
		return &mta.Reply{Code: 250, Text: "ok"}
	}
	first := true
	tr.sendErr = func(dest string, n int) error {
		if n == 2 && first {
			first = false
			return fmt.Errorf("%w: said at dot: 421 4.3.2 closing", ErrOtherHost)
		}
		return nil
	}
	var obs observed
	h := start(t, func(o *Options) {
		o.Domains = map[string]DestinationLimits{"x.test": {MaxRecipientsPerTransaction: 2}}
		o.Observe = obs.fn
	}, store, tr)
	now := time.Now()
	store.add("m1", now, now.Add(time.Hour), "grey@x.test", "ok1@x.test", "ok2@x.test")
	h.s.Submit("m1", []string{"x.test"}, mta.PriorityBulk)
	waitFor(t, "m1 settled", func() bool {
		store.mu.Lock()
		defer store.mu.Unlock()
		return store.defers[workKey{"m1", "x.test"}] > 0
	})
	h.stop()
	got := obs.get("grey@x.test")
	t.Logf("grey outcomes %v, txns %v", got, tr.txns)
	if len(got) != 1 {
		t.Errorf("grey@ was tried %d times in one attempt (%v): its 450 was reported but not deferred, and the requeue sent it again at once", len(got), got)
	}
}

// pipeTransport is fakeTransport with connections that begin the next
// transaction behind the data as smtpclient does: next is asked unless the
// transaction was full. This one, like the client before the fix, counts
// only a too-many reply after an accepted recipient, so that the
// scheduler's own guard is what the test sees.
type pipeTransport struct{ *fakeTransport }

func (p pipeTransport) Connect(ctx context.Context, r Route) (Conn, error) {
	c, err := p.fakeTransport.Connect(ctx, r)
	if err != nil {
		return nil, err
	}
	return &pipeConn{fakeConn: c.(*fakeConn)}, nil
}

type pipeConn struct {
	*fakeConn
	begun *Envelope
}

func (c *pipeConn) Send(ctx context.Context, env *Envelope, body []byte) ([]*mta.Reply, error) {
	return c.SendThen(ctx, env, body, nil)
}

func (c *pipeConn) SendThen(ctx context.Context, env *Envelope, body []byte, next func() (*Envelope, []byte)) ([]*mta.Reply, error) {
	if c.begun != nil && c.begun != env {
		c.usable = false
		return nil, fmt.Errorf("smtpclient: Send of a message other than the one begun")
	}
	c.begun = nil
	out, err := c.fakeConn.Send(ctx, env, body)
	if err != nil {
		return nil, err
	}
	full, accepted := false, 0
	for _, r := range out {
		if r.Code/100 == 2 {
			accepted++
		} else {
			full = full || accepted > 0 && r.TooManyRecipients()
		}
	}
	if next != nil && !full {
		if e, _ := next(); e != nil {
			c.begun = e
		}
	}
	return out, nil
}

// The next work is taken once per message: when follow took it but could
// not read it (the memory budget spent) and the message then needs another
// transaction (its recipients resent), that transaction does not take
// another and lose the first.
func TestNextWorkIsTakenOncePerMessage(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.replies = func(rcpt string) *mta.Reply {
		if strings.HasPrefix(rcpt, "first@") {
			return &mta.Reply{Code: 452, Enhanced: mta.Enhanced{4, 5, 3}, Text: "Too many recipients"}
		}
		return &mta.Reply{Code: 250, Text: "ok"}
	}
	tr.delay["x.test"] = 20 * time.Millisecond
	h := start(t, func(o *Options) {
		o.MaxPerDestination, o.InitialPerDestination = 1, 1
		o.Memory = mta.NewBudget(150)
		o.Transport = pipeTransport{tr}
	}, store, tr)
	now := time.Now()
	store.add("m1", now, now.Add(time.Hour), "first@x.test", "b@x.test")
	store.add("m2", now, now, "c@x.test")
	store.add("m3", now, now.Add(time.Hour), "d@x.test")
	for _, id := range []string{"m1", "m2", "m3"} {
		store.msgs[id].Size = 100
	}
	h.s.Submit("m1", []string{"x.test"}, mta.PriorityBulk)
	time.Sleep(5 * time.Millisecond)
	h.s.Submit("m2", []string{"x.test"}, mta.PriorityBulk)
	h.s.Submit("m3", []string{"x.test"}, mta.PriorityBulk)
	// first@ is refused as too many each time: deferred; the others arrive.
	want := []string{"m1 b@x.test", "m2 c@x.test", "m3 d@x.test"}
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		store.mu.Lock()
		n := len(store.done)
		store.mu.Unlock()
		if n == len(want) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	h.stop()
	store.mu.Lock()
	defer store.mu.Unlock()
	for _, k := range want {
		if _, ok := store.done[k]; !ok {
			t.Errorf("%s not delivered (delivered %v, txns %v): a work taken by follow was lost", k, store.done, tr.txns)
		}
	}
}

// Work that a closing server sends to another host (ErrOtherHost) gets a
// new connection of its own: it is not handed to another open connection,
// which may be to the same host.
func TestWorkForAnotherHostGetsANewConnection(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.delay["x.test"] = 10 * time.Millisecond
	sends := 0
	tr.sendErr = func(dest string, n int) error {
		// Near the end of the run, when too little is queued for another
		// connection to be opened for it.
		if sends++; sends == 60 {
			return fmt.Errorf("%w: said at mail: 421 4.3.2 closing", ErrOtherHost)
		}
		return nil
	}
	h := start(t, func(o *Options) { o.MaxPerDestination, o.InitialPerDestination = 2, 2 }, store, tr)
	now := time.Now()
	for i := range 70 {
		id := fmt.Sprintf("m%02d", i)
		store.add(id, now, now.Add(time.Hour), "r@x.test")
		h.s.Submit(id, []string{"x.test"}, mta.PriorityBulk)
	}
	waitFor(t, "70 deliveries", func() bool { d, _ := store.counts(); return d == 70 })
	h.stop()
	connects, _, _ := tr.stats("x.test")
	store.mu.Lock()
	defer store.mu.Unlock()
	if len(store.defers) != 0 || connects != 3 {
		t.Errorf("deferrals %v, %d connections; want none, and a third connection for the work of the closing one", store.defers, connects)
	}
}

// A connection failure is recorded with a reply code like any other
// reason, so that the queue's --reply filter and a bounce's Status find
// it: 451 4.4.1 for no connection, 451 4.4.2 for one lost, the server's
// own code when it said something.
func TestConnectionFailuresHaveCodes(t *testing.T) {
	for _, tc := range []struct {
		name                string
		connectErr, sendErr error
		want                string
	}{
		{"refused", errors.New("connect to 192.0.2.1:25: connection refused"), nil, "451 4.4.1 connect to"},
		{"a 421 greeting", fmt.Errorf("mx said at greeting: %w", &mta.Reply{Code: 421, Enhanced: mta.Enhanced{4, 7, 0}, Text: "busy"}), nil, "421 4.7.0 mx said at greeting"},
		{"lost", nil, errors.New("connection reset after the data"), "451 4.4.2 connection failed: connection reset"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store, tr := newMemStore(), newFakeTransport()
			if tc.connectErr != nil {
				tr.connectErr["x.test"] = tc.connectErr
			}
			if tc.sendErr != nil {
				tr.sendErr = func(string, int) error { return tc.sendErr }
			}
			h := start(t, nil, store, tr)
			now := time.Now()
			store.add("m1", now, now.Add(time.Hour), "r@x.test")
			h.s.Submit("m1", []string{"x.test"}, mta.PriorityBulk)
			waitFor(t, "the deferral", func() bool {
				store.mu.Lock()
				defer store.mu.Unlock()
				return store.defers[workKey{"m1", "x.test"}] == 1
			})
			h.stop()
			store.mu.Lock()
			defer store.mu.Unlock()
			if got := store.msgs["m1"].Recipients[0].LastReply; !strings.HasPrefix(got, tc.want) {
				t.Errorf("last reply %q, want it to begin %q", got, tc.want)
			}
		})
	}
}
