package spool

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/mtaproject/mta/mta"
)

// tmpfs mounts a tmpfs of size for the test, or skips.
func tmpfs(t *testing.T, size string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "vol")
	os.MkdirAll(dir, 0o755)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a small tmpfs (needs root): %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	return dir
}

// TestCloseOnAFileSystemFilledByOthers: another process fills the file
// system; the spool refuses mail with ErrStorageFull and asks Pebble for a
// flush that can never write its table. Close must still return.
func TestCloseOnAFileSystemFilledByOthers(t *testing.T) {
	vol := tmpfs(t, "32m")
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
