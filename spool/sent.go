package spool

import (
	"encoding/json"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// Messages sent with a VERP return path leave a record behind, so that a
// bounce or complaint that arrives days after the message left the queue
// can still be matched to its tenant, recipient and metadata:
//
//	v/<queue id> → JSON SentRecord
//
// Queue IDs sort by time, so ExpireSent drops the old ones with one range
// deletion.
const prefixSent = "v/"

// SentRecord is what a later bounce is matched with.
type SentRecord struct {
	Tenant    string            `json:"tenant"`
	Recipient string            `json:"recipient"`
	MessageID string            `json:"message_id,omitempty"`
	Metadata  map[string]string `json:"metadata,omitempty"`
	Sent      time.Time         `json:"sent"`
}

func sentKey(id string) []byte { return []byte(prefixSent + id) }

// Sent returns the record of message id, or mta.ErrNotFound.
func (s *Spool) Sent(id string) (*SentRecord, error) {
	var r SentRecord
	if err := s.read(sentKey(id), id, func(v []byte) error { return json.Unmarshal(v, &r) }); err != nil {
		return nil, err
	}
	return &r, nil
}

// ExpireSent removes the records of messages accepted before t.
func (s *Spool) ExpireSent(t time.Time) error {
	b := s.db.NewBatch()
	defer b.Close()
	_ = b.DeleteRange(sentKey(""), sentKey(IDAt(t)), nil)
	return s.commitWith(b, "expire_sent", pebble.NoSync)
}

// IDAt is the smallest queue ID NewID can give at t: every ID made before
// t sorts below it.
func IDAt(t time.Time) string { return encodeID(uint64(t.UnixMilli()), 0) }
