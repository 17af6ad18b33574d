package spool

import (
	"context"
	"fmt"
	"time"
)

// State returns the queue state of m: held, deferred (some queued
// recipient was tried or postponed) or queued (waiting for its first
// attempt).
func (m *Message) State() string {
	if m.Held {
		return "held"
	}
	for _, r := range m.Recipients {
		if r.Status == Queued && (r.Attempts > 0 || r.LastReply != "") {
			return "deferred"
		}
	}
	return "queued"
}

// Census calls fn with the state (see Message.State) and arrival time of
// each message in the spool, up to limit of them, in ID order, and
// returns how many it counted. It reads every record but copies none of
// its strings, so that counting a deep queue (the queue metrics do, every
// 30 s) costs a fraction of what List's decoding does. It stops, with
// ctx's error, when ctx ends.
func (s *Spool) Census(ctx context.Context, limit int, fn func(state string, received time.Time)) (int, error) {
	n := 0
	var m *Message // reused for every record
	err := s.eachRecord("census", "", func(id, rec []byte) (bool, error) {
		if n == limit {
			return false, nil
		}
		if n%1024 == 0 && ctx.Err() != nil {
			return false, ctx.Err()
		}
		var err error
		if m, err = decodeRecord(decoder{b: rec, census: true}, "", m); err != nil {
			return false, fmt.Errorf("spool: census of %s: %w", id, err)
		}
		fn(m.State(), m.Received)
		n++
		return true, nil
	})
	return n, err
}
