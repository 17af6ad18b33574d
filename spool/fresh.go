package spool

import (
	"maps"
	"slices"
	"sync"
)

// freshLimit bounds the records freshRecords keeps, about 0.5 MiB: more
// than the mail in flight when delivery keeps up with acceptance (the
// case it is for), little beside the memtables when a backlog fills it
// with mail that waits.
const freshLimit = 1024

// freshRecords keeps the record of each message accepted recently, as it
// was stored, until the record first changes. Most mail is delivered at
// its first attempt, and that delivery reads the record twice (the
// scheduler to send it, MarkDelivered to change it): both then take it
// from here instead of searching Pebble's memtable and decoding it.
//
// An entry is always the stored record: it is added by PutAll before the
// batch that stores the message is committed (nobody knows the queue ID
// before PutAll returns, and a failed commit removes it again), and every
// other write of the record (update, lease) drops it, under the message's
// stripe lock, before its batch is committed. A full cache takes no new
// entries; the records it misses are read from Pebble as before.
type freshRecords struct {
	mu   sync.Mutex
	byID map[string]*Message
}

// add keeps the record of m, encoded as rec, if there is room and m will
// be attempted soon. What is kept is rec decoded, exactly what a read from
// Pebble would return (times without a monotonic reading, for example).
func (f *freshRecords) add(m *Message, rec []byte) {
	if m.Held {
		return // waits for an operator: it would only take a place
	}
	f.mu.Lock()
	full := len(f.byID) >= freshLimit
	f.mu.Unlock()
	if full {
		return
	}
	c, err := decodeMessage(m.ID, rec)
	if err != nil {
		return // read from Pebble, where the same error will be reported
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.byID == nil {
		f.byID = make(map[string]*Message)
	}
	if len(f.byID) < freshLimit {
		f.byID[m.ID] = c
	}
}

// get returns a copy of the record of id that the caller may change, or
// nil when there is none.
func (f *freshRecords) get(id string) *Message {
	f.mu.Lock()
	m := f.byID[id]
	f.mu.Unlock()
	if m == nil {
		return nil
	}
	return m.clone()
}

// drop forgets the record of id: it is about to change.
func (f *freshRecords) drop(id string) {
	f.mu.Lock()
	delete(f.byID, id)
	f.mu.Unlock()
}

// clone returns a copy of m that shares nothing that either may change.
func (m *Message) clone() *Message {
	c := *m
	c.Recipients = slices.Clone(m.Recipients)
	c.Metadata = maps.Clone(m.Metadata)
	return &c
}
