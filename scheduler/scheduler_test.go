package scheduler

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/mtaproject/mta/mta"
)

type harness struct {
	store *memStore
	tr    *fakeTransport
	s     *Scheduler
	stop  func()
}

func start(t *testing.T, edit func(*Options), store *memStore, tr *fakeTransport) *harness {
	t.Helper()
	opts := Options{Store: store, Transport: tr, Limits: Limits{MinBackoff: time.Hour, MaxBackoff: 2 * time.Hour, IdleTimeout: time.Minute},
		ScanInterval: 20 * time.Millisecond, Seed: 42}
	if edit != nil {
		edit(&opts)
	}
	s := New(opts)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); s.Run(ctx) }()
	h := &harness{store: store, tr: tr, s: s, stop: func() { cancel(); wg.Wait() }}
	t.Cleanup(h.stop)
	return h
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestConnectionsAreReusedForManyMessages(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	h := start(t, func(o *Options) { o.MaxPerDestination = 3; o.MaxMessagesPerConnection = 50 }, store, tr)
	now := time.Now()
	for i := 0; i < 300; i++ {
		id := fmt.Sprintf("m%03d", i)
		store.add(id, now, now.Add(time.Hour), "r@one.test")
		h.s.Submit(id, []string{"one.test"}, mta.PriorityBulk)
	}
	waitFor(t, "300 deliveries", func() bool { d, _ := store.counts(); return d == 300 })
	connects, sent, maxActive := tr.stats("one.test")
	t.Logf("300 messages over %d connections, at most %d at once", connects, maxActive)
	if sent != 300 || maxActive > 3 {
		t.Fatalf("sent %d, max active %d", sent, maxActive)
	}
	// At most N / limit + concurrency connections.
	if connects > 300/50+3 {
		t.Fatalf("%d connections for 300 messages (limit 50 per connection, 3 at once)", connects)
	}
}

// A domain with its own limits gets them, and only it: another domain
// with the same next hops keeps the defaults.
func TestDomainLimitsApplyToItsMailAlone(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.dests["limited.test"], tr.dests["other.test"] = "shared", "shared"
	tr.delay["shared"] = 2 * time.Millisecond
	h := start(t, func(o *Options) {
		o.MaxPerDestination, o.InitialPerDestination = 6, 6
		o.Domains = map[string]DestinationLimits{"limited.test": {MaxConnections: 2, MaxMessagesPerConnection: 10}}
	}, store, tr)
	now := time.Now()
	for i := 0; i < 200; i++ {
		for _, domain := range []string{"limited.test", "other.test"} {
			id := fmt.Sprintf("%s%03d", domain[:1], i)
			store.add(id, now, now.Add(time.Hour), "r@"+domain)
			h.s.Submit(id, []string{domain}, mta.PriorityBulk)
		}
	}
	sawOwn := false
	waitFor(t, "400 deliveries", func() bool {
		for _, d := range h.s.Destinations() {
			sawOwn = sawOwn || d.Key == "shared limits=2/10"
		}
		d, _ := store.counts()
		return d == 400
	})
	tr.mu.Lock()
	defer tr.mu.Unlock()
	t.Logf("at once: limited %d, other %d; most on one connection: limited %d, other %d",
		tr.mostSending["limited.test"], tr.mostSending["other.test"], tr.mostPerConn["limited.test"], tr.mostPerConn["other.test"])
	if tr.mostSending["limited.test"] > 2 || tr.mostPerConn["limited.test"] > 10 {
		t.Fatalf("limited.test: %d connections at once, %d messages on one (limits 2 and 10)",
			tr.mostSending["limited.test"], tr.mostPerConn["limited.test"])
	}
	if tr.mostSending["other.test"] <= 2 || tr.mostPerConn["other.test"] <= 10 {
		t.Fatalf("other.test got limited.test's limits: %d at once, %d on one connection",
			tr.mostSending["other.test"], tr.mostPerConn["other.test"])
	}
	if !sawOwn {
		t.Fatal("no destination \"shared limits=2/10\" in the status")
	}
}

func TestDeadDestinationCostsOneProbe(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.connectErr["dead.test"] = errRefused
	h := start(t, func(o *Options) { o.MaxPerDestination = 5 }, store, tr)
	now := time.Now()
	for i := 0; i < 100; i++ {
		id := fmt.Sprintf("d%03d", i)
		store.add(id, now, now, "r@dead.test")
		id2 := fmt.Sprintf("a%03d", i)
		store.add(id2, now, now, "r@alive.test")
	}
	waitFor(t, "alive deliveries", func() bool { d, _ := store.counts(); return d == 100 })
	waitFor(t, "dead work postponed", func() bool {
		due, _ := store.Due(time.Now(), 1000, nil)
		return len(due) == 0
	})
	connects, _, _ := tr.stats("dead.test")
	if connects > 5 {
		t.Fatalf("%d connection attempts to a dead destination for 100 messages", connects)
	}
	// Each connection attempt counts as the attempt of the one message
	// that asked for it (recorded, so that the lifetime applies); the
	// rest was postponed to the backoff without an attempt.
	store.mu.Lock()
	attempted := map[workKey]bool{}
	for k, n := range store.defers {
		if k.domain == "dead.test" && n > 0 {
			attempted[workKey{k.id, k.domain}] = true
		}
	}
	later := 0
	for k, t0 := range store.due {
		if k.domain == "dead.test" && !attempted[workKey{k.id, k.domain}] && t0.After(now.Add(50*time.Minute)) {
			later++
		}
	}
	store.mu.Unlock()
	if len(attempted) != connects {
		t.Fatalf("%d messages deferred as attempted for %d connection attempts", len(attempted), connects)
	}
	if later+len(attempted) != 100 {
		t.Fatalf("%d of 100 dead-destination items postponed to the backoff, %d attempted", later, len(attempted))
	}
	_ = h
}

