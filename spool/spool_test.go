package spool

import (
	"bytes"
	"errors"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/mtaproject/mta/mta"
)

func openTest(t *testing.T, dir string, opts Options) *Spool {
	t.Helper()
	s, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func newMessage(s *Spool, rcpts ...string) *Message {
	m := &Message{ID: s.NewID(), From: "sender@example.org", EnvID: "env-1", Ret: mta.ReturnHeaders, ClientIP: "127.0.0.1", HELO: "client.test"}
	for _, r := range rcpts {
		m.Recipients = append(m.Recipients, RecipientState{Recipient: mta.Recipient{Address: r, Notify: mta.NotifyFailure | mta.NotifyDelay, ORcptType: "rfc822", ORcpt: r}})
	}
	return m
}

func TestPutGetBody(t *testing.T) {
	s := openTest(t, t.TempDir(), Options{Sync: true})
	m := newMessage(s, "a@one.test", "b@two.test", "c@ONE.test")
	if err := s.Put(m, []byte("Received: x\r\n"), []byte("Subject: hi\r\n\r\nbody\r\n")); err != nil {
		t.Fatal(err)
	}
	got, err := s.Get(m.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.From != m.From || got.EnvID != "env-1" || got.Ret != mta.ReturnHeaders || len(got.Recipients) != 3 {
		t.Fatalf("record = %+v", got)
	}
	r := got.Recipients[2]
	if r.Domain != "one.test" || r.Status != Queued || r.Notify != mta.NotifyFailure|mta.NotifyDelay || r.ORcpt != "c@ONE.test" {
		t.Fatalf("recipient = %+v", r)
	}
	if d := got.Pending(); len(d) != 2 || d[0] != "one.test" || d[1] != "two.test" {
		t.Fatalf("pending = %v", d)
	}
	body, err := s.Body(m.ID)
	if err != nil || string(body) != "Received: x\r\nSubject: hi\r\n\r\nbody\r\n" {
		t.Fatalf("body = %q, %v", body, err)
	}
	if got.Size != int64(len(body)) || s.Count() != 1 {
		t.Fatalf("size %d count %d", got.Size, s.Count())
	}
	if _, err := s.Get("0000000000000000"); !errors.Is(err, mta.ErrNotFound) {
		t.Fatalf("missing message: %v", err)
	}
}

func TestDueIndexOneEntryPerDomain(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	clock := now
	s := openTest(t, t.TempDir(), Options{Now: func() time.Time { return clock }})
	m := newMessage(s, "a@one.test", "b@two.test", "c@one.test", "d@three.test")
	if err := s.Put(m, nil, []byte("x")); err != nil {
		t.Fatal(err)
	}
	due, err := s.Due(now, 100, nil)
	if err != nil || len(due) != 3 {
		t.Fatalf("due = %v, %v", due, err)
	}
	// Defer one.test by an hour: two entries remain due now.
	if err := s.Defer(m.ID, "one.test", now.Add(time.Hour), Outcome{Reply: "451 4.7.1 try later"}); err != nil {
		t.Fatal(err)
	}
	due, _ = s.Due(now, 100, nil)
	if len(due) != 2 {
		t.Fatalf("after defer due = %v", due)
	}
	got, _ := s.Get(m.ID)
	for _, r := range got.Recipients {
		if r.Domain == "one.test" && (r.Attempts != 1 || r.LastReply != "451 4.7.1 try later" || !r.NextAttempt.Equal(now.Add(time.Hour))) {
			t.Fatalf("deferred recipient = %+v", r)
		}
	}
	due, _ = s.Due(now.Add(time.Hour), 100, nil)
	if len(due) != 3 || due[2].Domain != "one.test" || !due[2].Due.Equal(now.Add(time.Hour)) {
		t.Fatalf("later due = %v", due)
	}
	// Deliver two.test, fail three.test: only one.test is left.
	if err := s.MarkDelivered(m.ID, []Result{{Address: "b@two.test", Outcome: Outcome{Reply: "250 ok"}}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Fail(m.ID, []Result{{Address: "d@three.test", Outcome: Outcome{Reply: "550 5.1.1 no such user"}}}); err != nil {
		t.Fatal(err)
	}
	due, _ = s.Due(now.Add(24*time.Hour), 100, nil)
	if len(due) != 1 || due[0].Domain != "one.test" {
		t.Fatalf("due = %v", due)
	}
	got, _ = s.Get(m.ID)
	if got.Recipients[1].Status != Delivered || got.Recipients[3].Status != Failed || got.Recipients[3].LastReply != "550 5.1.1 no such user" {
		t.Fatalf("states = %+v", got.Recipients)
	}
	// Deliver the rest: no recipient is queued, so the message leaves the
	// spool, failure and all (its bounce, if owed, was made by the
	// Notifier with the failure: see notice_test.go).
	if err := s.MarkDelivered(m.ID, []Result{{Address: "a@one.test", Outcome: Outcome{Reply: "250 ok"}}, {Address: "c@one.test", Outcome: Outcome{Reply: "250 ok"}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(m.ID); !errors.Is(err, mta.ErrNotFound) {
		t.Fatalf("a message with nothing left to do is still there: %v", err)
	}
	if due, _ := s.Due(now.Add(48*time.Hour), 100, nil); len(due) != 0 || s.Count() != 0 {
		t.Fatalf("due = %v count = %d", due, s.Count())
	}

	// A message whose recipients are all delivered leaves the spool,
	// bytes and index too; so does one from the null sender.
	for _, from := range []string{"x@example.org", ""} {
		m2 := newMessage(s, "a@one.test", "b@two.test")
		m2.From = from
		if err := s.Put(m2, nil, []byte("x")); err != nil {
			t.Fatal(err)
		}
		if err := s.MarkDelivered(m2.ID, []Result{{Address: "a@one.test", Outcome: Outcome{Reply: "250 ok"}}}); err != nil {
			t.Fatal(err)
		}
		finish := s.MarkDelivered
		if from == "" {
			finish = s.Fail
		}
		if err := finish(m2.ID, []Result{{Address: "b@two.test", Outcome: Outcome{Reply: "done"}}}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Get(m2.ID); !errors.Is(err, mta.ErrNotFound) {
			t.Fatalf("finished message (from %q) still there: %v", from, err)
		}
		if _, err := s.Body(m2.ID); !errors.Is(err, mta.ErrNotFound) {
			t.Fatalf("finished message's bytes still there: %v", err)
		}
	}
	if s.Count() != 0 {
		t.Fatalf("count = %d", s.Count())
	}
}

func TestHoldReleaseFlushRemove(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	clock := now
	s := openTest(t, t.TempDir(), Options{Now: func() time.Time { return clock }})
	m1, m2 := newMessage(s, "a@one.test"), newMessage(s, "b@two.test")
	for _, m := range []*Message{m1, m2} {
		if err := s.Put(m, nil, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Hold(m1.ID); err != nil {
		t.Fatal(err)
	}
	if due, _ := s.Due(now, 10, nil); len(due) != 1 || due[0].ID != m2.ID {
		t.Fatalf("held message still due: %v", due)
	}
	if err := s.Defer(m2.ID, "two.test", now.Add(time.Hour), Outcome{Reply: "421"}); err != nil {
		t.Fatal(err)
	}
	clock = now.Add(time.Minute)
	if err := s.Release(m1.ID); err != nil {
		t.Fatal(err)
	}
	if due, _ := s.Due(clock, 10, nil); len(due) != 1 || due[0].ID != m1.ID {
		t.Fatalf("released message not due: %v", due)
	}
	n, err := s.Flush()
	if err != nil || n != 1 {
		t.Fatalf("flush = %d, %v", n, err)
	}
	if due, _ := s.Due(clock, 10, nil); len(due) != 2 {
		t.Fatalf("flushed message not due: %v", due)
	}
	if err := s.Remove(m2.ID); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(m2.ID); !errors.Is(err, mta.ErrNotFound) {
		t.Fatalf("second remove: %v", err)
	}
	if due, _ := s.Due(clock, 10, nil); len(due) != 1 || s.Count() != 1 {
		t.Fatalf("after remove due=%v count=%d", due, s.Count())
	}
	list, err := s.List("", 10)
	if err != nil || len(list) != 1 || list[0].ID != m1.ID {
		t.Fatalf("list = %v, %v", list, err)
	}
}

func TestReopenRecoversAndRepairs(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{Sync: true})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for i := 0; i < 5; i++ {
		m := newMessage(s, fmt.Sprintf("r%d@d%d.test", i, i%2))
		if err := s.Put(m, nil, []byte(fmt.Sprintf("message %d", i))); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.ID)
	}
	if err := s.Hold(ids[4]); err != nil {
		t.Fatal(err)
	}
	// Break the index behind the spool's back: lose one entry, add a dangling one.
	got, _ := s.Get(ids[0])
	var k keyBuf
	if err := s.db.Delete(k.due(got.Recipients[0].NextAttempt, ids[0], "d0.test"), nil); err != nil {
		t.Fatal(err)
	}
	if err := s.db.Set(k.due(time.Now(), "0000000000000001", "gone.test"), nil, nil); err != nil {
		t.Fatal(err)
	}
	// An entry of a live message at a time no recipient is due at, and one
	// of the held message: neither stands for queued work.
	if err := s.db.Set(k.due(time.Now().Add(time.Hour), ids[1], "d1.test"), nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.db.Set(k.due(time.Now(), ids[4], "d0.test"), nil, nil); err != nil {
		t.Fatal(err)
	}
	s.Close()

	s = openTest(t, dir, Options{Sync: true})
	if s.Count() != 5 {
		t.Fatalf("count after reopen = %d", s.Count())
	}
	due, err := s.Due(time.Now().Add(time.Second), 100, nil)
	if err != nil {
		t.Fatal(err)
	}
	var dueIDs []string
	for _, d := range due {
		dueIDs = append(dueIDs, d.ID)
	}
	sort.Strings(dueIDs)
	if fmt.Sprint(dueIDs) != fmt.Sprint(ids[:4]) {
		t.Fatalf("due after recovery = %v, want %v", dueIDs, ids[:4])
	}
	if all, _ := s.Due(time.Now().Add(48*time.Hour), 100, nil); len(all) != 4 {
		t.Fatalf("stray due entries survived recovery: %v", all)
	}
	if n, err := s.Flush(); err != nil || n != 0 {
		t.Fatalf("flush after recovery = %d, %v", n, err)
	}
	for i, id := range ids {
		b, err := s.Body(id)
		if err != nil || string(b) != fmt.Sprintf("message %d", i) {
			t.Fatalf("body %d = %q, %v", i, b, err)
		}
	}
}

func TestDiskReserveRefusesWithStorageFull(t *testing.T) {
	s := openTest(t, t.TempDir(), Options{MinFreeSpace: 1 << 61})
	err := s.Put(newMessage(s, "a@b.test"), nil, []byte("x"))
	if !errors.Is(err, mta.ErrStorageFull) {
		t.Fatalf("Put = %v, want ErrStorageFull", err)
	}
	if s.Count() != 0 {
		t.Fatal("refused message counted")
	}
}

func TestConcurrentPutsShareFsyncs(t *testing.T) {
	s := openTest(t, t.TempDir(), Options{Sync: true})
	before := s.WALSyncs()
	const writers, each = 32, 40
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				if err := s.Put(newMessage(s, "a@b.test"), nil, bytes.Repeat([]byte("x"), 1024)); err != nil {
					errs <- err
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
	syncs := s.WALSyncs() - before
	t.Logf("%d synced puts took %d WAL fsyncs", writers*each, syncs)
	if syncs == 0 || syncs >= writers*each {
		t.Fatalf("%d fsyncs for %d concurrent synced puts: no group commit", syncs, writers*each)
	}
	if s.Count() != writers*each {
		t.Fatalf("count = %d", s.Count())
	}
}

func TestIDsAreUniqueOrderedAndDecodable(t *testing.T) {
	g := newIDGen()
	now := time.UnixMilli(1_700_000_000_123)
	prev := ""
	for i := 0; i < 10000; i++ {
		at := now
		if i == 5000 {
			now = now.Add(-time.Second) // clock steps back: IDs must not
		}
		id := g.next(at)
		if !ValidID(id) || id <= prev {
			t.Fatalf("id %d = %q after %q", i, id, prev)
		}
		prev = id
	}
	if got := IDTime(g.next(now.Add(time.Hour))); !got.Equal(now.Add(time.Hour)) {
		t.Fatalf("IDTime = %v, want %v", got, now.Add(time.Hour))
	}
	for _, bad := range []string{"", "0123456789ABCDEI", "0123456789abcdef", "0123"} {
		if ValidID(bad) {
			t.Errorf("ValidID(%q)", bad)
		}
	}
}

func TestRecordRoundTripAndCorruption(t *testing.T) {
	m := &Message{ID: "0123456789ABCDEF", From: "", EnvID: "e", Ret: mta.ReturnFull, SMTPUTF8: true, Held: true,
		ClientIP: "::1", HELO: "h", AuthUser: "u", Received: time.Unix(5, 6), Size: 99,
		Priority: mta.PriorityTransactional, Metadata: map[string]string{"order": "A-1", "campaign": "reset"},
		body: bodyLocation{File: 3, Offset: 1 << 40, CRC: 0xdeadbeef},
		Recipients: []RecipientState{{Recipient: mta.Recipient{Address: "x@Y.test", Notify: mta.NotifyNever},
			Status: Failed, Attempts: 3, NextAttempt: time.Unix(7, 8), LastReply: "550 no"}}}
	b := m.encode(nil)
	got, err := decodeMessage(m.ID, b)
	if err != nil {
		t.Fatal(err)
	}
	if got.Recipients[0].Domain != "y.test" {
		t.Fatalf("domain %q", got.Recipients[0].Domain)
	}
	got.Recipients[0].Domain = ""
	if fmt.Sprintf("%+v", got) != fmt.Sprintf("%+v", m) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", got, m)
	}
	for i := 0; i < len(b); i++ {
		if _, err := decodeMessage(m.ID, b[:i]); err == nil {
			t.Fatalf("truncated record (%d of %d bytes) decoded", i, len(b))
		}
	}
}

func TestLeaseMovesDueEntriesWithoutAttempts(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	s := openTest(t, t.TempDir(), Options{Now: func() time.Time { return now }, FreshLease: time.Minute})
	m1, m2 := newMessage(s, "a@one.test", "b@two.test"), newMessage(s, "c@one.test")
	for _, m := range []*Message{m1, m2} {
		if err := s.Put(m, nil, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	if due, _ := s.Due(now, 10, nil); len(due) != 0 {
		t.Fatalf("fresh messages due before their lease: %v", due)
	}
	if due, _ := s.Due(now.Add(time.Minute), 10, nil); len(due) != 3 {
		t.Fatalf("fresh messages not due after their lease: %v", due)
	}
	later := now.Add(time.Hour)
	leased, err := s.Lease([]LeaseItem{
		{ID: m1.ID, Domain: "one.test", At: later},
		{ID: m1.ID, Domain: "two.test", At: later.Add(time.Second), Reply: "waiting for two.test"},
		{ID: m2.ID, Domain: "one.test", At: later},
		{ID: "0000000000000009", Domain: "x.test", At: later},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(leased) != 3 || !leased[0].Received.Equal(m1.Received) || !leased[2].Received.Equal(m2.Received) {
		t.Fatalf("leased %+v: want three, with their messages' Received times", leased)
	}
	if due, _ := s.Due(later.Add(-time.Second), 10, nil); len(due) != 0 {
		t.Fatalf("leased entries still due early: %v", due)
	}
	due, _ := s.Due(later.Add(time.Second), 10, nil)
	if len(due) != 3 {
		t.Fatalf("leased entries = %v", due)
	}
	got, _ := s.Get(m1.ID)
	if got.Recipients[0].Attempts != 0 || !got.Recipients[1].NextAttempt.Equal(later.Add(time.Second)) || got.Recipients[1].LastReply != "waiting for two.test" || got.Recipients[0].LastReply != "" {
		t.Fatalf("record after lease: %+v", got.Recipients)
	}
}

// TestLeaseDoesNotOverwriteADeferral: a worker that defers a recipient
// between the scan's Due and its Lease batch wins; the lease leaves the
// item out instead of making it due again one lease later.
func TestLeaseDoesNotOverwriteADeferral(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	s := openTest(t, t.TempDir(), Options{Now: func() time.Time { return now }, FreshLease: time.Minute})
	m := newMessage(s, "a@one.test")
	if err := s.Put(m, nil, []byte("x")); err != nil {
		t.Fatal(err)
	}
	scanAt := now.Add(2 * time.Minute)
	due, _ := s.Due(scanAt, 10, nil)
	if len(due) != 1 {
		t.Fatalf("due %v", due)
	}
	backoff := now.Add(time.Hour)
	if err := s.Defer(m.ID, "one.test", backoff, Outcome{Reply: "451 4.2.0 try later"}); err != nil { // the worker
		t.Fatal(err)
	}
	leased, err := s.Lease([]LeaseItem{{ID: m.ID, Domain: "one.test", At: scanAt.Add(time.Minute), Was: due[0].Due}})
	if err != nil {
		t.Fatal(err)
	}
	got, _ := s.Get(m.ID)
	if len(leased) != 0 || !got.Recipients[0].NextAttempt.Equal(backoff) {
		t.Fatalf("leased %v; next attempt %v, want the deferral's %v", leased, got.Recipients[0].NextAttempt, backoff)
	}
	// Without the race the lease applies.
	due, _ = s.Due(backoff, 10, nil)
	if leased, _ := s.Lease([]LeaseItem{{ID: m.ID, Domain: "one.test", At: backoff.Add(time.Minute), Was: due[0].Due}}); len(leased) != 1 {
		t.Fatalf("lease of an unmoved item: %v", leased)
	}
}

// TestReserveKeepsPebbleHeadroom: a reserve configured smaller than what
// Pebble needs after the last accepted message (the next WAL file, a
// flush) is raised to three memtables; a larger one is kept.
func TestReserveKeepsPebbleHeadroom(t *testing.T) {
	s := openTest(t, t.TempDir(), Options{MinFreeSpace: 1 << 20, MemTableSize: 4 << 20})
	if got := s.Reserve(); got != 12<<20 {
		t.Errorf("reserve with min_free_space 1 MiB and a 4 MiB memtable: %d, want %d", got, 12<<20)
	}
	s = openTest(t, t.TempDir(), Options{MinFreeSpace: 1 << 30, MemTableSize: 4 << 20})
	if got := s.Reserve(); got != 1<<30 {
		t.Errorf("reserve with min_free_space 1 GiB: %d", got)
	}
}

// TestOldestIgnoresAForeignKey: a message key that is not a queue ID
// (written by another tool) must not crash the metrics scrape that asks
// for the oldest message.
func TestOldestIgnoresAForeignKey(t *testing.T) {
	s := openTest(t, t.TempDir(), Options{})
	if err := s.db.Set([]byte(prefixMessage+"0"), []byte("x"), nil); err != nil {
		t.Fatal(err)
	}
	if got := s.Oldest(); !got.IsZero() {
		t.Errorf("Oldest with a foreign key: %v", got)
	}
	if got := IDTime("0"); !got.IsZero() {
		t.Errorf("IDTime(%q) = %v", "0", got)
	}
}
