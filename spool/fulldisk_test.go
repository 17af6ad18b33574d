package spool

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/mtaproject/mta/internal/testvol"
	"github.com/mtaproject/mta/mta"
)

// TestCloseOnAFileSystemFilledByOthers: another process fills the file
// system; the spool refuses mail with ErrStorageFull and asks Pebble for a
// flush that can never write its table. Close must still return.
func TestCloseOnAFileSystemFilledByOthers(t *testing.T) {
	vol := testvol.Tmpfs(t, "32m")
	s, err := Open(filepath.Join(vol, "spool"), Options{Sync: true, MemTableSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		if err := s.Put(newMessage(s, "a@one.test"), nil, bigBody(0, 2000)); err != nil {
			t.Fatal(err)
		}
	}
	filler, err := os.Create(filepath.Join(vol, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	for chunk := make([]byte, 1<<20); ; {
		if _, err := filler.Write(chunk); err != nil {
			break
		}
	}
	filler.Write(make([]byte, 4096)) // the last partial megabyte
	filler.Close()
	time.Sleep(2 * freeSpaceTTL)
	if err := s.Room(1000); !errors.Is(err, mta.ErrStorageFull) {
		t.Fatalf("Room on a full file system: %v", err)
	}
	time.Sleep(500 * time.Millisecond) // the reclaim's flush is under way
	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	select {
	case <-closed:
	case <-time.After(20 * time.Second):
		t.Fatal("Close still waiting 20 s after the spool ran out of space")
	}
}

// TestPutsInOneWindowShareTheReserve: free space is read at most every
// 250 ms, so the messages admitted within one window must be subtracted
// from it; otherwise large messages together overrun the reserve that each
// checked alone, and the small WAL writes after them break the spool.
func TestPutsInOneWindowShareTheReserve(t *testing.T) {
	vol := testvol.Tmpfs(t, "160m")
	s, err := Open(filepath.Join(vol, "spool"), Options{Sync: true,
		BodyFileThreshold: 32 << 10, MemTableSize: 4 << 20, MinFreeSpace: 40 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	body := bigBody(1, 3<<20)
	accepted := 0
	for s.Put(newMessage(s, "a@one.test"), nil, body) == nil {
		accepted++
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(vol, &st); err != nil {
		t.Fatal(err)
	}
	// Pebble's own files (a new WAL file, a flushed table) may take some
	// of the reserve: that is what it is for. The messages must not.
	if free := int64(st.Bavail) * int64(st.Bsize); free < s.Reserve()/2 {
		t.Errorf("after %d messages of 3 MB: %d MiB free, far under the %d MiB reserve", accepted, free>>20, s.Reserve()>>20)
	}
	for i := range 3000 {
		if err := s.Put(newMessage(s, "a@one.test"), nil, bigBody(i, 2000)); err != nil && !errors.Is(err, mta.ErrStorageFull) {
			t.Fatalf("small message %d after the large ones: %v", i, err)
		}
	}
}

// TestAdmittedBytesCountUntilStatfsSeesThem: what admit lets through is
// subtracted from the cached free space in its window and the next one,
// then forgotten (statfs shows it by then).
func TestAdmittedBytesCountUntilStatfsSeesThem(t *testing.T) {
	f := &freeSpace{dir: t.TempDir()}
	now := time.Unix(1_000_000, 0)
	f.reserve = f.get(now) - 100<<20 // 100 MiB above the reserve; 20 MiB of drift is tolerated
	if !f.admit(40<<20, now) || !f.admit(40<<20, now) {
		t.Fatal("80 of 100 MiB refused")
	}
	if f.admit(40<<20, now) {
		t.Fatal("120 of 100 MiB admitted in one window")
	}
	if f.admit(40<<20, now.Add(freeSpaceTTL)) {
		t.Fatal("the previous window's bytes forgotten at the next statfs")
	}
	if !f.admit(40<<20, now.Add(3*freeSpaceTTL)) {
		t.Fatal("bytes admitted two windows ago still counted")
	}
}

// TestPebbleKeepsItsHeadroomUnderATinyReserve: with a 1 MiB reserve
// configured, large messages fill a small volume through body files, then
// small ones fill the WAL until Pebble starts a new one. Without the
// three-memtable floor the new WAL file finds no room and a WAL write
// breaks the spool; with it, the small messages get ErrStorageFull at
// worst.
func TestPebbleKeepsItsHeadroomUnderATinyReserve(t *testing.T) {
	vol := testvol.Tmpfs(t, "48m")
	s, err := Open(filepath.Join(vol, "spool"), Options{Sync: true,
		BodyFileThreshold: 32 << 10, MemTableSize: 4 << 20, MinFreeSpace: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for s.Put(newMessage(s, "a@one.test"), nil, bigBody(1, 200_000)) == nil {
	}
	done := make(chan error, 1)
	go func() {
		for i := range 20000 { // 40 MB of WAL: at least one new WAL file
			if err := s.Put(newMessage(s, "a@one.test"), nil, bigBody(i, 2000)); err != nil && !errors.Is(err, mta.ErrStorageFull) {
				done <- fmt.Errorf("small message %d: %w", i, err)
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("small messages still being stored after 60 s: Pebble's writes stalled")
	}
}