func TestOutcomesPerRecipient(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.replies = func(rcpt string) *mta.Reply {
		switch {
		case strings.HasPrefix(rcpt, "bad"):
			return &mta.Reply{Code: 550, Enhanced: mta.Enhanced{5, 1, 1}, Text: "no such user"}
		case strings.HasPrefix(rcpt, "later"):
			return &mta.Reply{Code: 451, Enhanced: mta.Enhanced{4, 7, 1}, Text: "greylisted"}
		}
		return &mta.Reply{Code: 250, Text: "ok"}
	}
	h := start(t, nil, store, tr)
	now := time.Now()
	store.add("m1", now, now.Add(time.Hour), "good@x.test", "bad@x.test", "later@x.test")
	h.s.Submit("m1", []string{"x.test"}, mta.PriorityBulk)
	waitFor(t, "outcomes", func() bool {
		store.mu.Lock()
		defer store.mu.Unlock()
		return store.defers[workKey{"m1", "x.test"}] == 1
	})
	store.mu.Lock()
	defer store.mu.Unlock()
	if store.done["m1 good@x.test"] == "" || !strings.HasPrefix(store.failures["m1 bad@x.test"], "550 5.1.1") {
		t.Fatalf("done %v failures %v", store.done, store.failures)
	}
	m := store.msgs["m1"]
	if !m.Recipients[2].Queued || m.Recipients[2].Attempts != 1 {
		t.Fatalf("deferred recipient %+v", m.Recipients[2])
	}
	if due := store.due[workKey{"m1", "x.test"}]; due.Sub(now) < 47*time.Minute || due.Sub(now) > 73*time.Minute {
		t.Fatalf("retry due in %v, want an hour ±20%%", due.Sub(now))
	}
}

// A retry that would come after the end of the queue lifetime is made at
// its end instead: the mail is tried until then, as the delay notice's
// Will-Retry-Until promises, not given up a backoff early.
func TestLastRetryIsAtTheEndOfTheLifetime(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.replies = func(string) *mta.Reply { return &mta.Reply{Code: 451, Text: "try later"} }
	h := start(t, func(o *Options) { o.MaxLifetime = 90 * time.Minute }, store, tr) // backoff an hour or more
	now := time.Now()
	received := now.Add(-time.Hour)
	store.add("m", received, now, "r@x.test")
	h.s.Submit("m", []string{"x.test"}, mta.PriorityBulk)
	waitFor(t, "the deferral", func() bool {
		store.mu.Lock()
		defer store.mu.Unlock()
		return store.defers[workKey{"m", "x.test"}] == 1
	})
	store.mu.Lock()
	defer store.mu.Unlock()
	if len(store.failures) != 0 {
		t.Fatalf("failed half an hour before the end of its lifetime: %v", store.failures)
	}
	if due, end := store.due[workKey{"m", "x.test"}], received.Add(90*time.Minute); !due.Equal(end) {
		t.Fatalf("next attempt at %v, want the end of the lifetime, %v", due, end)
	}
}

// Mail that comes due only well after its lifetime (a long stop, a deep
// backlog) expires without another attempt, and its bounce quotes the
// last attempt's reply, not "no attempt made".
func TestLateExpiryQuotesTheLastReply(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	h := start(t, func(o *Options) { o.MaxLifetime = 90 * time.Minute }, store, tr)
	now := time.Now()
	store.add("late", now.Add(-2*time.Hour), now, "r@x.test")
	store.mu.Lock()
	store.msgs["late"].Recipients[0].Attempts = 3
	store.msgs["late"].Recipients[0].LastReply = "451 4.7.1 greylisted, try later"
	store.mu.Unlock()
	h.s.Submit("late", []string{"x.test"}, mta.PriorityBulk)
	waitFor(t, "expiry", func() bool { _, f := store.counts(); return f == 1 })
	store.mu.Lock()
	defer store.mu.Unlock()
	if got := store.failures["late r@x.test"]; !strings.HasPrefix(got, "550 5.4.7 ") || !strings.Contains(got, "greylisted") {
		t.Fatalf("expiry reply %q", got)
	}
	if _, sent, _ := tr.stats("x.test"); sent != 0 {
		t.Fatal("an attempt was made past the lifetime")
	}
}

func TestExpiredMessageFails(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.replies = func(string) *mta.Reply { return &mta.Reply{Code: 451, Text: "try later"} }
	h := start(t, func(o *Options) { o.MaxLifetime = 90 * time.Minute }, store, tr)
	now := time.Now()
	store.add("old", now.Add(-90*time.Minute), now.Add(time.Hour), "r@x.test") // its last attempt, at the end of its lifetime
	h.s.Submit("old", []string{"x.test"}, mta.PriorityBulk)
	waitFor(t, "expiry", func() bool { _, f := store.counts(); return f == 1 })
	store.mu.Lock()
	defer store.mu.Unlock()
	if got := store.failures["old r@x.test"]; !strings.HasPrefix(got, "550 5.4.7 Delivery time expired") || !strings.Contains(got, "try later") {
		t.Fatalf("expiry reply %q", got)
	}
}

