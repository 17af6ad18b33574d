package server

import (
	"context"
	"testing"
	"time"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/spool"
)

// TestQueueCountByStateAndAge: the queue metrics' count puts each message
// in its state and age bucket, as `mta queue ls` would show them.
func TestQueueCountByStateAndAge(t *testing.T) {
	sp, err := spool.Open(t.TempDir(), spool.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	now := time.Now()
	put := func(age time.Duration) string {
		t.Helper()
		m := &spool.Message{ID: sp.NewID(), From: "s@example.org", Received: now.Add(-age),
			Recipients: []spool.RecipientState{{Recipient: mta.Recipient{Address: "r@one.test"}}}}
		if err := sp.Put(m, nil, []byte("Subject: x\r\n\r\nbody\r\n")); err != nil {
			t.Fatal(err)
		}
		return m.ID
	}
	put(time.Minute)
	put(2 * time.Hour)
	deferred := put(30 * time.Hour)
	if err := sp.Defer(deferred, "one.test", now.Add(time.Hour), spool.Outcome{Reply: "451 4.7.1 later"}); err != nil {
		t.Fatal(err)
	}
	held := put(10 * 24 * time.Hour)
	if err := sp.Hold(held); err != nil {
		t.Fatal(err)
	}
	c := newQueueCollector(sp, nil)
	c.count(context.Background())
	wantState := map[string]int{"queued": 2, "deferred": 1, "held": 1}
	wantAge := map[string]int{"5m": 1, "1h": 0, "4h": 1, "1d": 0, "5d": 1, "older": 1}
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, v := range wantState {
		if c.byState[k] != v {
			t.Errorf("state %s: %d, want %d (all: %v)", k, c.byState[k], v, c.byState)
		}
	}
	for k, v := range wantAge {
		if c.byAge[k] != v {
			t.Errorf("age %s: %d, want %d (all: %v)", k, c.byAge[k], v, c.byAge)
		}
	}
}
