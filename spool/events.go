package spool

import (
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/cockroachdb/pebble/v2"
)

// Events waiting for a webhook live in the spool's database, in order:
//
//	w/<webhook>\x00<sequence, 8 bytes big-endian> → the event as JSON
//
// They are written without waiting for a sync: like delivery outcomes,
// they reach the disk with the next synced commit (the WAL is ordered),
// and a lost one after a crash is an event, never a message.
const prefixEvents = "w/"

// StoredEvent is one queued event.
type StoredEvent struct {
	Seq  uint64
	Data []byte
}

func eventKey(hook string, seq uint64) []byte {
	return binary.BigEndian.AppendUint64([]byte(prefixEvents+hook+"\x00"), seq)
}

func validHook(hook string) error {
	if hook == "" || strings.ContainsAny(hook, "\x00/") {
		return fmt.Errorf("spool: invalid webhook name %q", hook)
	}
	return nil
}

// AppendEvents queues events for hook under the given sequence numbers
// (increasing), in one batch.
func (s *Spool) AppendEvents(hook string, events []StoredEvent) error {
	if err := validHook(hook); err != nil {
		return err
	}
	b := s.db.NewBatch()
	defer b.Close()
	for _, e := range events {
		_ = b.Set(eventKey(hook, e.Seq), e.Data, nil)
	}
	return s.commitWith(b, "events", pebble.NoSync)
}

// Events returns up to limit of hook's queued events, oldest first.
func (s *Spool) Events(hook string, limit int) ([]StoredEvent, error) {
	if err := validHook(hook); err != nil {
		return nil, err
	}
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: eventKey(hook, 0), UpperBound: []byte(prefixEvents + hook + "\x01")})
	if err != nil {
		return nil, err
	}
	defer it.Close()
	var out []StoredEvent
	for ok := it.First(); ok && len(out) < limit; ok = it.Next() {
		k := it.Key()
		out = append(out, StoredEvent{Seq: binary.BigEndian.Uint64(k[len(k)-8:]), Data: append([]byte(nil), it.Value()...)})
	}
	return out, it.Error()
}

// DeleteEvents removes hook's events up to and including seq.
func (s *Spool) DeleteEvents(hook string, seq uint64) error {
	if err := validHook(hook); err != nil {
		return err
	}
	b := s.db.NewBatch()
	defer b.Close()
	_ = b.DeleteRange(eventKey(hook, 0), eventKey(hook, seq+1), nil)
	return s.commitWith(b, "events", pebble.NoSync)
}

// EventBacklog returns how many events hook has queued, their bytes and
// the last sequence number (0 when none), for a restart.
func (s *Spool) EventBacklog(hook string) (n int, bytes int64, last uint64, err error) {
	if err := validHook(hook); err != nil {
		return 0, 0, 0, err
	}
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: eventKey(hook, 0), UpperBound: []byte(prefixEvents + hook + "\x01")})
	if err != nil {
		return 0, 0, 0, err
	}
	defer it.Close()
	for ok := it.First(); ok; ok = it.Next() {
		n++
		bytes += int64(len(it.Value()))
		k := it.Key()
		last = binary.BigEndian.Uint64(k[len(k)-8:])
	}
	return n, bytes, last, it.Error()
}