func TestRoutingErrors(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.routeErr["nx.test"] = &mta.Reply{Code: 550, Enhanced: mta.Enhanced{5, 1, 2}, Text: "no such domain"}
	tr.routeErr["flaky.test"] = &mta.Reply{Code: 451, Enhanced: mta.Enhanced{4, 4, 3}, Text: "dns timeout"}
	h := start(t, nil, store, tr)
	now := time.Now()
	store.add("m1", now, now.Add(time.Hour), "a@nx.test", "b@flaky.test", "c@ok.test")
	h.s.Submit("m1", []string{"nx.test", "flaky.test", "ok.test"}, mta.PriorityBulk)
	waitFor(t, "outcomes", func() bool {
		store.mu.Lock()
		defer store.mu.Unlock()
		return len(store.failures) == 1 && len(store.done) == 1 && store.defers[workKey{"m1", "flaky.test"}] == 1
	})
}

func TestSlowDestinationDoesNotStarveOthers(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.delay["slow.test"] = 20 * time.Millisecond
	h := start(t, func(o *Options) { o.MaxConnections = 2; o.MaxPerDestination = 2 }, store, tr)
	now := time.Now()
	for i := 0; i < 400; i++ {
		id := fmt.Sprintf("s%03d", i)
		store.add(id, now, now.Add(time.Hour), "r@slow.test")
		h.s.Submit(id, []string{"slow.test"}, mta.PriorityBulk)
	}
	time.Sleep(50 * time.Millisecond) // slow.test holds both global slots
	for i := 0; i < 20; i++ {
		id := fmt.Sprintf("f%03d", i)
		store.add(id, now, now.Add(time.Hour), "r@fast.test")
		h.s.Submit(id, []string{"fast.test"}, mta.PriorityBulk)
	}
	start := time.Now()
	waitFor(t, "fast deliveries", func() bool {
		_, sent, _ := tr.stats("fast.test")
		return sent == 20
	})
	_, slowSent, _ := tr.stats("slow.test")
	t.Logf("fast destination served after %v, with %d of 400 slow messages sent", time.Since(start), slowSent)
	if slowSent >= 400 {
		t.Fatal("the fast destination waited for the whole slow queue")
	}
}

func TestDropForgetsQueuedWork(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.delay["x.test"] = 30 * time.Millisecond
	h := start(t, func(o *Options) { o.MaxPerDestination = 1 }, store, tr)
	now := time.Now()
	for i := 0; i < 5; i++ {
		id := fmt.Sprintf("m%d", i)
		store.add(id, now, now.Add(time.Hour), "r@x.test")
		h.s.Submit(id, []string{"x.test"}, mta.PriorityBulk)
	}
	waitFor(t, "all five in the window", func() bool { return h.s.windowSize.Load() == 5 })
	h.s.Drop("m4")
	waitFor(t, "four deliveries", func() bool { d, _ := store.counts(); return d == 4 })
	time.Sleep(100 * time.Millisecond)
	store.mu.Lock()
	defer store.mu.Unlock()
	if _, ok := store.done["m4 r@x.test"]; ok || !store.msgs["m4"].Recipients[0].Queued {
		t.Fatalf("dropped message was delivered")
	}
}

// TestWorkPastItsLeaseIsRenewedNotRescanned: a slow destination keeps work
// in memory longer than its lease; the scan renews those leases instead of
// finding the same entries again on every turn of the loop.
func TestWorkPastItsLeaseIsRenewedNotRescanned(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.delay["slow.test"] = time.Millisecond
	const n = 6000 // more than one scan's limit (5000)
	h := start(t, func(o *Options) { o.MaxPerDestination = 1; o.Lease = 50 * time.Millisecond }, store, tr)
	now := time.Now()
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("s%04d", i)
		store.add(id, now, now.Add(50*time.Millisecond), "r@slow.test")
	}
	for i := 0; i < n; i++ {
		h.s.Submit(fmt.Sprintf("s%04d", i), []string{"slow.test"}, mta.PriorityBulk)
	}
	waitFor(t, "all in the window", func() bool { return h.s.windowSize.Load() >= n-100 })
	time.Sleep(100 * time.Millisecond) // the leases run out
	before := store.dueCalls.Load()
	time.Sleep(500 * time.Millisecond)
	calls := store.dueCalls.Load() - before
	t.Logf("%d scans in 500 ms with %d messages held past their lease", calls, n)
	if calls > 60 { // 25 ticks of 20 ms, plus a few
		t.Fatalf("%d scans in 500 ms: the scheduler keeps rescanning work it already holds", calls)
	}
}

// TestConcurrencyWindowGrowsFromTheInitialOne: a destination starts with
// InitialPerDestination connections and earns one more per good new
// connection, up to MaxPerDestination.
func TestConcurrencyWindowGrowsFromTheInitialOne(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.delay["grow.test"] = 5 * time.Millisecond
	tr.connectDelay = 10 * time.Millisecond
	h := start(t, func(o *Options) { o.InitialPerDestination = 1; o.MaxPerDestination = 4 }, store, tr)
	now := time.Now()
	// Enough work that each connection has more than queuedPerConnection
	// waiting while the window grows.
	for i := 0; i < 1000; i++ {
		id := fmt.Sprintf("g%04d", i)
		store.add(id, now, now.Add(time.Hour), "r@grow.test")
		h.s.Submit(id, []string{"grow.test"}, mta.PriorityBulk)
	}
	waitFor(t, "1000 deliveries", func() bool { d, _ := store.counts(); return d == 1000 })
	connects, _, maxActive := tr.stats("grow.test")
	t.Logf("%d connections, at most %d at once", connects, maxActive)
	if maxActive != 4 {
		t.Fatalf("at most %d connections at once, want the window to reach 4 and stop there", maxActive)
	}
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if tr.maxConnecting != 1 {
		t.Fatalf("%d connections were being opened at once; from a window of 1 each must wait for the last", tr.maxConnecting)
	}
}

