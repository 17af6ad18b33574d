package spool

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"

	"github.com/mtaproject/mta/mta"
)

// bigBody is n bytes of message text that differ from one message to the
// next.
func bigBody(seed, n int) []byte {
	line := []byte(strings.Repeat(string(rune('a'+seed%26)), 70) + "\r\n")
	return bytes.Repeat(line, n/len(line)+1)[:n]
}

func bodyFileNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(dir, bodyFilesDir))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// waitFor polls cond until it holds, for up to two seconds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestLargeMessagesLiveInBodyFiles(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, dir, Options{Sync: true, BodyFileThreshold: 4096})
	header := []byte("Received: by test\r\n")
	big, small := newMessage(s, "a@one.test"), newMessage(s, "b@one.test")
	bigBytes, smallBytes := bigBody(1, 50_000), []byte("Subject: small\r\n\r\nhi\r\n")
	if err := s.PutAll([]Incoming{{Message: big, Header: header, Body: bigBytes}, {Message: small, Header: header, Body: smallBytes}}); err != nil {
		t.Fatal(err)
	}
	var k keyBuf
	if s.exists(k.body(big.ID)) {
		t.Fatal("the large message's bytes are in Pebble")
	}
	if !s.exists(k.body(small.ID)) {
		t.Fatal("the small message's bytes are not in Pebble")
	}
	if names := bodyFileNames(t, dir); len(names) != 1 {
		t.Fatalf("body files %v", names)
	}
	check := func(s *Spool) {
		t.Helper()
		for id, want := range map[string][]byte{big.ID: append(append([]byte(nil), header...), bigBytes...), small.ID: append(append([]byte(nil), header...), smallBytes...)} {
			got, err := s.AppendBody([]byte("prefix"), id)
			if err != nil || !bytes.Equal(got, append([]byte("prefix"), want...)) {
				t.Fatalf("%s: %d bytes, %v; want %d", id, len(got), err, len(want)+6)
			}
		}
	}
	check(s)

	// After a restart the records still find their bytes.
	s.Close()
	s = openTest(t, dir, Options{Sync: true, BodyFileThreshold: 4096})
	check(s)

	// A delivered large message gives its file back: it goes once sealed.
	if err := s.MarkDelivered(big.ID, []Result{{Address: "a@one.test"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Body(big.ID); !errors.Is(err, mta.ErrNotFound) {
		t.Fatalf("delivered message's body: %v", err)
	}
	waitFor(t, "the unused body file to go", func() bool { return len(bodyFileNames(t, dir)) == 0 })
}

func TestBodyFilesGoOnceTheirMessagesAreDone(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, dir, Options{Sync: true, BodyFileThreshold: 1000})
	s.bodies.limit = 25_000 // a new file every three messages
	var ids []string
	for i := range 12 {
		m := newMessage(s, "a@one.test")
		if err := s.Put(m, nil, bigBody(i, 10_000)); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.ID)
	}
	if n := len(bodyFileNames(t, dir)); n != 4 {
		t.Fatalf("%d body files, want 4", n)
	}
	// Delivering the first three frees the first file, and only it.
	for _, id := range ids[:3] {
		if err := s.MarkDelivered(id, []Result{{Address: "a@one.test"}}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the first file to go", func() bool { return len(bodyFileNames(t, dir)) == 3 })
	// One deferred message moves into Pebble and no longer holds its file.
	if err := s.Defer(ids[3], "one.test", time.Now().Add(time.Hour), Outcome{Reply: "451 later"}); err != nil {
		t.Fatal(err)
	}
	for _, id := range ids[4:6] {
		if err := s.MarkDelivered(id, []Result{{Address: "a@one.test"}}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the second file to go", func() bool { return len(bodyFileNames(t, dir)) == 2 })
	got, err := s.Body(ids[3])
	if err != nil || !bytes.Equal(got, bigBody(3, 10_000)) {
		t.Fatalf("deferred message: %d bytes, %v", len(got), err)
	}
	if m, _ := s.Get(ids[3]); m.body.File != 0 {
		t.Fatalf("deferred message still points to body file %d", m.body.File)
	}
	// The others still read back after all that, and after a restart.
	s.Close()
	s = openTest(t, dir, Options{Sync: true, BodyFileThreshold: 1000})
	for i, id := range ids {
		if i < 6 && i != 3 {
			continue // delivered
		}
		if got, err := s.Body(id); err != nil || !bytes.Equal(got, bigBody(i, 10_000)) {
			t.Fatalf("message %d: %d bytes, %v", i, len(got), err)
		}
	}
}

func TestRecoveryRemovesBodyFilesNoRecordNeeds(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, dir, Options{Sync: true, BodyFileThreshold: 1000})
	kept := newMessage(s, "a@one.test")
	if err := s.Put(kept, nil, bigBody(0, 5000)); err != nil {
		t.Fatal(err)
	}
	// A body written for a message whose record never committed (a crash
	// between the two), in a file of its own.
	s.bodies.mu.Lock()
	s.bodies.seal(s.bodies.active)
	s.bodies.mu.Unlock()
	if _, err := s.bodies.append(nil, bigBody(1, 5000)); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if n := len(bodyFileNames(t, dir)); n != 2 {
		t.Fatalf("%d body files before the restart, want 2", n)
	}
	s = openTest(t, dir, Options{Sync: true, BodyFileThreshold: 1000})
	waitFor(t, "the orphan file to go", func() bool { return len(bodyFileNames(t, dir)) == 1 })
	if got, err := s.Body(kept.ID); err != nil || !bytes.Equal(got, bigBody(0, 5000)) {
		t.Fatalf("kept message: %d bytes, %v", len(got), err)
	}
}

func TestBodyFileDamageIsReportedNotDelivered(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, dir, Options{Sync: true, BodyFileThreshold: 1000})
	m := newMessage(s, "a@one.test")
	if err := s.Put(m, nil, bigBody(0, 5000)); err != nil {
		t.Fatal(err)
	}
	// A later file, so that the damaged one is not the newest.
	s.bodies.mu.Lock()
	s.bodies.seal(s.bodies.active)
	s.bodies.mu.Unlock()
	if err := s.Put(newMessage(s, "b@one.test"), nil, bigBody(1, 5000)); err != nil {
		t.Fatal(err)
	}
	damage(t, filepath.Join(dir, bodyFilesDir, bodyFileName(1)), 1234)
	if _, err := s.Body(m.ID); err == nil || !strings.Contains(err.Error(), "checksum") {
		t.Fatalf("damaged body read: %v", err)
	}
	// An acknowledged message is kept for the operator, whatever happened
	// to its bytes in an older file.
	s.Close()
	s = openTest(t, dir, Options{Sync: true, BodyFileThreshold: 1000})
	if _, err := s.Get(m.ID); err != nil || s.Count() != 2 {
		t.Fatalf("after a restart: %v, %d messages", err, s.Count())
	}
	if _, err := s.Body(m.ID); err == nil {
		t.Fatal("a damaged body was read")
	}
}

func damage(t *testing.T, name string, at int64) {
	t.Helper()
	f, err := os.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("X"), at); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentLargePutsShareBodyFileSyncs(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, dir, Options{Sync: true, BodyFileThreshold: 1000})
	var wg sync.WaitGroup
	const writers, each = 16, 20
	errs := make(chan error, writers*each)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				m := newMessage(s, "a@one.test")
				body := bigBody(w*each+i, 20_000)
				if err := s.Put(m, nil, body); err != nil {
					errs <- err
					return
				}
				if got, err := s.Body(m.ID); err != nil || !bytes.Equal(got, body) {
					errs <- fmt.Errorf("message %s read back as %d bytes: %v", m.ID, len(got), err)
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
	syncs := s.bodies.syncCount.Load()
	t.Logf("%d body file syncs for %d messages", syncs, writers*each)
	if syncs == 0 || syncs >= writers*each {
		t.Fatalf("%d body file syncs for %d messages: not shared", syncs, writers*each)
	}
}

func TestOldSparseBodyFilesAreEmptied(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{Sync: true, BodyFileThreshold: 1000})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	s.bodies.limit = 25_000 // three messages a file
	var ids []string
	for i := range 7 {
		m := newMessage(s, "a@one.test")
		if err := s.Put(m, nil, bigBody(i, 10_000)); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.ID)
	}
	// File 1 keeps one message of three (sparse), file 2 two of three
	// (not sparse), file 3 is the active one.
	for _, id := range []string{ids[0], ids[1], ids[3]} {
		if err := s.MarkDelivered(id, []Result{{Address: "a@one.test"}}); err != nil {
			t.Fatal(err)
		}
	}
	if got := s.bodies.sparse(time.Now().Add(time.Hour)); len(got) != 1 || !got[1] {
		t.Fatalf("sparse files an hour on: %v, want file 1 only", got)
	}
	if got := s.bodies.sparse(time.Now()); len(got) != 0 {
		t.Fatalf("sparse files now: %v, want none (too young)", got)
	}
	// Restart with a short age and check interval: file 1 is emptied.
	s.Close()
	age, check := sparseFileAge, sparseFileCheck
	sparseFileAge, sparseFileCheck = 0, 10*time.Millisecond
	defer func() { sparseFileAge, sparseFileCheck = age, check }()
	if s, err = Open(dir, Options{Sync: true, BodyFileThreshold: 1000}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the sparse file to go", func() bool {
		_, err := os.Stat(filepath.Join(dir, bodyFilesDir, bodyFileName(1)))
		return os.IsNotExist(err)
	})
	if m, _ := s.Get(ids[2]); m == nil || m.body.File != 0 {
		t.Fatalf("message of the sparse file: %+v", m)
	}
	for i, id := range ids {
		if i == 0 || i == 1 || i == 3 {
			continue
		}
		if got, err := s.Body(id); err != nil || !bytes.Equal(got, bigBody(i, 10_000)) {
			t.Fatalf("message %d: %d bytes, %v", i, len(got), err)
		}
	}
	if names := bodyFileNames(t, dir); len(names) != 2 {
		t.Fatalf("body files %v, want the two that are not sparse", names)
	}
}

