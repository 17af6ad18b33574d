package spool

import (
	"fmt"
	"sync"
	"syscall"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"go.uber.org/zap"
)

// freeSpace caches the free space of the spool's file system, as statfs
// reports it to an unprivileged writer. It is read at most every
// freeSpaceTTL, not per message.
//
// Space Pebble has preallocated for its WAL is not counted as free: only
// the WAL can fill it, and what the reserve must keep is room for what
// Pebble writes outside it (see pebbleHeadroom).
//
// Bytes admitted since the last statfs are subtracted from it (admit), so
// that the writes of one window cannot together overrun the reserve that
// each checked alone. A statfs may or may not see the bytes admitted just
// before it; they are subtracted through the next window too, which errs
// on the side of a 452.
type freeSpace struct {
	dir      string
	reserve  int64 // what writes must leave free
	mu       sync.Mutex
	checked  time.Time
	bytes    int64    // statfs, as last checked
	admitted [2]int64 // bytes admitted since that check, and in the window before it
}

const freeSpaceTTL = 250 * time.Millisecond

// short reports whether size more bytes would leave less than the reserve.
// If statfs fails, it reports false: the write itself will then say.
func (f *freeSpace) short(size int64, now time.Time) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.shortLocked(size, now)
}

// admit is short for a write about to happen: if size bytes fit above the
// reserve, it counts them as written until statfs has had time to see
// them, and reports true.
func (f *freeSpace) admit(size int64, now time.Time) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.shortLocked(size, now) {
		return false
	}
	f.admitted[0] += size
	return true
}

// shortLocked is short with f.mu held.
func (f *freeSpace) shortLocked(size int64, now time.Time) bool {
	need := f.reserve + size
	return need > 0 && f.usable(now) < need
}

// get returns the free space statfs reported last.
func (f *freeSpace) get(now time.Time) int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.refresh(now)
	return f.bytes
}

// usable is the free space less what was admitted since; f.mu is held.
func (f *freeSpace) usable(now time.Time) int64 {
	f.refresh(now)
	return f.bytes - f.admitted[0] - f.admitted[1]
}

// refresh calls statfs if the last figure is older than freeSpaceTTL;
// f.mu is held.
func (f *freeSpace) refresh(now time.Time) {
	age := now.Sub(f.checked)
	if age >= 0 && age < freeSpaceTTL && !f.checked.IsZero() {
		return
	}
	f.admitted[1], f.admitted[0] = f.admitted[0], 0
	if age < 0 || age >= 2*freeSpaceTTL { // a clock set back counts as long ago
		f.admitted[1] = 0 // written long enough ago for statfs to show
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(f.dir, &st); err != nil {
		f.bytes = 1 << 62
	} else {
		f.bytes = int64(st.Bavail) * int64(st.Bsize)
	}
	f.checked = now
}

// pebbleHeadroom is the least free space the spool keeps, whatever
// Options.MinFreeSpace says: a failed WAL write is fatal to Pebble, so
// after the last message it accepts there must still be room for the next
// WAL file (Pebble preallocates 110 % of the memtable), for the table a
// flush of the memtable writes, and for the start of a compaction.
func pebbleHeadroom(memTable uint64) int64 { return 3 * int64(memTable) }

// DefaultMemTableSize is the memtable size when Options.MemTableSize is
// zero. Pebble keeps a used memtable for reuse beside the active one, so
// the spool's resident memory is about twice this; 16 MiB keeps an mta
// with a million messages queued near 100 MiB. Since large bodies live in
// body files, a larger memtable no longer buys throughput (docs/spool.md).
const DefaultMemTableSize = 16 << 20

// memTableSize sizes the memtable: want (DefaultMemTableSize if zero), so
// that mail delivered soon is deleted before it is ever flushed, but no
// more than a 64th of the spool's file system, as each WAL file
// preallocates 110 % of it; at least 4 MiB.
func memTableSize(dir string, want uint64) uint64 {
	if want == 0 {
		want = DefaultMemTableSize
	}
	return volumeShare(dir, want, 4<<20)
}

// volumeShare returns want, but no more than a 64th of the file system of
// dir, and at least least.
func volumeShare(dir string, want, least uint64) uint64 {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return want
	}
	return min(want, max(least, uint64(st.Blocks)*uint64(st.Bsize)/64))
}

// pebbleFatal is what pebbleLogger.Fatalf panics with, so that commit can
// recover it and break the spool instead of exiting the process.
type pebbleFatal string

// pebbleLogger routes Pebble's log to zap.
type pebbleLogger struct{ s *Spool }

func (l pebbleLogger) Infof(format string, args ...any) {
	l.s.log.Sugar().Debugf("pebble: "+format, args...)
}

func (l pebbleLogger) Errorf(format string, args ...any) {
	l.s.log.Sugar().Errorf("pebble: "+format, args...)
}

func (l pebbleLogger) Fatalf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	l.s.log.Error("pebble fatal error", zap.String("error", msg))
	panic(pebbleFatal(msg))
}

// outcomeSyncDelay bounds how long an unsynced outcome waits for an fsync
// when no acceptance comes along to sync it.
const outcomeSyncDelay = 100 * time.Millisecond

// syncSoon arranges one WAL sync within outcomeSyncDelay, for outcomes
// committed without one.
func (s *Spool) syncSoon() {
	if !s.opts.Sync || !s.syncPending.CompareAndSwap(false, true) {
		return
	}
	time.AfterFunc(outcomeSyncDelay, func() {
		s.syncPending.Store(false)
		s.closeMu.RLock()
		defer s.closeMu.RUnlock()
		if s.closed || s.Healthy() != nil {
			return
		}
		// A fatal WAL error here is caught like any other commit's.
		b := s.db.NewBatch()
		defer b.Close()
		_ = b.LogData(nil, nil)
		_ = s.commitWith(b, "sync", pebble.Sync)
	})
}