// TestScanSharesTheWindow: retries due behind a deep backlog are not kept
// out of the window by it: the scan takes each domain only up to its share.
func TestScanSharesTheWindow(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.delay["deep.test"] = 50 * time.Millisecond // slow: its work piles up in the window
	past := time.Now().Add(-time.Hour)
	for i := 0; i < 500; i++ {
		store.add(fmt.Sprintf("d%03d", i), past, past, "r@deep.test")
	}
	later := past.Add(time.Minute) // due after the whole backlog
	for i := 0; i < 10; i++ {
		store.add(fmt.Sprintf("o%03d", i), later, later, "r@other.test")
	}
	start(t, func(o *Options) { o.WindowSize = 100; o.MaxPerDestination = 2; o.InitialPerDestination = 2 }, store, tr)
	begin := time.Now()
	waitFor(t, "the other domain's due work", func() bool {
		_, sent, _ := tr.stats("other.test")
		return sent == 10
	})
	if took := time.Since(begin); took > 2*time.Second {
		t.Fatalf("due work behind a deep backlog took %v", took)
	}
	if _, sent, _ := tr.stats("deep.test"); sent > 250 {
		t.Fatalf("the deep backlog was mostly delivered first (%d of 500)", sent)
	}
}

// TestFreshWorkOverflowsAndIsNotLost: fresh work beyond its domain's share
// waits in memory and is delivered as room frees, without the scan.
func TestFreshWorkOverflowsAndIsNotLost(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	h := start(t, func(o *Options) { o.WindowSize = 40; o.ScanInterval = time.Hour }, store, tr)
	now := time.Now()
	far := now.Add(time.Hour) // the due scan would not find them for an hour
	// 150: three times the window, within the overflow's bound (4x).
	for i := 0; i < 150; i++ {
		id := fmt.Sprintf("f%03d", i)
		store.add(id, now, far, "r@bulk.test")
		h.s.Submit(id, []string{"bulk.test"}, mta.PriorityBulk)
	}
	waitFor(t, "all fresh work delivered", func() bool { d, _ := store.counts(); return d == 150 })
	if got := testutil.ToFloat64(h.s.m.freshToScan); got != 0 {
		t.Fatalf("%v fresh items left to the scan", got)
	}
	// Past the bound, what is left to the scan is counted, never lost silently.
	for i := 0; i < 400; i++ {
		id := fmt.Sprintf("g%03d", i)
		store.add(id, now, far, "r@slow.test")
		h.s.Submit(id, []string{"slow.test"}, mta.PriorityBulk)
	}
	waitFor(t, "the rest counted", func() bool {
		d, _ := store.counts()
		return float64(d-150)+testutil.ToFloat64(h.s.m.freshToScan)+testutil.ToFloat64(h.s.m.submitDropped) == 400
	})
}

// TestEndBackoffs: after a flush a backed-off destination is tried at once,
// not at the end of its backoff.
func TestEndBackoffs(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.mu.Lock()
	tr.connectErr["back.test"] = errRefused
	tr.mu.Unlock()
	h := start(t, nil, store, tr) // MinBackoff: an hour
	now := time.Now()
	store.add("b1", now, now, "r@back.test")
	waitFor(t, "the failed attempt recorded", func() bool {
		store.mu.Lock()
		defer store.mu.Unlock()
		return store.defers[workKey{"b1", "back.test"}] > 0
	})
	tr.mu.Lock()
	delete(tr.connectErr, "back.test")
	tr.mu.Unlock()
	waitFor(t, "the destination backed off", func() bool { return h.s.backedOff.Load() == 1 })
	h.s.EndBackoffs() // what the admin flush does: end the backoffs, then
	store.mu.Lock()
	for k := range store.due { // make everything due now, as Spool.Flush does
		store.due[k] = time.Now()
	}
	store.mu.Unlock()
	h.s.Kick()
	waitFor(t, "delivery after the flush", func() bool { d, _ := store.counts(); return d == 1 })
}

// TestMessagesPerConnectionCountsWholeLives: a connection reused by several
// workers is observed once, with all its messages, when it closes.
func TestMessagesPerConnectionCountsWholeLives(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	h := start(t, func(o *Options) { o.MaxPerDestination = 1; o.InitialPerDestination = 1; o.IdleTimeout = time.Hour }, store, tr)
	now := time.Now()
	for i := 0; i < 5; i++ { // one at a time: each worker session parks the connection
		id := fmt.Sprintf("m%d", i)
		// Due later, as the spool's fresh lease makes it: a scan that found
		// it due now could hand it out a second time (a flake under load).
		store.add(id, now, now.Add(time.Hour), "r@one.test")
		h.s.Submit(id, []string{"one.test"}, mta.PriorityBulk)
		waitFor(t, "delivery", func() bool { d, _ := store.counts(); return d == i+1 })
		waitFor(t, "parked", func() bool { return h.s.cache.Idle() == 1 })
	}
	h.stop() // closes the cached connection
	var m dto.Metric
	if err := h.s.m.messagesPerConn.Write(&m); err != nil {
		t.Fatal(err)
	}
	if c, sum := m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum(); c != 1 || sum != 5 {
		t.Fatalf("messages per connection: %d observations summing to %v, want 1 of 5", c, sum)
	}
}