// TestDrainedQueueGivesBodyFileSpaceBack: the active file goes once all its
// bodies are done, so that a drained queue does not keep it.
func TestDrainedQueueGivesBodyFileSpaceBack(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, dir, Options{Sync: true, BodyFileThreshold: 1000})
	s.bodies.limit = 80_000 // sealed when unused from 10,000 bytes on
	put := func(i int) string {
		m := newMessage(s, "a@one.test")
		if err := s.Put(m, nil, bigBody(i, 6_000)); err != nil {
			t.Fatal(err)
		}
		return m.ID
	}
	deliver := func(id string) {
		if err := s.MarkDelivered(id, []Result{{Address: "a@one.test"}}); err != nil {
			t.Fatal(err)
		}
	}
	// One small file's worth stays until the spool is short of space.
	deliver(put(0))
	time.Sleep(50 * time.Millisecond)
	if n := len(bodyFileNames(t, dir)); n != 1 {
		t.Fatalf("%d body files after one message, want the active one", n)
	}
	s.bodies.sealIfUnused()
	waitFor(t, "the unused active file to go when space is short", func() bool { return len(bodyFileNames(t, dir)) == 0 })
	// Two messages fill an eighth of the limit: once both are done, the
	// file goes by itself.
	a, b := put(1), put(2)
	deliver(a)
	deliver(b)
	waitFor(t, "the drained active file to go", func() bool { return len(bodyFileNames(t, dir)) == 0 })
	id := put(3)
	if got, err := s.Body(id); err != nil || !bytes.Equal(got, bigBody(3, 6_000)) {
		t.Fatalf("after the drain: %d bytes, %v", len(got), err)
	}
}

