package spool

import (
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// Outcome is what an attempt's result records on recipients.
type Outcome struct {
	// Reply is the remote reply or the local reason, as queue show and
	// notices show it ("550 5.1.1 text" when it has codes).
	Reply string
	// RemoteMTA is the host that replied and Diagnostic its reply as
	// received; both "" when the reason is local.
	RemoteMTA  string
	Diagnostic string
	// RemoteDSN, for a delivery, says the server offered DSN: NOTIFY went
	// on with the message, and the notice of success is that server's to
	// make (RFC 3461 §5.2.2).
	RemoteDSN bool
}

// Result is one recipient's outcome.
type Result struct {
	Address string
	Outcome
}

// Transition is one update's change to a message's recipients, as the
// Notifier sees it.
type Transition struct {
	// Message is the record after the change. The Notifier may set
	// DelayNotified on its recipients; the record is written after it.
	Message *Message
	// Changed are the indexes in Message.Recipients of the recipients
	// whose state this update changed: delivered, failed, or deferred
	// (still Queued, with a new attempt recorded).
	Changed []int
	// RemoteDSN is the Outcome's, for deliveries.
	RemoteDSN bool
	// Local says the recipients were delivered to mailboxes here.
	Local bool
	Now   time.Time
}

// Notice is a notification to store as a new message, in the batch of
// the transition that owes it. Message.ID must come from NewID; the spool
// sets the rest as Put does.
type Notice struct {
	Message *Message
	Data    []byte
	// Committed, if set, is called once the notice is committed (for the
	// notifier's log line and metrics: a batch that fails made no notice).
	Committed func()
}

// A Notifier returns the notice (a DSN) a transition owes, or nil. body
// returns the message's stored bytes. It runs inside the update, under the
// message's lock, so what it returns is committed with the transition or
// not at all: a crash can neither lose a bounce nor make two. An error
// abandons the transition.
type Notifier func(t *Transition, body func() ([]byte, error)) (*Notice, error)

// addNotice adds notice n to batch b as a new queued message, due after the
// fresh lease like any accepted message, and returns its pending domains.
func (s *Spool) addNotice(b *pebble.Batch, n *Notice, now time.Time) []string {
	m := n.Message
	m.Received = now
	m.Size = int64(len(n.Data))
	due := now.Add(s.opts.FreshLease)
	m.queueAll(due)
	var k keyBuf
	_ = b.Set(k.message(m.ID), m.encode(nil), nil)
	_ = b.Set(k.body(m.ID), n.Data, nil)
	domains := m.Pending()
	for _, d := range domains {
		_ = b.Set(k.due(due, m.ID, d), nil, nil)
	}
	return domains
}