// TestSetLimitsWhileRunning: a raised per-destination limit is used at
// once by a busy destination; a lowered one ends the connections over it
// after their current message, and no more than it are opened again.
func TestSetLimitsWhileRunning(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.delay["tune.test"] = 2 * time.Millisecond
	h := start(t, func(o *Options) { o.MaxPerDestination = 1; o.InitialPerDestination = 1 }, store, tr)
	now := time.Now()
	const total = 3000
	for i := 0; i < total; i++ {
		id := fmt.Sprintf("t%04d", i)
		store.add(id, now, now, "r@tune.test")
		h.s.Submit(id, []string{"tune.test"}, mta.PriorityBulk)
	}
	delivered := func() int { d, _ := store.counts(); return d }
	waitFor(t, "deliveries at the first limit", func() bool { return delivered() >= 50 })
	if _, _, peak := tr.stats("tune.test"); peak != 1 {
		t.Fatalf("%d connections at once under a limit of 1", peak)
	}
	h.s.SetLimits(Limits{MaxPerDestination: 4, InitialPerDestination: 4, MinBackoff: time.Hour, MaxBackoff: 2 * time.Hour, IdleTimeout: time.Minute})
	waitFor(t, "4 connections after the limit was raised", func() bool { _, _, peak := tr.stats("tune.test"); return peak == 4 })

	h.s.SetLimits(Limits{MaxPerDestination: 1, InitialPerDestination: 1, MinBackoff: time.Hour, MaxBackoff: 2 * time.Hour, IdleTimeout: time.Minute})
	active := func() int { tr.mu.Lock(); defer tr.mu.Unlock(); return tr.active["tune.test"] }
	waitFor(t, "the connections over the lowered limit to end", func() bool { return active() <= 1 })
	before := delivered()
	if before > total-100 {
		t.Fatalf("the connections over the lowered limit ended only when the queue was empty (%d of %d delivered)", before, total)
	}
	tr.mu.Lock()
	tr.maxActive["tune.test"] = tr.active["tune.test"] // count afresh from here
	tr.mu.Unlock()
	waitFor(t, "deliveries at the lowered limit", func() bool { return delivered() >= before+100 })
	if _, _, peak := tr.stats("tune.test"); peak > 1 {
		t.Fatalf("%d connections at once after the limit was lowered to 1", peak)
	}
}

// TestTransactionalAheadOfBulk: with 20,000 bulk messages queued for a
// busy destination (the window full of them), a transactional message to
// the same destination is delivered within a second, long before the
// backlog is.
func TestTransactionalAheadOfBulk(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.delay["lane.test"] = time.Millisecond
	h := start(t, func(o *Options) { o.MaxPerDestination = 2; o.InitialPerDestination = 2 }, store, tr)
	now := time.Now()
	const backlog = 20000
	for i := 0; i < backlog; i++ {
		id := fmt.Sprintf("b%05d", i)
		// Due later, as the spool's fresh lease makes it: the work comes
		// by Submit, as fresh mail does, and the scans stay cheap.
		store.add(id, now, now.Add(time.Hour), "r@lane.test")
		h.s.Submit(id, []string{"lane.test"}, mta.PriorityBulk)
		if i%2000 == 1999 {
			time.Sleep(20 * time.Millisecond) // let the loop take them in: Submit drops what does not fit its channel
		}
	}
	delivered := func() int { d, _ := store.counts(); return d }
	waitFor(t, "the backlog to start", func() bool { return delivered() > 20 })
	store.add("urgent", time.Now(), time.Now().Add(time.Hour), "reset@lane.test") // due later, as the spool's fresh lease makes it
	sent := time.Now()
	h.s.Submit("urgent", []string{"lane.test"}, mta.PriorityTransactional)
	done := func() bool {
		store.mu.Lock()
		defer store.mu.Unlock()
		_, ok := store.done["urgent reset@lane.test"]
		return ok
	}
	waitFor(t, "the transactional message", done)
	took, behind := time.Since(sent), backlog-delivered()
	t.Logf("transactional message delivered after %v with %d bulk messages still queued", took, behind)
	if took > time.Second {
		t.Errorf("the transactional message took %v behind a bulk backlog", took)
	}
	if behind < backlog/2 {
		t.Errorf("only %d bulk messages were still queued: the test did not hold a backlog", behind)
	}
}

// TestTransactionalRetryKeepsLane: work the scan finds (a retry, or after
// a restart) keeps its lane: a transactional message due behind 3,000 bulk
// ones for the same destination is delivered before most of them.
func TestTransactionalRetryKeepsLane(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.delay["lane.test"] = time.Millisecond
	now := time.Now()
	const backlog = 3000
	for i := 0; i < backlog; i++ {
		store.add(fmt.Sprintf("b%05d", i), now, now, "r@lane.test")
	}
	store.add("z-urgent", now, now, "reset@lane.test") // sorts last among equal due times
	store.mu.Lock()
	store.msgs["z-urgent"].Priority = mta.PriorityTransactional
	store.mu.Unlock()
	start(t, func(o *Options) { o.MaxPerDestination = 2; o.InitialPerDestination = 2 }, store, tr)
	done := func() bool {
		store.mu.Lock()
		defer store.mu.Unlock()
		_, ok := store.done["z-urgent reset@lane.test"]
		return ok
	}
	waitFor(t, "the transactional retry", done)
	if d, _ := store.counts(); d > backlog/3 { // in arrival order it would be the last
		t.Errorf("the transactional retry came after %d of %d bulk messages", d-1, backlog)
	}
}