// A record whose body is not counted at recovery (its file is too short)
// still releases the file when its message is removed: the live count of
// the file drops below the number of records that need it, and the file
// goes while another acknowledged message still lives in it.
func TestUncountedRecordReleasesNothing(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Sync: true, BodyFileThreshold: 1000}
	s := openTest(t, dir, opts)
	a, b := newMessage(s, "a@one.test"), newMessage(s, "b@one.test")
	if err := s.Put(a, nil, bigBody(0, 5000)); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(b, nil, bigBody(1, 5000)); err != nil {
		t.Fatal(err)
	}
	s.Close()
	// File 1 loses its tail (sync: false and a power cut, or damage): b's
	// bytes are cut short, a's are whole.
	if err := os.Truncate(filepath.Join(dir, bodyFilesDir, bodyFileName(1)), 7000); err != nil {
		t.Fatal(err)
	}
	s = openTest(t, dir, opts)
	if f := s.bodies.files[1]; f.live != 1 {
		t.Fatalf("live %d after recovery, want 1 (a only)", f.live)
	}
	// The operator removes the record without bytes.
	if err := s.Remove(b.ID); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if got, err := s.Body(a.ID); err != nil || !bytes.Equal(got, bigBody(0, 5000)) {
		t.Fatalf("acknowledged message a lost its bytes: %d bytes, %v (files %v)", len(got), err, bodyFileNames(t, dir))
	}
}

