package conncache

import (
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

type fakeConn struct {
	name   string
	usable bool
	closed atomic.Bool
}

func (f *fakeConn) Usable() bool     { return f.usable && !f.closed.Load() }
func (f *fakeConn) Endpoint() string { return f.name }
func (f *fakeConn) Close() error     { f.closed.Store(true); return nil }

func TestReuseLimitsAndExpiry(t *testing.T) {
	var mu sync.Mutex
	now := time.Unix(1000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	reasons := map[string]int{}
	var rmu sync.Mutex
	c := New[*fakeConn](Options{IdleTimeout: 10 * time.Second, MaxMessages: 3, MaxIdle: 2, Now: clock,
		OnClose: func(r string, _ int) { rmu.Lock(); reasons[r]++; rmu.Unlock() }})
	defer c.Close()

	a, b, d := &fakeConn{name: "a", usable: true}, &fakeConn{name: "b", usable: true}, &fakeConn{name: "d", usable: true}
	c.Put("dest1", a, 2, Limits{})
	c.Put("dest1", b, 1, Limits{})
	if got, n, ok := c.Get("dest1"); !ok || got != b || n != 1 {
		t.Fatalf("Get = %v %d %v, want the least used (b, 1)", got, n, ok)
	}
	if _, _, ok := c.Get("dest2"); ok {
		t.Fatal("a connection of another destination was returned")
	}
	c.Put("dest1", b, 3, Limits{}) // at the message limit: closed
	if !b.closed.Load() {
		t.Fatal("connection at its message limit was kept")
	}
	c.Put("dest1", d, 1, Limits{})
	e := &fakeConn{name: "e", usable: true}
	c.Put("dest1", e, 1, Limits{}) // three idle for dest1: the oldest (a) goes
	if !a.closed.Load() || c.Idle() != 2 {
		t.Fatalf("MaxIdle not enforced: a closed %v, idle %d", a.closed.Load(), c.Idle())
	}
	bad := &fakeConn{name: "bad"}
	c.Put("dest1", bad, 0, Limits{})
	if !bad.closed.Load() {
		t.Fatal("unusable connection was kept")
	}
	mu.Lock()
	now = now.Add(11 * time.Second)
	mu.Unlock()
	if _, _, ok := c.Get("dest1"); ok {
		t.Fatal("expired connection returned")
	}
	deadline := time.Now().Add(5 * time.Second)
	for !(d.closed.Load() && e.closed.Load()) {
		if time.Now().After(deadline) {
			t.Fatal("expired connections not closed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	rmu.Lock()
	defer rmu.Unlock()
	if reasons["message_limit"] != 1 || reasons["too_many_idle"] != 1 || reasons["unusable"] != 1 || reasons["idle_timeout"] != 2 {
		t.Fatalf("close reasons %v", reasons)
	}
}

// TestLeastUsedFirst: Get hands out the connection that has carried the
// fewest messages, the most recently parked of those when several have, so
// that a destination's connections wear evenly.
func TestLeastUsedFirst(t *testing.T) {
	c := New[*fakeConn](Options{IdleTimeout: time.Hour, MaxMessages: 100})
	defer c.Close()
	conns := map[string]*fakeConn{}
	for _, p := range []struct {
		name     string
		messages int
	}{{"a", 7}, {"b", 3}, {"c", 9}, {"d", 3}, {"e", 5}} {
		conns[p.name] = &fakeConn{name: p.name, usable: true}
		c.Put("x", conns[p.name], p.messages, Limits{})
	}
	var order []string
	for {
		conn, _, ok := c.Get("x")
		if !ok {
			break
		}
		order = append(order, conn.name)
	}
	if got := strings.Join(order, ""); got != "dbeac" {
		t.Fatalf("Get order %q, want \"dbeac\" (fewest messages first, newest of equals)", got)
	}
}

func TestCloseClosesEverything(t *testing.T) {
	c := New[*fakeConn](Options{IdleTimeout: time.Hour})
	a := &fakeConn{name: "a", usable: true}
	c.Put("x", a, 0, Limits{})
	c.Close()
	if !a.closed.Load() || c.Idle() != 0 {
		t.Fatal("Close left a connection open")
	}
	b := &fakeConn{name: "b", usable: true}
	c.Put("x", b, 0, Limits{})
	if !b.closed.Load() {
		t.Fatal("Put after Close kept the connection")
	}
	c.Close() // idempotent
}

// A destination's own limits, given with Put, hold for its parked
// connections also when they are above the cache's: a connection past the
// cache's MaxMessages but within its destination's is taken again, and
// the destination keeps its own number idle.
func TestOwnLimitsAboveTheDefaults(t *testing.T) {
	c := New[*fakeConn](Options{IdleTimeout: time.Minute, MaxMessages: 3, MaxIdle: 1})
	defer c.Close()
	own := Limits{MaxMessages: 10, MaxIdle: 3}
	a, b, d := &fakeConn{name: "a", usable: true}, &fakeConn{name: "b", usable: true}, &fakeConn{name: "d", usable: true}
	c.Put("relay", a, 5, own)
	c.Put("relay", b, 6, own)
	c.Put("relay", d, 7, own)
	if c.Idle() != 3 || a.closed.Load() {
		t.Fatalf("%d idle, a closed %v: the destination's own MaxIdle of 3 not kept", c.Idle(), a.closed.Load())
	}
	if got, n, ok := c.Get("relay"); !ok || got != a || n != 5 {
		t.Fatalf("Get = %v %d %v, want a (5 messages, under its own limit of 10)", got, n, ok)
	}
	c.Put("relay", a, 10, own)
	if !a.closed.Load() {
		t.Fatal("a connection at its destination's own limit was kept")
	}
}
