package spool

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"strings"

	"github.com/cockroachdb/pebble/v2"

	"github.com/mtaproject/mta/mta"
)

// Mailboxes live in the spool's database, so that a local delivery is one
// batch with the recipient's delivered state:
//
//	x/<mailbox>\x00<uid> → the message as delivered (trace header first)
//	y/<mailbox>\x00<uid> → its size, uvarint: the index STAT and LIST read
//
// The UID of a message is the queue ID it was delivered from and a tag of
// the recipient domain (a message to aliases of one user in two local
// domains is two deliveries, so two copies): unique, stable, in arrival
// order, and the same if a delivery is repeated, so a repeat overwrites
// instead of doubling.
const (
	prefixMailbox      = "x/"
	prefixMailboxIndex = "y/"
)

// MailboxMessage is one message in a mailbox.
type MailboxMessage struct {
	UID  string
	Size int64 // octets, CRLF line endings counted
}

// LocalCopy is one copy of a queued message for one mailbox.
type LocalCopy struct {
	Mailbox string
	// Recipients are the addresses this copy delivers (several aliases may
	// share a mailbox: they get one copy).
	Recipients []string
	// Header is prepended to the stored message (Return-Path,
	// Delivered-To).
	Header []byte
	// Body, when not nil, is the message as it goes into the mailbox
	// (local delivery dropped fields of its header); nil: as queued.
	Body []byte
}

// mailboxUID is the UID of message id delivered for domain: the queue ID,
// a dot and 8 hex digits of the domain (25 printable characters).
func mailboxUID(id, domain string) string {
	h := fnv.New32a()
	h.Write([]byte(strings.ToLower(domain)))
	return fmt.Sprintf("%s.%08x", id, h.Sum32())
}

func mailboxKey(prefix, mailbox, uid string) []byte {
	return []byte(prefix + mailbox + "\x00" + uid)
}

func validMailbox(name string) error {
	if name == "" || strings.ContainsAny(name, "\x00/") {
		return fmt.Errorf("spool: invalid mailbox name %q", name)
	}
	return nil
}

// DeliverLocal stores copies of message id in their mailboxes and marks
// their recipients delivered, in one synced batch: a crash leaves the
// message queued (and the delivery is made again, to the same UIDs) or
// delivered and stored, never one without the other. Short of free space
// (the reserve of Put) it returns mta.ErrStorageFull and stores nothing.
func (s *Spool) DeliverLocal(id string, copies []LocalCopy) error {
	for _, c := range copies {
		if err := validMailbox(c.Mailbox); err != nil {
			return err
		}
	}
	now := s.opts.Now()
	return s.update("deliver_local", id, func(m *Message, b *pebble.Batch) (*Transition, error) {
		body, err := s.Body(id)
		if err != nil {
			return nil, err
		}
		// The copies are new data, like an accepted message: they must
		// leave the free-space reserve alone (a full WAL is fatal).
		need := int64(0)
		for _, c := range copies {
			need += int64(len(c.Header) + len(c.bytes(body)))
		}
		if !s.admit(need) {
			s.reclaim()
			return nil, mta.ErrStorageFull
		}
		deleteDue(b, m)
		t := &Transition{Local: true}
		for _, c := range copies {
			delivers := false
			for i := range m.Recipients {
				r := &m.Recipients[i]
				if r.Status == Queued && contains(c.Recipients, r.Address) {
					r.Status = Delivered
					r.Attempts++
					r.LastAttempt = now
					r.record(Outcome{Reply: "250 2.0.0 delivered to mailbox " + c.Mailbox})
					t.Changed = append(t.Changed, i)
					delivers = true
				}
			}
			if !delivers {
				continue
			}
			msg := c.bytes(body)
			size := int64(len(c.Header) + len(msg))
			uid := mailboxUID(id, mta.Domain(c.Recipients[0]))
			op := b.SetDeferred(len(mailboxKey(prefixMailbox, c.Mailbox, uid)), int(size))
			copy(op.Key, mailboxKey(prefixMailbox, c.Mailbox, uid))
			copy(op.Value[copy(op.Value, c.Header):], msg)
			op.Finish()
			_ = b.Set(mailboxKey(prefixMailboxIndex, c.Mailbox, uid), binary.AppendUvarint(nil, uint64(size)), nil)
		}
		setDue(b, m)
		return t, nil
	})
}

// bytes is the message c stores after its Header: its Body, or queued.
func (c LocalCopy) bytes(queued []byte) []byte {
	if c.Body != nil {
		return c.Body
	}
	return queued
}

// MailboxList returns the messages of mailbox in UID (arrival) order.
func (s *Spool) MailboxList(mailbox string) ([]MailboxMessage, error) {
	if err := validMailbox(mailbox); err != nil {
		return nil, err
	}
	lower := []byte(prefixMailboxIndex + mailbox + "\x00")
	upper := []byte(prefixMailboxIndex + mailbox + "\x01")
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upper})
	if err != nil {
		return nil, err
	}
	defer it.Close()
	var out []MailboxMessage
	for ok := it.First(); ok; ok = it.Next() {
		v, err := it.ValueAndErr()
		if err != nil {
			return nil, err
		}
		size, n := binary.Uvarint(v)
		if n <= 0 {
			return nil, fmt.Errorf("%w: mailbox %s index", errCorrupt, mailbox)
		}
		out = append(out, MailboxMessage{UID: string(it.Key()[len(lower):]), Size: int64(size)})
	}
	return out, it.Error()
}

// MailboxUsage returns how many messages mailbox holds and their octets.
func (s *Spool) MailboxUsage(mailbox string) (count int, size int64, err error) {
	list, err := s.MailboxList(mailbox)
	for _, m := range list {
		size += m.Size
	}
	return len(list), size, err
}

// MailboxGet returns a copy of message uid of mailbox, or mta.ErrNotFound.
func (s *Spool) MailboxGet(mailbox, uid string) ([]byte, error) {
	if err := validMailbox(mailbox); err != nil {
		return nil, err
	}
	v, closer, err := s.db.Get(mailboxKey(prefixMailbox, mailbox, uid))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, mta.ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	defer closer.Close()
	return bytes.Clone(v), nil
}

// MailboxDelete removes messages from mailbox in one synced batch (the
// POP3 UPDATE state). UIDs that are not there are ignored.
func (s *Spool) MailboxDelete(mailbox string, uids []string) error {
	if err := s.Healthy(); err != nil {
		return err
	}
	if err := validMailbox(mailbox); err != nil {
		return err
	}
	b := s.db.NewBatch()
	defer b.Close()
	for _, uid := range uids {
		_ = b.Delete(mailboxKey(prefixMailbox, mailbox, uid), nil)
		_ = b.Delete(mailboxKey(prefixMailboxIndex, mailbox, uid), nil)
	}
	return s.commit(b, "mailbox_delete")
}