// The newest body file is missing at start-up (sync: false and a power
// cut: its directory entry was never synced). Its number must not be given
// to the next new file, or the stale record's removal would release a body
// of the new one.

// The newest body file is missing at start-up (sync: false and a power
// cut: its directory entry was never synced). Its number must not be given
// to the next new file, or the stale record's removal would release a body
// of the new one.
func TestMissingFileNumberIsNotReused(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Sync: true, BodyFileThreshold: 1000}
	s := openTest(t, dir, opts)
	old := newMessage(s, "a@one.test")
	if err := s.Put(old, nil, bigBody(0, 5000)); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if err := os.Remove(filepath.Join(dir, bodyFilesDir, bodyFileName(1))); err != nil {
		t.Fatal(err)
	}
	s = openTest(t, dir, opts)
	fresh := newMessage(s, "b@one.test")
	if err := s.Put(fresh, nil, bigBody(1, 5000)); err != nil {
		t.Fatal(err)
	}
	if m, _ := s.Get(fresh.ID); m.body.File == 1 {
		t.Fatal("the new message went to file 1 again, the number the stale record names")
	}
	if err := s.Remove(old.ID); err != nil {
		t.Fatal(err)
	}
	s.bodies.sealIfUnused() // the spool short of space, as reclaim does
	time.Sleep(200 * time.Millisecond)
	if got, err := s.Body(fresh.ID); err != nil || !bytes.Equal(got, bigBody(1, 5000)) {
		t.Fatalf("acknowledged message lost its bytes: %d bytes, %v", len(got), err)
	}
}

// After one fdatasync of a body file fails with ENOSPC (simulated: the
// sticky error groupSync keeps), the spool reports itself healthy but
// refuses every large message for ever, and keeps writing (and never
// removing) their bodies.

// A record this binary cannot decode (a newer version after a roll-back,
// or damage) is kept for inspection, and so are the body files, any of
// which it may point to.
func TestUnreadableRecordKeepsTheBodyFiles(t *testing.T) {
	dir := t.TempDir()
	opts := Options{Sync: true, BodyFileThreshold: 1000}
	s := openTest(t, dir, opts)
	m := newMessage(s, "a@one.test")
	if err := s.Put(m, nil, bigBody(0, 5000)); err != nil {
		t.Fatal(err)
	}
	var k keyBuf
	v, closer, err := s.db.Get(k.message(m.ID))
	if err != nil {
		t.Fatal(err)
	}
	good := append([]byte(nil), v...)
	closer.Close()
	bad := append([]byte{recordVersion + 1}, good[1:]...)
	if err := s.db.Set(k.message(m.ID), bad, pebble.Sync); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = openTest(t, dir, opts)
	time.Sleep(200 * time.Millisecond)
	if names := bodyFileNames(t, dir); len(names) == 0 {
		t.Fatalf("the body file of a record kept for inspection was removed")
	}
}

// Every proper prefix of a version-5 record with a body file is rejected.

