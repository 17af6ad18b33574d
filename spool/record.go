package spool

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/mtaproject/mta/mta"
)

// Status is the delivery state of one recipient.
type Status uint8

// Recipient states. A message leaves the spool when no recipient is Queued.
const (
	Queued    Status = iota // waiting for delivery or a retry
	Delivered               // the remote server accepted it (2xx)
	Failed                  // permanently failed (5xx, or queue lifetime exceeded)
)

func (s Status) String() string {
	switch s {
	case Queued:
		return "queued"
	case Delivered:
		return "delivered"
	case Failed:
		return "failed"
	}
	return fmt.Sprintf("status(%d)", uint8(s))
}

// RecipientState is one recipient and how its delivery stands.
type RecipientState struct {
	mta.Recipient
	Domain      string    // lower-cased domain of Address: the unit of delivery
	Status      Status    // queued, delivered or failed
	Attempts    int       // delivery attempts made so far
	NextAttempt time.Time // when a Queued recipient is due; its due-index key
	LastAttempt time.Time // when the last attempt ended; zero before the first
	LastReply   string    // the last remote reply or local reason, for queue show and DSNs
	// RemoteMTA is the host that gave the last reply, Diagnostic that reply
	// as received; both are "" when the last outcome had a local reason.
	RemoteMTA  string
	Diagnostic string
	// DelayNotified is set once a delay notice (NOTIFY=DELAY) was made for
	// this recipient: there is at most one.
	DelayNotified bool
}

// Message is the spool record of one message: its envelope and the state of
// every recipient. It is stored under m/<id>.
type Message struct {
	ID         string            // queue ID
	From       string            // reverse-path; "" is the null sender
	EnvID      string            // DSN ENVID
	Ret        mta.Return        // DSN RET
	SMTPUTF8   bool              // accepted with SMTPUTF8
	Body8Bit   bool              // accepted with BODY=8BITMIME
	Held       bool              // on hold: not due until released
	ClientIP   string            // client that submitted it
	HELO       string            // client's HELO name
	AuthUser   string            // authenticated submitter, if any
	MessageID  string            // the header's Message-ID, for logs (version 3)
	Priority   mta.Priority      // its delivery lane (a flag: any version)
	Metadata   map[string]string // given at injection, carried into its events (version 4)
	Received   time.Time         // acceptance time
	Size       int64             // bytes stored under b/<id>, or in a body file
	Notice     NoticeKind        // whether this is a notification (DSN) we made
	Recipients []RecipientState  // in the order accepted

	body bodyLocation // where the bytes are, when not under b/<id> (version 5)
}

// NoticeKind says whether a message is a notification the server made.
type NoticeKind uint8

// Kinds of message.
const (
	NotNotice        NoticeKind = iota // mail from a client
	SenderNotice                       // a DSN to the sender of a message
	PostmasterNotice                   // a DSN that could not be delivered, sent on to the postmaster
)

// Pending returns the distinct domains that still have Queued recipients,
// in first-seen order.
func (m *Message) Pending() []string {
	var out []string
	for i := range m.Recipients {
		r := &m.Recipients[i]
		if r.Status != Queued {
			continue
		}
		seen := false
		for _, d := range out {
			if d == r.Domain {
				seen = true
				break
			}
		}
		if !seen {
			out = append(out, r.Domain)
		}
	}
	return out
}

// queueAll makes every recipient of a new message queued, due at due.
func (m *Message) queueAll(due time.Time) {
	for i := range m.Recipients {
		r := &m.Recipients[i]
		r.Domain = mta.Domain(r.Address)
		r.Status = Queued
		r.NextAttempt = due
	}
}

// Done reports whether no recipient is still queued.
func (m *Message) Done() bool {
	for i := range m.Recipients {
		if m.Recipients[i].Status == Queued {
			return false
		}
	}
	return true
}

// recordVersion is the first byte of every encoded Message. Older
// versions are still read: version 1 (before notices) lacks the notice
// kind and, per recipient, RemoteMTA, Diagnostic and the recipient flags;
// version 2 lacks the Message-ID; version 3 the metadata; version 4 the
// body file a large message's bytes may be in (flagBodyFile).
const recordVersion = 5

