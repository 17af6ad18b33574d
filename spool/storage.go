package spool

import (
	"fmt"
	"sync"
	"syscall"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"go.uber.org/zap"
)

// freeSpace caches the free space of the spool's file system; statfs is
// called at most every freeSpaceTTL, not once per message.
type freeSpace struct {
	dir     string
	mu      sync.Mutex
	checked time.Time
	bytes   int64
}

const freeSpaceTTL = 250 * time.Millisecond

// below reports whether the file system has less than need bytes free.
// If statfs fails, it reports false: the write itself will then say.
func (f *freeSpace) below(need int64, now time.Time) bool {
	if need <= 0 {
		return false
	}
	return f.get(now) < need
}

func (f *freeSpace) get(now time.Time) int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if now.Sub(f.checked) < freeSpaceTTL && !f.checked.IsZero() {
		return f.bytes
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(f.dir, &st); err != nil {
		f.bytes = 1 << 62
	} else {
		f.bytes = int64(st.Bavail) * int64(st.Bsize)
	}
	f.checked = now
	return f.bytes
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