// Every proper prefix of a version-5 record with a body file is rejected.
func TestTruncatedVersion5RecordRejected(t *testing.T) {
	m := &Message{ID: "x", From: "a@b", Size: 123, Metadata: map[string]string{"k": "v"},
		body: bodyLocation{File: 7, Offset: 1 << 40, CRC: 0xdeadbeef}}
	m.Recipients = []RecipientState{{Recipient: mta.Recipient{Address: "r@d"}}}
	enc := m.encode(nil)
	got, err := decodeMessage("x", enc)
	if err != nil || got.body != m.body {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	for n := range len(enc) {
		if _, err := decodeMessage("x", enc[:n]); err == nil {
			t.Fatalf("prefix of %d/%d bytes accepted", n, len(enc))
		}
	}
}

// With Sync false too, the reaper removes a body file only after a WAL sync
// that follows the unsynced commit that moved its last body into Pebble.

// With Sync false too, the reaper removes a body file only after a WAL sync
// that follows the unsynced commit that moved its last body into Pebble.
func TestRemovalWaitsForAWALSyncEvenWithoutSync(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, dir, Options{Sync: false, BodyFileThreshold: 1000})
	s.bodies.limit = 8000
	m := newMessage(s, "a@one.test")
	if err := s.Put(m, nil, bigBody(0, 5000)); err != nil {
		t.Fatal(err)
	}
	before := s.WALSyncs()
	if err := s.Defer(m.ID, "one.test", time.Now().Add(time.Hour), Outcome{Reply: "451 later"}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the file to go", func() bool { return len(bodyFileNames(t, dir)) == 0 })
	if after := s.WALSyncs(); after == before {
		t.Fatalf("body file removed with no WAL sync since the move that released it (%d syncs)", after)
	}
}

// Below the free-space reserve a deferral leaves the bytes in their body
// file: the WAL must not grow there.
func TestNoMoveIntoPebbleBelowTheReserve(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, dir, Options{Sync: true, BodyFileThreshold: 1000})
	m := newMessage(s, "a@one.test")
	if err := s.Put(m, nil, bigBody(0, 500_000)); err != nil {
		t.Fatal(err)
	}
	s.free.reserve = 1 << 62 // the disk is "full"
	if err := s.Room(0); !errors.Is(err, mta.ErrStorageFull) {
		t.Fatal(err)
	}
	if err := s.Defer(m.ID, "one.test", time.Now().Add(time.Hour), Outcome{Reply: "451 later"}); err != nil {
		t.Fatal(err)
	}
	var k keyBuf
	if s.exists(k.body(m.ID)) {
		t.Fatalf("500 KB written to the WAL below the free-space reserve")
	}
	if got, err := s.Body(m.ID); err != nil || !bytes.Equal(got, bigBody(0, 500_000)) {
		t.Fatalf("the deferred message: %d bytes, %v", len(got), err)
	}
}

// Readers race with moves, deliveries, rotation and the reaper: they get
// the bytes or ErrNotFound, never other bytes.

// Readers race with moves, deliveries, rotation and the reaper: they get
// the bytes or ErrNotFound, never other bytes.
func TestReadersRaceMovesAndRemoval(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, dir, Options{Sync: true, BodyFileThreshold: 1000})
	s.bodies.limit = 30_000
	type msg struct {
		id   string
		body []byte
	}
	ch := make(chan msg, 64)
	done := make(chan struct{})
	errs := make(chan error, 100)
	go func() {
		defer close(ch)
		for i := range 300 {
			m := newMessage(s, "a@one.test")
			b := bigBody(i, 6000+i)
			if err := s.Put(m, nil, b); err != nil {
				errs <- err
				return
			}
			ch <- msg{m.ID, b}
		}
	}()
	for w := range 4 {
		go func() {
			defer func() { done <- struct{}{} }()
			for m := range ch {
				stop := make(chan struct{})
				go func() {
					for {
						select {
						case <-stop:
							return
						default:
						}
						got, err := s.AppendBody(nil, m.id)
						if err != nil && !errors.Is(err, mta.ErrNotFound) {
							errs <- err
							return
						}
						if err == nil && !bytes.Equal(got, m.body) {
							errs <- errors.New("wrong bytes for " + m.id)
							return
						}
					}
				}()
				if w%2 == 0 {
					_ = s.Defer(m.id, "one.test", time.Now().Add(time.Hour), Outcome{Reply: "451"})
				}
				_ = s.MarkDelivered(m.id, []Result{{Address: "a@one.test"}})
				close(stop)
			}
		}()
	}
	for range 4 {
		<-done
	}
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	s.bodies.sealIfUnused()
	waitFor(t, "all files to go", func() bool { return len(bodyFileNames(t, dir)) == 0 })
	if n, _ := s.bodies.stats(); n != 0 {
		t.Fatalf("%d files left", n)
	}
}