const (
	flagSMTPUTF8 = 1 << iota
	flagBody8Bit
	flagHeld
	flagSenderNotice
	flagPostmasterNotice
	flagTransactional // Priority is transactional
	flagBodyFile      // the bytes are in a body file, not under b/<id> (version 5)
)

// Recipient flags (version 2).
const rflagDelayNotified = 1

// encode appends the binary form of m to dst. The format is a version byte,
// then fields in declaration order: strings as uvarint length + bytes,
// integers as varints, times as varint Unix nanoseconds (0 for zero time).
func (m *Message) encode(dst []byte) []byte {
	var flags uint64
	if m.SMTPUTF8 {
		flags |= flagSMTPUTF8
	}
	if m.Body8Bit {
		flags |= flagBody8Bit
	}
	if m.Held {
		flags |= flagHeld
	}
	if m.Priority == mta.PriorityTransactional {
		flags |= flagTransactional
	}
	switch m.Notice {
	case SenderNotice:
		flags |= flagSenderNotice
	case PostmasterNotice:
		flags |= flagPostmasterNotice
	}
	// A record without a body file is the same in version 4, which the
	// binaries before body files read: it is written so.
	version := byte(4)
	if m.body.File != 0 {
		flags |= flagBodyFile
		version = recordVersion
	}
	dst = append(dst, version)
	dst = binary.AppendUvarint(dst, flags)
	for _, s := range []string{m.From, m.EnvID, string(m.Ret), m.ClientIP, m.HELO, m.AuthUser} {
		dst = appendString(dst, s)
	}
	dst = appendString(dst, m.MessageID)
	dst = appendTime(dst, m.Received)
	dst = binary.AppendVarint(dst, m.Size)
	if m.body.File != 0 {
		dst = binary.AppendUvarint(dst, m.body.File)
		dst = binary.AppendVarint(dst, m.body.Offset)
		dst = binary.AppendUvarint(dst, uint64(m.body.CRC))
	}
	dst = binary.AppendUvarint(dst, uint64(len(m.Recipients)))
	for i := range m.Recipients {
		r := &m.Recipients[i]
		dst = appendString(dst, r.Address)
		dst = binary.AppendUvarint(dst, uint64(r.Notify))
		dst = appendString(dst, r.ORcptType)
		dst = appendString(dst, r.ORcpt)
		dst = append(dst, byte(r.Status))
		dst = binary.AppendUvarint(dst, uint64(r.Attempts))
		dst = appendTime(dst, r.NextAttempt)
		dst = appendTime(dst, r.LastAttempt)
		dst = appendString(dst, r.LastReply)
		dst = appendString(dst, r.RemoteMTA)
		dst = appendString(dst, r.Diagnostic)
		var rflags uint64
		if r.DelayNotified {
			rflags |= rflagDelayNotified
		}
		dst = binary.AppendUvarint(dst, rflags)
	}
	dst = binary.AppendUvarint(dst, uint64(len(m.Metadata)))
	for _, k := range slices.Sorted(maps.Keys(m.Metadata)) {
		dst = appendString(dst, k)
		dst = appendString(dst, m.Metadata[k])
	}
	return dst
}

var errCorrupt = errors.New("spool: corrupt message record")

// minRecipientBytes is the least an encoded recipient takes: nine fields
// of at least one byte each in version 1.
const minRecipientBytes = 9

// decodeMessage parses a record made by encode. The domain of each
// recipient is derived from its address, not stored.
func decodeMessage(id string, b []byte) (*Message, error) {
	return decodeRecord(decoder{b: b}, id, nil)
}