// TestBulkRunKeepsConnectionsFull: 5,000 messages to one destination (20
// connections allowed, 250 messages each: the ratio of 20,000 at 1,000)
// go over at least 90 % of the limit per connection on average: a
// connection is added only when the open ones have more work waiting than
// they can take, so the tail of the run is not spread over new
// connections carrying a handful each.
func TestBulkRunKeepsConnectionsFull(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.delay["bulk.test"] = 100 * time.Microsecond
	h := start(t, func(o *Options) { o.MaxMessagesPerConnection = 250 }, store, tr)
	now := time.Now()
	const n = 5000
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("m%05d", i)
		store.add(id, now, now.Add(2*time.Second), "r@bulk.test") // the scan finds any Submit dropped
		h.s.Submit(id, []string{"bulk.test"}, mta.PriorityBulk)
		if i%1000 == 999 {
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitFor(t, "every delivery", func() bool { d, _ := store.counts(); return d == n })
	checkFull(t, tr, "bulk.test", n, 250)
}

// checkFull fails t unless the n messages to dest went over connections
// that carried at least 90 % of limit each on average.
func checkFull(t *testing.T, tr *fakeTransport, dest string, n, limit int) {
	t.Helper()
	connects, _, peak := tr.stats(dest)
	per := float64(n) / float64(connects)
	t.Logf("%d messages over %d connections (%d at once): %.0f per connection", n, connects, peak, per)
	if want := float64(limit) * 0.9; per < want {
		t.Errorf("%.0f messages per connection, want at least %.0f (90 %% of the limit)", per, want)
	}
}

// TestBurstsKeepConnectionsFull: a bulk run that arrives in bursts, so
// that the queue empties between them and the connections are parked and
// taken again many times, still averages at least 90 % of the message
// limit per connection. The connections a big burst opened are not left
// half used while the few taken for each small burst reach the limit and
// are replaced.
func TestBurstsKeepConnectionsFull(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.delay["bulk.test"] = 50 * time.Microsecond
	h := start(t, func(o *Options) { o.MaxMessagesPerConnection = 500 }, store, tr)
	now := time.Now()
	const n = 5000
	submitted := 0
	for burst := 0; submitted < n; burst++ {
		size := 40 // mostly small bursts, that one or two connections take
		if burst%10 == 0 {
			size = 600 // and now and then one that needs several
		}
		for i := 0; i < size && submitted < n; i++ {
			id := fmt.Sprintf("m%05d", submitted)
			store.add(id, now, now.Add(2*time.Second), "r@bulk.test")
			h.s.Submit(id, []string{"bulk.test"}, mta.PriorityBulk)
			submitted++
		}
		waitFor(t, "the burst's deliveries", func() bool { d, _ := store.counts(); return d == submitted })
		time.Sleep(time.Millisecond) // the workers park their connections
	}
	checkFull(t, tr, "bulk.test", n, 500)
}

// TestResumeThenFlushSendsAtOnce: an operator resumes a suspended domain
// and flushes the queue (what `mta dest resume` does). The mail postponed
// while the domain was suspended goes at once, even when writing those
// postponements was still under way at the resume: the resume waits for
// the write, so that the flush after it finds them. Before, the write
// could land after the flush and put the mail back a minute (the
// suspension's recheck) into the future.
func TestResumeThenFlushSendsAtOnce(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	started := make(chan struct{})
	var once sync.Once
	store.onLease = func(items []Due) {
		if len(items) > 0 && items[0].Reply != "" { // a postponement
			once.Do(func() { close(started) })
			time.Sleep(100 * time.Millisecond) // a slow disk
		}
	}
	// The race, made certain: a scan after the flush waits until the
	// write under way has landed. (No periodic scan: only kicks scan.)
	var flushed atomic.Bool
	store.onDue = func() {
		for flushed.Load() && store.postponed.Load() == 0 {
			time.Sleep(time.Millisecond)
		}
	}
	h := start(t, func(o *Options) { o.ScanInterval = time.Hour }, store, tr)
	h.s.Suspend("held.test", time.Hour)
	now := time.Now()
	const n = 20
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("h%02d", i)
		store.add(id, now, now.Add(time.Minute), "r@held.test") // leased at acceptance, as fresh mail is
		h.s.Submit(id, []string{"held.test"}, mta.PriorityBulk)
	}
	select {
	case <-started:
	case <-time.After(5 * time.Second):
		t.Fatal("the suspended domain's mail was not postponed")
	}
	h.s.Resume("held.test")
	store.flush(time.Now())
	flushed.Store(true)
	h.s.Kick()
	deadline := time.Now().Add(5 * time.Second)
	for {
		d, _ := store.counts()
		if d == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d delivered 5 s after the resume and flush: the rest wait for the suspension's recheck", d, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestResumeDoesNotWaitForOthersPostponements: while another suspended
// domain keeps getting mail, postponements are written without a pause;
// Resume waits for the batches that hold its own domain's, not for the
// stream to stop (which would take its whole 5 s bound).
func TestResumeDoesNotWaitForOthersPostponements(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	store.onLease = func(items []Due) {
		if len(items) > 0 && items[0].Reply != "" {
			time.Sleep(20 * time.Millisecond) // a slow disk
		}
	}
	h := start(t, nil, store, tr)
	h.s.Suspend("held.test", time.Hour)
	h.s.Suspend("other.test", time.Hour)
	now := time.Now()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the other domain's stream
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
			id := fmt.Sprintf("o%05d", i)
			store.add(id, now, now.Add(time.Minute), "r@other.test")
			h.s.Submit(id, []string{"other.test"}, mta.PriorityBulk)
		}
	}()
	defer func() { close(stop); wg.Wait() }()
	for i := 0; i < 10; i++ {
		id := fmt.Sprintf("h%02d", i)
		store.add(id, now, now.Add(time.Minute), "r@held.test")
		h.s.Submit(id, []string{"held.test"}, mta.PriorityBulk)
	}
	time.Sleep(100 * time.Millisecond) // postponing, batch after batch
	began := time.Now()
	h.s.Resume("held.test")
	if took := time.Since(began); took > 2*time.Second {
		t.Fatalf("Resume took %v: it waited for the other domain's postponements too", took)
	}
}

