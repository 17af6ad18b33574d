package spool

import (
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/mtaproject/mta/mta"
)

// len is the number of records kept.
func (f *freshRecords) len() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.byID)
}

// sameAsStored fails unless Get returns exactly the record Pebble holds.
func sameAsStored(t *testing.T, s *Spool, id, when string) {
	t.Helper()
	want, err := s.stored(id)
	got, gerr := s.Get(id)
	if errors.Is(err, mta.ErrNotFound) {
		if !errors.Is(gerr, mta.ErrNotFound) {
			t.Fatalf("%s: the record is gone, Get gave %+v, %v", when, got, gerr)
		}
		return
	}
	if err != nil || gerr != nil {
		t.Fatalf("%s: %v, %v", when, err, gerr)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%s: Get gave\n%+v\nPebble holds\n%+v", when, got, want)
	}
}

// TestFreshRecordsFollowEveryChange: a record read from memory after
// acceptance is the stored one after each kind of change: a deferral, a
// lease, a delivery to one of two domains, a hold, and the last delivery
// that removes the message.
func TestFreshRecordsFollowEveryChange(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	s := openTest(t, t.TempDir(), Options{Now: func() time.Time { return now }})
	m := newMessage(s, "a@one.test", "b@two.test")
	m.Metadata = map[string]string{"campaign": "x"}
	if err := s.Put(m, nil, []byte("Subject: x\r\n\r\nbody\r\n")); err != nil {
		t.Fatal(err)
	}
	if s.fresh.len() != 1 {
		t.Fatalf("%d fresh records after one acceptance, want 1", s.fresh.len())
	}
	sameAsStored(t, s, m.ID, "accepted")

	// A caller's changes to what Get returned stay its own.
	got, _ := s.Get(m.ID)
	got.Recipients[0].Status = Failed
	got.Metadata["campaign"] = "changed"
	sameAsStored(t, s, m.ID, "after a caller changed its copy")

	if err := s.Defer(m.ID, "one.test", now.Add(time.Hour), Outcome{Reply: "451 4.3.0 later"}); err != nil {
		t.Fatal(err)
	}
	sameAsStored(t, s, m.ID, "deferred")
	if s.fresh.len() != 0 {
		t.Fatalf("%d fresh records after a change, want 0", s.fresh.len())
	}

	m2 := newMessage(s, "c@one.test", "d@two.test")
	if err := s.Put(m2, nil, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Lease([]LeaseItem{{ID: m2.ID, Domain: "one.test", At: now.Add(time.Minute), Reply: "waiting"}}); err != nil {
		t.Fatal(err)
	}
	sameAsStored(t, s, m2.ID, "leased")
	if r, _ := s.Get(m2.ID); !r.Recipients[0].NextAttempt.Equal(now.Add(time.Minute)) {
		t.Fatalf("after the lease the recipient is due %v, want %v", r.Recipients[0].NextAttempt, now.Add(time.Minute))
	}

	m3 := newMessage(s, "e@one.test", "f@two.test")
	if err := s.Put(m3, nil, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkDelivered(m3.ID, []Result{{Address: "e@one.test", Outcome: Outcome{Reply: "250 ok"}}}); err != nil {
		t.Fatal(err)
	}
	sameAsStored(t, s, m3.ID, "delivered to one domain of two")
	if err := s.Hold(m3.ID); err != nil {
		t.Fatal(err)
	}
	sameAsStored(t, s, m3.ID, "held")
	if err := s.MarkDelivered(m3.ID, []Result{{Address: "f@two.test", Outcome: Outcome{Reply: "250 ok"}}}); err != nil {
		t.Fatal(err)
	}
	sameAsStored(t, s, m3.ID, "delivered to both")

	m4 := newMessage(s, "g@one.test")
	if err := s.Put(m4, nil, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkDelivered(m4.ID, []Result{{Address: "g@one.test", Outcome: Outcome{Reply: "250 ok"}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(m4.ID); !errors.Is(err, mta.ErrNotFound) {
		t.Fatalf("a delivered message is still found: %v", err)
	}
	if s.fresh.len() != 0 {
		t.Fatalf("%d fresh records left, want 0", s.fresh.len())
	}
}

// TestFreshRecordsAreBounded: past freshLimit, new records are read from
// Pebble, and every one is still found as stored.
func TestFreshRecordsAreBounded(t *testing.T) {
	s := openTest(t, t.TempDir(), Options{})
	var ids []string
	for i := 0; i < freshLimit+50; i++ {
		m := newMessage(s, "a@one.test")
		if err := s.Put(m, nil, []byte("x")); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.ID)
	}
	if n := s.fresh.len(); n != freshLimit {
		t.Fatalf("%d fresh records, want the limit %d", n, freshLimit)
	}
	for _, id := range []string{ids[0], ids[freshLimit-1], ids[freshLimit], ids[len(ids)-1]} {
		sameAsStored(t, s, id, "one of many")
	}
}

// TestHeldMessagesAreNotKeptFresh: a message accepted on hold waits for
// an operator and takes no place.
func TestHeldMessagesAreNotKeptFresh(t *testing.T) {
	s := openTest(t, t.TempDir(), Options{})
	m := newMessage(s, "a@one.test")
	m.Held = true
	if err := s.Put(m, nil, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if n := s.fresh.len(); n != 0 {
		t.Fatalf("%d fresh records for a held message, want 0", n)
	}
	sameAsStored(t, s, m.ID, "held at acceptance")
}

// TestFreshRecordsUnderConcurrency: many messages accepted, read, changed
// and delivered at once (run with -race) each read back as stored.
func TestFreshRecordsUnderConcurrency(t *testing.T) {
	s := openTest(t, t.TempDir(), Options{})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 200; i++ {
				m := newMessage(s, "a@one.test", "b@two.test")
				if err := s.Put(m, nil, []byte("x")); err != nil {
					errs <- err
					return
				}
				if got, err := s.Get(m.ID); err != nil || got.Recipients[0].Status != Queued {
					errs <- fmt.Errorf("fresh %s: %+v, %v", m.ID, got, err)
					return
				}
				if err := s.MarkDelivered(m.ID, []Result{{Address: "a@one.test", Outcome: Outcome{Reply: "250 ok"}}}); err != nil {
					errs <- err
					return
				}
				if got, err := s.Get(m.ID); err != nil || got.Recipients[0].Status != Delivered || got.Recipients[1].Status != Queued {
					errs <- fmt.Errorf("after one delivery %s: %+v, %v", m.ID, got, err)
					return
				}
				if err := s.MarkDelivered(m.ID, []Result{{Address: "b@two.test", Outcome: Outcome{Reply: "250 ok"}}}); err != nil {
					errs <- err
					return
				}
				if _, err := s.Get(m.ID); !errors.Is(err, mta.ErrNotFound) {
					errs <- fmt.Errorf("delivered %s still found: %v", m.ID, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if n := s.fresh.len(); n != 0 {
		t.Fatalf("%d fresh records left after every message was delivered", n)
	}
}