// decodeRecord is decodeMessage with the decoder given. A census decodes
// into reuse, the previous record's Message, so that counting a deep
// queue makes no garbage per message.
func decodeRecord(d decoder, id string, reuse *Message) (*Message, error) {
	version := d.byte()
	if version < 1 || version > recordVersion {
		return nil, fmt.Errorf("spool: message %s: record version %d not supported", id, version)
	}
	m := reuse
	if m == nil {
		m = &Message{}
	}
	*m = Message{ID: id, Recipients: m.Recipients[:0]}
	flags := d.uvarint()
	m.SMTPUTF8 = flags&flagSMTPUTF8 != 0
	m.Body8Bit = flags&flagBody8Bit != 0
	m.Held = flags&flagHeld != 0
	if flags&flagTransactional != 0 {
		m.Priority = mta.PriorityTransactional
	}
	switch {
	case flags&flagSenderNotice != 0:
		m.Notice = SenderNotice
	case flags&flagPostmasterNotice != 0:
		m.Notice = PostmasterNotice
	}
	m.From = d.string()
	m.EnvID = d.string()
	m.Ret = mta.Return(d.string())
	m.ClientIP = d.string()
	m.HELO = d.string()
	m.AuthUser = d.string()
	if version >= 3 {
		m.MessageID = d.string()
	}
	m.Received = d.time()
	m.Size = d.varint()
	if version >= 5 && flags&flagBodyFile != 0 {
		m.body.File = d.uvarint()
		m.body.Offset = d.varint()
		m.body.CRC = uint32(d.uvarint())
		if m.body.File == 0 {
			d.err = true
		}
	}
	n := d.uvarint()
	if n > uint64(len(d.b))/minRecipientBytes { // not before allocating them
		return nil, fmt.Errorf("%w %s", errCorrupt, id)
	}
	if reuse != nil && uint64(cap(m.Recipients)) >= n {
		m.Recipients = m.Recipients[:n]
		clear(m.Recipients)
	} else {
		m.Recipients = make([]RecipientState, n)
	}
	for i := range m.Recipients {
		r := &m.Recipients[i]
		r.Address = d.string()
		r.Domain = mta.Domain(r.Address)
		r.Notify = mta.Notify(d.uvarint())
		r.ORcptType = d.string()
		r.ORcpt = d.string()
		r.Status = Status(d.byte())
		r.Attempts = int(d.uvarint())
		r.NextAttempt = d.time()
		r.LastAttempt = d.time()
		r.LastReply = d.string()
		if version >= 2 {
			r.RemoteMTA = d.string()
			r.Diagnostic = d.string()
			r.DelayNotified = d.uvarint()&rflagDelayNotified != 0
		}
	}
	if version >= 4 {
		n := d.uvarint()
		if n > uint64(len(d.b)) {
			return nil, fmt.Errorf("%w %s", errCorrupt, id)
		}
		if n > 0 && !d.census {
			m.Metadata = make(map[string]string, n)
		}
		for range n {
			k, v := d.string(), d.string()
			if !d.census {
				m.Metadata[k] = v
			}
		}
	}
	if d.err || len(d.b) != 0 {
		return nil, fmt.Errorf("%w %s", errCorrupt, id)
	}
	return m, nil
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

func appendTime(dst []byte, t time.Time) []byte {
	if t.IsZero() {
		return binary.AppendVarint(dst, 0)
	}
	return binary.AppendVarint(dst, t.UnixNano())
}

// decoder reads what encode wrote; any short read sets err and yields zeros.
type decoder struct {
	b   []byte
	err bool
	// census skips strings instead of copying them: an empty one reads as
	// "", any other as censusString. For Census only, which reads states
	// and times and never lets such a record out.
	census bool
}

// censusString stands for every non-empty string of a record decoded for
// a census.
const censusString = "?"

func (d *decoder) byte() byte {
	if len(d.b) == 0 {
		d.err = true
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

func (d *decoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.err = true
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) varint() int64 {
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.err = true
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) string() string {
	n := d.uvarint()
	if n > uint64(len(d.b)) {
		d.err = true
		return ""
	}
	if d.census {
		d.b = d.b[n:]
		if n == 0 {
			return ""
		}
		return censusString
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}

func (d *decoder) time() time.Time {
	v := d.varint()
	if v == 0 {
		return time.Time{}
	}
	return time.Unix(0, v)
}