// TestSuspendedDomainThatDoesNotResolveWaits: a suspended domain's mail
// waits, whatever its routing says meanwhile. A domain that does not
// resolve (a DNS migration gone wrong is a reason to suspend it) neither
// fails nor defers its mail with an attempt; after the resume, with DNS
// mended, it is delivered.
func TestSuspendedDomainThatDoesNotResolveWaits(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.routeErr["moving.test"] = &mta.Reply{Code: 550, Enhanced: mta.Enhanced{5, 1, 2}, Text: "no such domain"}
	h := start(t, func(o *Options) { o.ScanInterval = time.Hour }, store, tr)
	h.s.Suspend("moving.test", time.Hour)
	now := time.Now()
	store.add("m1", now, now.Add(time.Minute), "r@moving.test")
	h.s.Submit("m1", []string{"moving.test"}, mta.PriorityBulk)
	waitFor(t, "the mail to be postponed", func() bool { return store.postponed.Load() > 0 })
	if _, failed := store.counts(); failed != 0 {
		t.Fatalf("a suspended domain's mail failed on its routing (%d recipients)", failed)
	}
	tr.mu.Lock()
	delete(tr.routeErr, "moving.test")
	tr.mu.Unlock()
	h.s.Resume("moving.test")
	store.flush(time.Now())
	h.s.Kick()
	waitFor(t, "delivery after the resume", func() bool { d, _ := store.counts(); return d == 1 })
}

// TestEveryAttemptGetsItsOwnBody: bodies are read into reused buffers;
// with many connections at once and bodies on both sides of the largest
// buffer kept, each Send still gets exactly its own message's bytes.
func TestEveryAttemptGetsItsOwnBody(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	store.body = bigBody
	var wrong atomic.Int64
	tr.onSend = func(env *Envelope, body []byte) {
		if string(body) != bigBody(env.ID) {
			wrong.Add(1)
		}
	}
	h := start(t, func(o *Options) { o.MaxPerDestination = 4; o.InitialPerDestination = 4 }, store, tr)
	now := time.Now()
	const total = 400
	for i := 0; i < total; i++ {
		id := fmt.Sprintf("b%03d", i)
		domain := fmt.Sprintf("d%d.test", i%4)
		store.add(id, now, now.Add(time.Hour), "r@"+domain)
		h.s.Submit(id, []string{domain}, mta.PriorityBulk)
	}
	waitFor(t, "every delivery", func() bool { d, _ := store.counts(); return d == total })
	if n := wrong.Load(); n != 0 {
		t.Fatalf("%d of %d attempts sent another message's body", n, total)
	}
}

// bigBody is a body whose subject names message id, and whose length (up
// to 1.5 MiB, past the largest pooled buffer) depends on it.
func bigBody(id string) string {
	h := 0
	for _, c := range id {
		h = h*31 + int(c)
	}
	return "Subject: " + id + "\r\n\r\n" + strings.Repeat("x", h&0xffff*24) + "\r\n"
}

// TestSlowScanDoesNotHoldUpDelivery: while the lease of a scan's batch is
// being written (slow with a deep queue read from Pebble's tables), fresh
// mail for another destination is delivered and the loop answers status
// requests. Before, the loop wrote the lease itself, and every worker,
// every fresh message and every /metrics scrape waited for it.
func TestSlowScanDoesNotHoldUpDelivery(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	now := time.Now()
	for i := 0; i < 50; i++ {
		store.add(fmt.Sprintf("q%02d", i), now, now, "r@deep.test")
	}
	leasing, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	store.onLease = func(items []Due) {
		if len(items) > 0 && items[0].Reply == "" && items[0].ID[0] == 'q' {
			once.Do(func() { close(leasing); <-release })
		}
	}
	var released sync.Once
	free := func() { released.Do(func() { close(release) }) }
	defer free()
	h := start(t, nil, store, tr)
	select {
	case <-leasing:
	case <-time.After(5 * time.Second):
		t.Fatal("the scan did not lease the due work")
	}
	store.add("fresh", now, now.Add(time.Hour), "r@fresh.test")
	h.s.Submit("fresh", []string{"fresh.test"}, mta.PriorityTransactional)
	statusDone := make(chan struct{})
	go func() { h.s.Destinations(); close(statusDone) }()
	deadline := time.After(5 * time.Second)
	for delivered := false; !delivered; {
		select {
		case <-deadline:
			t.Fatal("fresh mail was not delivered while a scan's lease was being written")
		case <-time.After(5 * time.Millisecond):
		}
		_, sent, _ := tr.stats("fresh.test")
		delivered = sent == 1
	}
	select {
	case <-statusDone:
	case <-time.After(5 * time.Second):
		t.Fatal("Destinations did not answer while a scan's lease was being written")
	}
	free()
	waitFor(t, "the scanned work delivered", func() bool { d, _ := store.counts(); return d == 51 })
}

