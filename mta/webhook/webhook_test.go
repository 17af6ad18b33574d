package webhook

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// memStore is a Store in memory, shared across "restarts".
type memStore struct {
	mu  sync.Mutex
	evs map[string][]StoredEvent
}

func (s *memStore) AppendEvents(h string, evs []StoredEvent) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.evs[h] = append(s.evs[h], evs...)
	return nil
}

func (s *memStore) Events(h string, limit int) ([]StoredEvent, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	evs := s.evs[h]
	return append([]StoredEvent(nil), evs[:min(limit, len(evs))]...), nil
}

func (s *memStore) DeleteEvents(h string, through uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	evs := s.evs[h]
	i := sort.Search(len(evs), func(i int) bool { return evs[i].Seq > through })
	s.evs[h] = evs[i:]
	return nil
}

func (s *memStore) EventBacklog(h string) (int, int64, uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var b int64
	var last uint64
	for _, e := range s.evs[h] {
		b += int64(len(e.Data))
		last = e.Seq
	}
	return len(s.evs[h]), b, last, nil
}

func (s *memStore) count(h string) int { s.mu.Lock(); defer s.mu.Unlock(); return len(s.evs[h]) }

// TestBufferLimitAndRestart: past max_buffer events are dropped and
// counted, mail never waits; the events buffered survive a restart and
// are posted by the next run, with IDs that do not repeat.
func TestBufferLimitAndRestart(t *testing.T) {
	store := &memStore{evs: map[string][]StoredEvent{}}
	// The first run posts to a receiver that is down, the second to one
	// that is up: a post of the first run that its client gave up on at
	// the stop can still reach its handler late, and must not count.
	down := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "down", 503)
	}))
	defer down.Close()
	var mu sync.Mutex
	ids := map[string]int{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		body, _ := io.ReadAll(r.Body)
		var batch []map[string]any
		json.Unmarshal(body, &batch)
		for _, e := range batch {
			ids[e["event_id"].(string)]++
		}
	}))
	defer srv.Close()
	event := []byte(`{"event":"delivery","recipient":"a@example.org"}`)
	run := func(url string, enqueue int) (*Dispatcher, func()) {
		hook := Hook{Name: "h", URL: url, Secret: "s", MaxBuffer: int64(10 * (len(event) + 40))}
		reg := prometheus.NewRegistry()
		d, err := New(Options{Store: store, Hooks: []Hook{hook}, Registerer: reg, MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); d.Run(ctx) }()
		for range enqueue {
			d.Enqueue("h", event)
			time.Sleep(time.Millisecond) // let the writer keep up, as mail does
		}
		return d, func() { cancel(); <-done }
	}
	d, stop := run(down.URL, 30)
	deadline := time.Now().Add(5 * time.Second)
	for testutil.ToFloat64(d.dropped.WithLabelValues("h"))+float64(store.count("h")) < 30 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	stop()
	kept, dropped := store.count("h"), int(testutil.ToFloat64(d.dropped.WithLabelValues("h")))
	if kept > 12 || kept < 8 || kept+dropped != 30 {
		t.Fatalf("%d kept, %d dropped of 30 with room for about 10", kept, dropped)
	}
	d, stop = run(srv.URL, 0)
	posted := func() int { mu.Lock(); defer mu.Unlock(); return len(ids) }
	deadline = time.Now().Add(5 * time.Second)
	for posted() < kept && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	for range 5 {
		d.Enqueue("h", event)
	}
	for posted() < kept+5 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	stop()
	mu.Lock()
	defer mu.Unlock()
	if len(ids) != kept+5 {
		t.Errorf("%d events posted after the restart, want the %d kept and 5 new", len(ids), kept)
	}
	for id, n := range ids {
		if n != 1 {
			t.Errorf("event %s posted %d times", id, n)
		}
	}
}

// TestSign: the signature is HMAC-SHA256 over "<t>.<body>".
func TestSign(t *testing.T) {
	got := Sign("secret", time.Unix(1700000000, 0), []byte(`[{"a":1}]`))
	// echo -n '1700000000.[{"a":1}]' | openssl dgst -sha256 -hmac secret
	const want = "t=1700000000,v1=516856209dea79008d72e48f00c1c767cd294a440ae742a16140cd7375ced090"
	if got != want {
		t.Fatalf("Sign = %q", got)
	}
}

// TestRefusedBatchesAreSplitNotDropped: a receiver that answers 413 to a
// batch of more than 2 events gets every event in smaller batches; one
// that answers 400 to every post (a wrong secret) loses nothing: the
// events stay queued. 404 and 429 are the endpoint's, not the content's.
func TestRefusedBatchesAreSplitNotDropped(t *testing.T) {
	for _, tc := range []struct {
		name   string
		status func(batch int) int
		posted int
	}{
		{"413 over 2", func(n int) int {
			if n > 2 {
				return http.StatusRequestEntityTooLarge
			}
			return 200
		}, 20},
		{"always 400", func(int) int { return http.StatusBadRequest }, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			got := map[string]bool{}
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				body, _ := io.ReadAll(r.Body)
				var batch []map[string]any
				json.Unmarshal(body, &batch)
				if code := tc.status(len(batch)); code != 200 {
					http.Error(w, "no", code)
					return
				}
				mu.Lock()
				defer mu.Unlock()
				for _, e := range batch {
					got[e["recipient"].(string)] = true
				}
			}))
			defer srv.Close()
			store := &memStore{evs: map[string][]StoredEvent{}}
			d, err := New(Options{Store: store, Hooks: []Hook{{Name: "h", URL: srv.URL, Secret: "s", MaxBuffer: 1 << 20}}, Registerer: prometheus.NewRegistry(),
				MinBackoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond, BatchSize: 8})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { defer close(done); d.Run(ctx) }()
			for i := range 20 {
				d.Enqueue("h", []byte(fmt.Sprintf(`{"event":"delivery","recipient":"r%d@example.org"}`, i)))
			}
			deadline := time.Now().Add(time.Second)
			for time.Now().Before(deadline) {
				mu.Lock()
				n := len(got)
				mu.Unlock()
				if n == tc.posted && tc.posted > 0 {
					break
				}
				time.Sleep(5 * time.Millisecond)
			}
			cancel()
			<-done
			mu.Lock()
			defer mu.Unlock()
			if len(got) != tc.posted || store.count("h") != 20-tc.posted || testutil.ToFloat64(d.dropped.WithLabelValues("h")) != 0 {
				t.Errorf("%d posted, %d still queued, %v dropped; want %d posted, the rest queued, none dropped",
					len(got), store.count("h"), testutil.ToFloat64(d.dropped.WithLabelValues("h")), tc.posted)
			}
		})
	}
	if refusesContent(http.StatusNotFound) || refusesContent(http.StatusTooManyRequests) || !refusesContent(http.StatusRequestEntityTooLarge) {
		t.Error("refusesContent: 404 and 429 are the endpoint's, 413 the content's")
	}
	if r := redacted("https://user:pw@hooks.example/x?token=SECRET"); r != "https://hooks.example/x?…" {
		t.Errorf("redacted URL %q", r)
	}
}
