package spool

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

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
