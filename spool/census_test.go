package spool

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestCensusMatchesList: the census reports, for every message, the state
// and arrival time that List's full decoding gives: queued, deferred
// after an attempt, deferred after a postponement without one (a reply,
// no attempt), held, and a message with some recipients delivered.
func TestCensusMatchesList(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	clock := now
	s := openTest(t, t.TempDir(), Options{Now: func() time.Time { return clock }})
	put := func(rcpts ...string) *Message {
		t.Helper()
		m := newMessage(s, rcpts...)
		m.Received = clock
		clock = clock.Add(time.Minute)
		if err := s.Put(m, nil, []byte("Subject: x\r\n\r\nbody\r\n")); err != nil {
			t.Fatal(err)
		}
		return m
	}
	put("a@one.test")
	tried := put("a@one.test", "b@two.test")
	if err := s.Defer(tried.ID, "one.test", now.Add(time.Hour), Outcome{Reply: "451 4.7.1 try later"}); err != nil {
		t.Fatal(err)
	}
	postponed := put("a@dead.test")
	if _, err := s.Lease([]LeaseItem{{ID: postponed.ID, Domain: "dead.test", At: now.Add(time.Hour), Reply: "connection refused"}}); err != nil {
		t.Fatal(err)
	}
	held := put("a@one.test")
	if err := s.Hold(held.ID); err != nil {
		t.Fatal(err)
	}
	partly := put("a@one.test", "b@two.test")
	if err := s.MarkDelivered(partly.ID, []Result{{Address: "a@one.test", Outcome: Outcome{Reply: "250 ok"}}}); err != nil {
		t.Fatal(err)
	}

	all, err := s.List("", 100)
	if err != nil {
		t.Fatal(err)
	}
	type entry struct {
		state    string
		received time.Time
	}
	var want, got []entry
	states := map[string]int{}
	for _, m := range all {
		want = append(want, entry{m.State(), m.Received})
		states[m.State()]++
	}
	if states["queued"] != 2 || states["deferred"] != 2 || states["held"] != 1 {
		t.Fatalf("states from List = %v, want 2 queued, 2 deferred, 1 held", states)
	}
	n, err := s.Census(context.Background(), 100, func(state string, received time.Time) {
		got = append(got, entry{state, received})
	})
	if err != nil || n != len(want) {
		t.Fatalf("census counted %d, %v; want %d", n, err, len(want))
	}
	for i := range want {
		if got[i].state != want[i].state || !got[i].received.Equal(want[i].received) {
			t.Errorf("message %d: census %+v, List %+v", i, got[i], want[i])
		}
	}

	if n, _ := s.Census(context.Background(), 2, func(string, time.Time) {}); n != 2 {
		t.Errorf("census with limit 2 counted %d", n)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.Census(ctx, 100, func(string, time.Time) {}); !errors.Is(err, context.Canceled) {
		t.Errorf("census with ctx cancelled: %v", err)
	}
}