// A reload that lowers a domain's own connection limit holds for its mail
// already queued, not only for what comes after: the queued work moves to
// the destination with the new limits.
func TestReloadedDomainLimitsApplyToQueuedWork(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.delay["x.test"] = 5 * time.Millisecond
	lim := func(conns int) Limits {
		return Limits{MinBackoff: time.Hour, MaxBackoff: 2 * time.Hour, IdleTimeout: time.Minute, MaxPerDestination: 8, InitialPerDestination: 8,
			Domains: map[string]DestinationLimits{"x.test": {MaxConnections: conns}}}
	}
	h := start(t, func(o *Options) { o.Limits = lim(4) }, store, tr)
	now := time.Now()
	for i := 0; i < 300; i++ {
		id := fmt.Sprintf("m%03d", i)
		store.add(id, now, now.Add(time.Hour), "r@x.test")
		h.s.Submit(id, []string{"x.test"}, mta.PriorityBulk)
	}
	waitFor(t, "the first deliveries", func() bool { d, _ := store.counts(); return d >= 20 })
	tr.mu.Lock()
	before := tr.mostSending["x.test"]
	tr.mu.Unlock()
	h.s.SetLimits(lim(1))
	time.Sleep(50 * time.Millisecond) // the connections' messages in flight finish
	tr.mu.Lock()
	tr.mostSending["x.test"] = tr.sending["x.test"]
	tr.mu.Unlock()
	waitFor(t, "300 deliveries", func() bool { d, _ := store.counts(); return d == 300 })
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if before < 2 || tr.mostSending["x.test"] > 1 {
		t.Fatalf("%d connections at once before the reload, %d after it lowered the limit to 1", before, tr.mostSending["x.test"])
	}
}

// The configuration names an internationalized domain by its A-labels;
// mail to its U-label form (SMTPUTF8) gets its limits too.
func TestDomainLimitsOfAnInternationalizedDomain(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.dests["bücher.example"] = "idn"
	tr.delay["idn"] = 20 * time.Millisecond
	h := start(t, func(o *Options) {
		o.Domains = map[string]DestinationLimits{"xn--bcher-kva.example": {MaxConnections: 1}}
	}, store, tr)
	now := time.Now()
	store.add("u1", now, now.Add(time.Hour), "r@bücher.example")
	h.s.Submit("u1", []string{"bücher.example"}, mta.PriorityBulk)
	waitFor(t, "its destination", func() bool {
		for _, d := range h.s.Destinations() {
			if d.Key == "idn limits=1/0" {
				return true
			}
		}
		return false
	})
}

// A receiver that takes one connection at a time refuses the others; the
// one open keeps delivering, so that is its limit, not an outage: the
// destination is not backed off (which postponed all its mail), the
// window shrinks, and no message is charged an attempt for a refused
// extra connection.
func TestRefusedExtraConnectionIsNotAnOutage(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.maxConns = map[string]int{"x.test": 1}
	tr.delay["x.test"] = time.Millisecond
	h := start(t, func(o *Options) { o.InitialPerDestination, o.MaxPerDestination = 4, 4 }, store, tr) // backoff an hour
	now := time.Now()
	for i := 0; i < 400; i++ {
		id := fmt.Sprintf("m%03d", i)
		store.add(id, now, now.Add(time.Hour), "r@x.test")
		h.s.Submit(id, []string{"x.test"}, mta.PriorityBulk)
	}
	waitFor(t, "400 deliveries", func() bool { d, _ := store.counts(); return d == 400 })
	store.mu.Lock()
	defer store.mu.Unlock()
	deferred := 0
	for _, n := range store.defers {
		deferred += n
	}
	if deferred != 0 {
		t.Fatalf("%d messages deferred for refused extra connections", deferred)
	}
}

// A connection that fails during a transaction is an outcome like any:
// logged and observed (the accounting log), since the server may have
// taken the message and the retry may deliver it twice.
func TestConnectionFailureIsAnObservedOutcome(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.sendErr = func(dest string, n int) error { return errors.New("connection reset after the data") }
	var mu sync.Mutex
	var seen []OutcomeEvent
	h := start(t, func(o *Options) {
		o.Observe = func(e OutcomeEvent) { mu.Lock(); seen = append(seen, e); mu.Unlock() }
	}, store, tr)
	now := time.Now()
	store.add("m1", now, now.Add(time.Hour), "r@x.test")
	h.s.Submit("m1", []string{"x.test"}, mta.PriorityBulk)
	waitFor(t, "the deferral", func() bool {
		store.mu.Lock()
		defer store.mu.Unlock()
		return store.defers[workKey{"m1", "x.test"}] == 1
	})
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 1 || seen[0].Outcome != "deferred" || seen[0].Recipient != "r@x.test" || !strings.Contains(seen[0].Reason, "connection reset") {
		t.Fatalf("observed %+v", seen)
	}
}

// A 421 during a transaction (a receiver rate-limiting us) backs the
// destination off: its other mail is postponed, not tried connection
// after connection.
func TestA421InATransactionBacksOff(t *testing.T) {
	store, tr := newMemStore(), newFakeTransport()
	tr.sendErr = func(string, int) error {
		return &mta.Reply{Code: 421, Enhanced: mta.Enhanced{4, 7, 0}, Text: "rate limited, closing"}
	}
	h := start(t, func(o *Options) { o.MaxPerDestination, o.InitialPerDestination = 1, 1 }, store, tr)
	now := time.Now()
	for i := 0; i < 50; i++ {
		id := fmt.Sprintf("m%02d", i)
		store.add(id, now, now.Add(time.Hour), "r@x.test")
		h.s.Submit(id, []string{"x.test"}, mta.PriorityBulk)
	}
	waitFor(t, "the destination backed off", func() bool {
		for _, d := range h.s.Destinations() {
			if d.Key == "x.test" && d.BackedOff {
				return true
			}
		}
		return false
	})
	time.Sleep(100 * time.Millisecond)
	if connects, _, _ := tr.stats("x.test"); connects > 2 {
		t.Fatalf("%d connections to a destination answering 421", connects)
	}
}
