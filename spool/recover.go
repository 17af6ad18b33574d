package spool

import (
	"errors"
	"fmt"

	"github.com/cockroachdb/pebble/v2"
	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
)

// recover runs once at Open. Batches make every transition atomic, so a
// crash cannot leave half a message; recovery still checks the invariants
// rather than trusting them, because a spool outlives the code that wrote it:
//   - every message with queued recipients that is not held has its due
//     entries (a missing one is re-added, due at its recorded time);
//   - every due entry points at a message (a dangling one is deleted);
//   - every message has its bytes, under b/<id> or in the body file its
//     record names (a record without them is logged; it is kept so that an
//     operator can see and remove it);
//   - body files that no record points to are removed (by the reaper, once
//     Open returns): they hold bodies whose records never committed, or
//     whose messages were done just before the crash.
func (s *Spool) recover() error {
	var n int64
	repaired, missingBody := 0, 0
	b := s.db.NewBatch()
	defer func() { b.Close() }()
	flush := func() error {
		if b.Empty() {
			return nil
		}
		if err := b.Commit(pebble.Sync); err != nil {
			return fmt.Errorf("spool: recover: %w", err)
		}
		b.Close()
		b = s.db.NewBatch()
		return nil
	}
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte(prefixMessage), UpperBound: []byte(prefixEnd(prefixMessage))})
	if err != nil {
		return fmt.Errorf("spool: recover: %w", err)
	}
	var k keyBuf
	for ok := it.First(); ok; ok = it.Next() {
		n++
		id := string(it.Key()[len(prefixMessage):])
		v, err := it.ValueAndErr()
		if err != nil {
			it.Close()
			return fmt.Errorf("spool: recover: %w", err)
		}
		m, err := decodeMessage(id, v)
		if err != nil {
			s.log.Error("spool: unreadable message record kept for inspection", zap.String("id", id), zap.Error(err))
			// It may point into any body file: keep them all this run.
			s.bodies.pinAll()
			continue
		}
		var hasBody bool
		if m.body.File != 0 {
			hasBody = s.bodies.count(m.body, m.Size)
		} else {
			hasBody = s.exists(k.body(id))
		}
		if !hasBody {
			missingBody++
			s.log.Error("spool: message record without its bytes", zap.String("id", id))
		}
		if m.Done() && len(s.finished) < maxFinished {
			s.finished = append(s.finished, id)
		}
		if m.Held {
			continue
		}
		for i := range m.Recipients {
			r := &m.Recipients[i]
			if r.Status != Queued {
				continue
			}
			key := k.due(r.NextAttempt, id, r.Domain)
			if !s.exists(key) {
				_ = b.Set(key, nil, nil)
				repaired++
			}
		}
		if b.Len() > 1<<20 {
			if err := flush(); err != nil {
				it.Close()
				return err
			}
		}
	}
	if err := errors.Join(it.Error(), it.Close()); err != nil {
		return fmt.Errorf("spool: recover: %w", err)
	}
	dangling, err := s.dropDangling(b)
	if err != nil {
		return err
	}
	if err := flush(); err != nil {
		return err
	}
	s.count.Store(n)
	s.log.Info("spool recovered", zap.String("dir", s.dir), zap.Int64("messages", n),
		zap.Int("due_entries_repaired", repaired), zap.Int("dangling_due_entries_removed", dangling),
		zap.Int("records_without_bytes", missingBody), zap.Int("body_files", len(s.bodies.files)))
	return nil
}

// dropDangling adds to b the deletion of due entries that no queued, unheld
// recipient stands behind: their message is gone, held, or due at another
// time for that domain.
func (s *Spool) dropDangling(b *pebble.Batch) (int, error) {
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte(prefixDue), UpperBound: []byte(prefixEnd(prefixDue))})
	if err != nil {
		return 0, fmt.Errorf("spool: recover: %w", err)
	}
	defer it.Close()
	n := 0
	var last *Message
	for ok := it.First(); ok; ok = it.Next() {
		e, err := parseDue(it.Key())
		if err == nil && (last == nil || last.ID != e.ID) {
			last, err = s.Get(e.ID)
		}
		if err != nil || !backs(last, e) {
			_ = b.Delete(it.Key(), nil)
			n++
		}
	}
	return n, it.Error()
}

// backs reports whether message m has a queued recipient of e's domain,
// not held, due at e's time.
func backs(m *Message, e DueEntry) bool {
	if m == nil || m.Held {
		return false
	}
	for i := range m.Recipients {
		r := &m.Recipients[i]
		if r.Status == Queued && r.Domain == e.Domain && r.NextAttempt.Equal(e.Due) {
			return true
		}
	}
	return false
}

func (s *Spool) exists(key []byte) bool {
	_, closer, err := s.db.Get(key)
	if err != nil {
		return false
	}
	closer.Close()
	return true
}

// maxFinished bounds the finished messages recovery remembers for
// SettleFinished; the rest are found at the next start.
const maxFinished = 100_000

// SettleFinished removes the messages recovery found with no recipient
// left queued: before bounces existed, a message with failed recipients
// was kept for the bounce it was owed. Each gets that bounce now, through
// the Notifier, in the batch that removes it. Call it once, after Open,
// when the Notifier can run. It returns how many it removed.
func (s *Spool) SettleFinished() (int, error) {
	ids := s.finished
	s.finished = nil
	n := 0
	for _, id := range ids {
		err := s.update("settle", id, func(m *Message, b *pebble.Batch) (*Transition, error) {
			t := &Transition{}
			for i := range m.Recipients {
				if m.Recipients[i].Status == Failed {
					t.Changed = append(t.Changed, i)
				}
			}
			return t, nil
		})
		if err != nil && !errors.Is(err, mta.ErrNotFound) {
			return n, err
		}
		n++
	}
	return n, nil
}
