package spool

import (
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/mtaproject/mta/mta"
)

// LeaseItem names the queued recipients of one domain of one message and
// the time they become due.
type LeaseItem struct {
	ID     string
	Domain string
	At     time.Time
	Reply  string // if set, recorded as the recipients' last reply (why they wait)
	// Received is set by Lease on the items it returns: when the message
	// was accepted.
	Received time.Time
	// Priority is set by Lease too: the message's lane, so that work the
	// scan finds (retries, after a restart) keeps it.
	Priority mta.Priority
	// Was, if set, is the due time the item was read at: the item is
	// leased only if its recipients are still due then. A worker that
	// deferred them meanwhile (between the scan and this batch) wins, and
	// the item is left out.
	Was time.Time
}

// Lease makes the queued recipients of each (ID, Domain) due at its At,
// without counting an attempt, for all items in one batch. The scheduler
// uses it to write the next attempt time before an attempt, and to
// postpone the work of a backed-off destination. Messages that are gone or
// held are skipped; Lease returns the items it moved.
func (s *Spool) Lease(items []LeaseItem) ([]LeaseItem, error) {
	if err := s.Healthy(); err != nil {
		return nil, err
	}
	if len(items) == 0 {
		return nil, nil
	}
	// Lock every stripe involved, in order, for the whole batch.
	stripes := map[uint8]bool{}
	for _, it := range items {
		stripes[stripe(it.ID)] = true
	}
	order := make([]int, 0, len(stripes))
	for st := range stripes {
		order = append(order, int(st))
	}
	sort.Ints(order)
	for _, st := range order {
		s.locks[st].Lock()
	}
	defer func() {
		for _, st := range order {
			s.locks[st].Unlock()
		}
	}()

	b := s.db.NewBatch()
	defer b.Close()
	changed := map[string]*Message{}
	var leased []LeaseItem
	var notices []*Notice
	var noticeDomains [][]string
	now := s.opts.Now()
	var k keyBuf
	for _, it := range items {
		m := changed[it.ID]
		if m == nil {
			var err error
			m, err = s.Get(it.ID)
			if errors.Is(err, mta.ErrNotFound) {
				continue
			}
			if err != nil {
				return nil, err
			}
			if m.Held {
				continue
			}
			changed[it.ID] = m
		}
		if !it.Was.IsZero() && movedSince(m, it.Domain, it.Was) {
			continue
		}
		it.Received, it.Priority = m.Received, m.Priority
		leased = append(leased, it)
		t := &Transition{}
		for i := range m.Recipients {
			r := &m.Recipients[i]
			if r.Status == Queued && r.Domain == it.Domain {
				_ = b.Delete(k.due(r.NextAttempt, m.ID, r.Domain), nil)
				r.NextAttempt = it.At
				if it.Reply != "" {
					r.record(Outcome{Reply: it.Reply})
					t.Changed = append(t.Changed, i)
				}
			}
		}
		// Postponed work waits as deferred work does: it may owe a delay
		// notice (a destination that stays backed off makes no attempts).
		if s.opts.Notifier != nil && len(t.Changed) > 0 {
			t.Message, t.Now = m, now
			id := m.ID
			n, err := s.opts.Notifier(t, func() ([]byte, error) { return s.Body(id) })
			if err != nil {
				return nil, fmt.Errorf("spool: lease %s: making its notice: %w", id, err)
			}
			if n != nil {
				notices = append(notices, n)
				noticeDomains = append(noticeDomains, s.addNotice(b, n, now))
			}
		}
	}
	for _, m := range changed {
		s.fresh.drop(m.ID) // the record changes (see freshRecords)
		setDue(b, m)
		_ = b.Set(k.message(m.ID), m.encode(nil), nil)
	}
	if err := s.commit(b, "lease"); err != nil {
		return nil, err
	}
	for i, n := range notices {
		s.noticeCommitted(n, noticeDomains[i])
	}
	return leased, nil
}

// movedSince reports whether a queued recipient of domain in m is no
// longer due at was: something rescheduled it after the scan read it.
func movedSince(m *Message, domain string, was time.Time) bool {
	for _, r := range m.Recipients {
		if r.Status == Queued && r.Domain == domain && r.NextAttempt.UnixNano() != was.UnixNano() {
			return true
		}
	}
	return false
}