// TestVersion4RecordsReadAndWritten: a record without a body file is
// written as version 4, which the binaries before body files read.
func TestVersion4RecordsReadAndWritten(t *testing.T) {
	m := &Message{ID: "x", From: "a@b", Size: 123, Metadata: map[string]string{"k": "v"}}
	m.Recipients = []RecipientState{{Recipient: mta.Recipient{Address: "r@d"}}}
	enc := m.encode(nil)
	if enc[0] != 4 {
		t.Fatalf("record without a body file written as version %d", enc[0])
	}
	got, err := decodeMessage("x", enc)
	if err != nil || got.Size != 123 || got.body.File != 0 || got.Metadata["k"] != "v" {
		t.Fatalf("%+v %v", got, err)
	}
	// a v4 record can not carry a body location even if bit 6 were set
	m.body = bodyLocation{File: 1}
	enc = m.encode(nil)
	enc[0] = 4
	if _, err := decodeMessage("x", enc); err == nil {
		t.Fatal("v4 with location fields accepted")
	}
}

func TestMessageLargerThanABodyFile(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, dir, Options{Sync: true, BodyFileThreshold: 1000})
	s.bodies.limit = 100_000
	var ids []string
	for i, n := range []int{1000, 99_999, 300_000, 1000, 5000} {
		m := newMessage(s, "a@one.test")
		if err := s.Put(m, []byte("H: x\r\n"), bigBody(i, n)); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, m.ID)
	}
	for i, n := range []int{1000, 99_999, 300_000, 1000, 5000} {
		got, err := s.Body(ids[i])
		if err != nil || !bytes.Equal(got, append([]byte("H: x\r\n"), bigBody(i, n)...)) {
			t.Fatalf("%d: %v", i, err)
		}
	}
}

func TestCorruptSizeIsAnErrorNotAPanic(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, dir, Options{Sync: true, BodyFileThreshold: 1000})
	m := newMessage(s, "a@one.test")
	if err := s.Put(m, nil, bigBody(0, 5000)); err != nil {
		t.Fatal(err)
	}
	got, _ := s.Get(m.ID)
	got.Size = -5 // a damaged record
	var k keyBuf
	if err := s.db.Set(k.message(m.ID), got.encode(nil), pebble.Sync); err != nil {
		t.Fatal(err)
	}
	s.fresh.drop(m.ID) // written past the spool, which would drop it itself
	defer func() {
		if r := recover(); r != nil {
			t.Fatalf("AppendBody panicked: %v", r)
		}
	}()
	if _, err := s.Body(m.ID); err == nil {
		t.Fatal("a body of -5 bytes was read")
	}
}

// TestFailedBodySyncBreaksTheSpool: a failed fdatasync of a body file, even
// with ENOSPC, stops the spool: what the kernel could not write may be gone
// from its cache too. Nothing is acknowledged, and the spool says why.
func TestFailedBodySyncBreaksTheSpool(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, dir, Options{Sync: true, BodyFileThreshold: 1000})
	s.bodies.syncs.mu.Lock()
	s.bodies.syncs.err = fmt.Errorf("spool: syncing a body file: %w", syscall.ENOSPC)
	s.bodies.syncs.mu.Unlock()
	m := newMessage(s, "a@one.test")
	if err := s.Put(m, nil, bigBody(0, 5000)); err == nil {
		t.Fatal("a message was stored though its bytes could not be synced")
	}
	if _, err := s.Get(m.ID); !errors.Is(err, mta.ErrNotFound) {
		t.Fatalf("its record: %v", err)
	}
	if err := s.Healthy(); err == nil || !strings.Contains(err.Error(), "body file") {
		t.Fatalf("spool health after a failed body sync: %v", err)
	}
	if err := s.Put(newMessage(s, "a@one.test"), nil, []byte("small\r\n")); err == nil {
		t.Fatal("a broken spool took a message")
	}
}
