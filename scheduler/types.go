package scheduler

import (
	"context"
	"time"

	"github.com/mtaproject/mta/mta"
)

// Due names one destination domain of one message whose attempt is due.
type Due struct {
	ID     string
	Domain string
	At     time.Time
	Reply  string // with Lease: why the work is postponed, recorded as the last reply; "" keeps it
	// Received is when the message was accepted; Lease fills it in for the
	// items it returns, so that postponed work can be expired.
	Received time.Time
	// Priority is the message's lane; Lease fills it in too, so that work
	// found by the scan (a retry, after a restart) keeps its lane.
	Priority mta.Priority
	// Was, with Lease, is the due time the scan read: the item is leased
	// only if nothing moved it since (a worker's deferral wins).
	Was time.Time

	urgent bool // Submit: transactional work
}

// Message is what the scheduler needs of a queued message.
type Message struct {
	ID         string
	From       string // "" is the null sender
	EnvID      string
	Ret        mta.Return
	SMTPUTF8   bool
	Body8Bit   bool
	Received   time.Time
	MessageID  string // the header's, for the log
	Size       int64  // bytes as stored, for the memory budget
	AuthUser   string // who submitted it (an AUTH user or an API tenant)
	Priority   mta.Priority
	Metadata   map[string]string // from the injection API, for events
	Recipients []Recipient
}

// Recipient is one recipient and whether it still waits for delivery.
type Recipient struct {
	mta.Recipient
	Domain   string
	Queued   bool
	Attempts int
	// LastReply is the reply (or our reason) of its last attempt, quoted
	// when the mail expires without another.
	LastReply string
}

// Store is the queue on disk. Every method is one atomic, durable
// transition; the scheduler calls them from worker goroutines, never from
// its state-owning goroutine, except Due and Lease, which the periodic scan
// uses.
type Store interface {
	// Due returns up to limit entries due at or before now, earliest first,
	// leaving out those for which skip (if not nil) returns true: the
	// scheduler skips the domains that have their share of the window, so
	// that one deep backlog does not hide everyone else's due work. skip is
	// called in order, once per entry considered; the store may stop after
	// considering a bounded number of entries.
	Due(now time.Time, limit int, skip func(domain string) bool) ([]Due, error)
	// Lease moves the due entries of the given (ID, Domain) pairs each to
	// its At, in one batch and without counting an attempt, and records
	// Reply when set. It returns the items it moved: a message that is gone
	// or held is skipped. The scheduler leases work before attempting it,
	// so a crash cannot make it due again at once, and postpones the work
	// of a backed-off destination with it. The items returned carry the
	// message's Received time.
	Lease(items []Due) ([]Due, error)
	// Message returns the envelope and recipient states of message id.
	Message(id string) (*Message, error)
	// AppendBody appends the message bytes to dst (a buffer the scheduler
	// reuses once the attempt is over) and returns the extended slice.
	AppendBody(dst []byte, id string) ([]byte, error)
	// Defer records a temporary failure of domain's queued recipients and
	// makes them due at until.
	Defer(id, domain string, until time.Time, o Outcome) error
	// Delivered and Failed record final outcomes of recipients, each with
	// its own reply. The store makes the notices (DSNs) they owe in the
	// same transition.
	Delivered(id string, results []Result) error
	Failed(id string, results []Result) error
}

// Outcome is what an attempt's result says about a recipient.
type Outcome struct {
	// Reply is the remote reply or our own reason, as the queue shows it.
	Reply string
	// RemoteMTA is the host that replied and Diagnostic its reply as
	// received; both "" when the reason is ours.
	RemoteMTA  string
	Diagnostic string
	// RemoteDSN says the server offered DSN (NOTIFY went on with the
	// message).
	RemoteDSN bool
}

// local is an Outcome with a reason of our own.
func local(reason string) Outcome { return Outcome{Reply: reason} }

// Result is one recipient's outcome.
type Result struct {
	Address string
	Outcome
}

// Route is a resolved destination, opaque to the scheduler but for its key.
type Route interface {
	// Key identifies the next-hop set: domains with equal keys share a
	// destination queue, its limits and its connections.
	Key() string
	// Class labels metrics: "mx" or "route".
	Class() string
}

// Transport reaches remote servers.
type Transport interface {
	// Route resolves a domain. A permanent error (mta.IsPermanent) fails
	// its recipients; any other defers them.
	Route(ctx context.Context, domain string) (Route, error)
	// Connect opens a connection to one of the route's hosts, trying them
	// in order. An error means no host could be reached.
	Connect(ctx context.Context, r Route) (Conn, error)
}

// Conn is one open connection to a destination.
type Conn interface {
	// Send runs one transaction. The replies are per recipient, in order.
	// An error means the connection failed (I/O, timeout, 421): the
	// recipients are not known to be delivered and the Conn is unusable.
	Send(ctx context.Context, env *Envelope, body []byte) ([]*mta.Reply, error)
	// Usable reports whether the connection may carry another message.
	Usable() bool
	// Endpoint is the remote address ("ip:port"), for the connection cache.
	Endpoint() string
	// Close ends the connection (QUIT) and releases it.
	Close() error
}

// Envelope is one transaction: a message and the recipients of one
// destination domain.
type Envelope struct {
	ID         string
	From       string
	EnvID      string
	Ret        mta.Return
	SMTPUTF8   bool
	Body8Bit   bool
	Recipients []mta.Recipient
}

// OutcomeEvent is one recipient's outcome of an attempt, or of a decision
// made without one (expiry, routing), for Options.Observe.
type OutcomeEvent struct {
	Outcome     string   // delivered, deferred, failed or expired
	Message     *Message // the message as read for the attempt
	Recipient   string
	Destination string // next-hop key; "" without a destination
	MX, IP, TLS string // the host, address:port and TLS session that replied
	Reply       *mta.Reply
	Reason      string // without Reply: our own reason
	Attempt     int
	QueuedFor   time.Duration // since arrival
}
