// Package mailbox delivers mail for local domains into local mailboxes: it
// is the scheduler's Transport for those domains, as mta/outbound is for
// the others, so the scheduler does not know where a recipient lives.
//
// It owns the rules of local delivery: which mailbox an address lands in
// (through a Directory), one copy per mailbox however many of its aliases a
// message names, the quota, and the trace header (Return-Path,
// Delivered-To). Storing is the Store's: the copies and the recipients'
// delivered state are written together.
package mailbox

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/scheduler"
)

// Directory finds the mailbox (the user) of a local address.
type Directory interface {
	Mailbox(address string) (user string, ok bool)
}

// Copy is one copy of a message for one mailbox.
type Copy struct {
	Mailbox    string
	Recipients []string // the addresses it delivers
	Header     []byte   // prepended to the message
	Body       []byte   // the message as it goes in; nil: as queued
}

// Store is what local delivery needs of the spool.
type Store interface {
	// DeliverLocal stores the copies of queued message id and marks their
	// recipients delivered, atomically.
	DeliverLocal(id string, copies []Copy) error
	// MailboxUsage returns the messages and octets a mailbox holds.
	MailboxUsage(mailbox string) (count int, size int64, err error)
}

// Transport implements scheduler.Transport for local domains.
type Transport struct {
	// Directory returns the current directory (the users file may be
	// reloaded while the server runs).
	Directory func() Directory
	Store     Store
	// Quota is the most octets a mailbox may hold; zero: no limit.
	Quota int64
	// TakeWhenFull, when set, names the addresses whose mail is taken
	// whatever their mailbox holds (the bounce domain's: reports are read
	// as they are accepted, and refusing them would stop that): a copy
	// that would take the mailbox over its quota is not kept, and the
	// recipient is done (replyNotKept).
	TakeWhenFull func(address string) bool

	usageMu sync.Mutex
	usage   map[string]usage // recent usage per mailbox: see over
}

// usage is a mailbox's octets as last measured, plus what was delivered
// since.
type usage struct {
	size int64
	at   time.Time
}

// usageTTL is how long a measured usage is trusted. Measuring reads the
// mailbox's whole index, which a postmaster mailbox full of bounces makes
// long; within the TTL deliveries are added to it, and deletions over POP3
// are seen at the next measure (the quota is a limit, not an account).
const usageTTL = 10 * time.Second

// Class is the metrics class of local delivery.
const Class = "local"

type route struct{}

func (route) Key() string   { return "local" }
func (route) Class() string { return Class }

// Route returns the one local destination.
func (t *Transport) Route(context.Context, string) (scheduler.Route, error) { return route{}, nil }

// Connect returns a connection to the local mailboxes; it cannot fail.
func (t *Transport) Connect(context.Context, scheduler.Route) (scheduler.Conn, error) {
	return conn{t}, nil
}

type conn struct{ t *Transport }

func (conn) Usable() bool     { return true }
func (conn) Endpoint() string { return "local" }
func (conn) Close() error     { return nil }

// Replies of local delivery.
var (
	replyDelivered = &mta.Reply{Code: 250, Enhanced: mta.Enhanced{2, 0, 0}, Text: "delivered to a local mailbox"}
	replyNotKept   = &mta.Reply{Code: 250, Enhanced: mta.Enhanced{2, 0, 0}, Text: "read; its mailbox is full, so no copy was kept"}
	replyStoreFail = &mta.Reply{Code: 451, Enhanced: mta.Enhanced{4, 3, 0}, Text: "local mailbox store failed; will retry"}
)

// ReplyUnknown is the refusal of a local address without a mailbox.
func ReplyUnknown(address string) *mta.Reply {
	return &mta.Reply{Code: 550, Enhanced: mta.Enhanced{5, 1, 1}, Text: fmt.Sprintf("<%s>: no such mailbox here", address)}
}

// ReplyFull is the refusal of a message that would take a mailbox over its
// quota: permanent at RCPT and at the end of data, where the sender can
// act on it; temporary at delivery, where the owner may make room.
func ReplyFull(address string, permanent bool) *mta.Reply {
	if permanent {
		return &mta.Reply{Code: 552, Enhanced: mta.Enhanced{5, 2, 2}, Text: fmt.Sprintf("<%s>: mailbox full", address)}
	}
	return &mta.Reply{Code: 452, Enhanced: mta.Enhanced{4, 2, 2}, Text: fmt.Sprintf("<%s>: mailbox full", address)}
}

// PostmasterMailbox holds the mail of a local domain's postmaster address
// that no user has: RFC 5321 §4.5.1 requires postmaster at every domain a
// server takes mail for, so that mail is never refused. It waits there
// until a user of this name reads it (mta user add postmaster ...).
const PostmasterMailbox = "postmaster"

// mailboxOf is the mailbox of a local address: the directory's, else
// PostmasterMailbox for postmaster.
func mailboxOf(dir Directory, address string) (string, bool) {
	if user, ok := dir.Mailbox(address); ok {
		return user, true
	}
	if at := strings.LastIndexByte(address, '@'); at > 0 && strings.EqualFold(address[:at], "postmaster") {
		return PostmasterMailbox, true
	}
	return "", false
}

// Send delivers one message to the recipients of the local domain.
func (c conn) Send(ctx context.Context, env *scheduler.Envelope, body []byte) ([]*mta.Reply, error) {
	dir := c.t.Directory()
	replies := make([]*mta.Reply, len(env.Recipients))
	var copies []Copy
	index := map[string]int{}      // mailbox → its copy
	stored := dropReturnPath(body) // nil: as queued
	for i, r := range env.Recipients {
		user, ok := mailboxOf(dir, r.Address)
		if !ok {
			replies[i] = ReplyUnknown(r.Address)
			continue
		}
		n, seen := index[user]
		if !seen {
			if full, err := c.t.over(user, int64(len(body))); err != nil {
				replies[i] = replyStoreFail
				continue
			} else if full && c.t.takeWhenFull(r.Address) {
				replies[i] = replyNotKept
				continue
			} else if full {
				replies[i] = ReplyFull(r.Address, false)
				continue
			}
			n = len(copies)
			index[user] = n
			copies = append(copies, Copy{Mailbox: user, Header: []byte("Return-Path: <" + env.From + ">\r\n"), Body: stored})
		}
		cp := &copies[n]
		cp.Recipients = append(cp.Recipients, r.Address)
		cp.Header = append(cp.Header, "Delivered-To: "+strings.ToLower(r.Address)+"\r\n"...)
		replies[i] = replyDelivered
	}
	if len(copies) > 0 {
		if err := c.t.Store.DeliverLocal(env.ID, copies); err != nil {
			for i, r := range replies {
				if r == replyDelivered {
					replies[i] = replyStoreFail
				}
			}
		} else {
			for _, cp := range copies {
				stored := body
				if cp.Body != nil {
					stored = cp.Body
				}
				c.t.delivered(cp.Mailbox, int64(len(cp.Header)+len(stored)))
			}
		}
	}
	return replies, nil
}

// dropReturnPath returns msg without the Return-Path: fields of its
// header section, or nil when it has none. The Return-Path of a message
// in a mailbox is the one final delivery adds (RFC 5321 §4.4); one the
// sender wrote would be read as the envelope sender by the mail reader
// and filters after it, so, as Postfix does, it is dropped.
func dropReturnPath(msg []byte) []byte {
	const name = "return-path"
	var out []byte
	dropping := false // inside a dropped field: its folded lines go too
	rest := msg
	for len(rest) > 0 {
		end := bytes.Index(rest, []byte("\r\n"))
		if end < 0 {
			end = len(rest)
		} else {
			end += 2
		}
		line := rest[:end]
		if string(line) == "\r\n" {
			break // the end of the header section
		}
		if bytes.IndexByte(line[:len(bytes.TrimSuffix(line, []byte("\r\n")))], '\n') >= 0 {
			return nil // a bare LF: not a header this can read, left alone
		}
		if line[0] != ' ' && line[0] != '\t' {
			dropping = mta.IsHeaderField(line, name)
		}
		switch {
		case dropping && out == nil: // the first: keep what came before
			out = append(make([]byte, 0, len(msg)), msg[:len(msg)-len(rest)]...)
		case !dropping && out != nil:
			out = append(out, line...)
		}
		rest = rest[end:]
	}
	if out == nil {
		return nil
	}
	return append(out, rest...)
}

// Forget drops what is known of mailbox's usage, so that the next quota
// check measures it: call it when messages were removed from it.
func (t *Transport) Forget(mailbox string) {
	t.usageMu.Lock()
	defer t.usageMu.Unlock()
	delete(t.usage, mailbox)
}

// over reports whether size more octets would take mailbox over quota.
func (t *Transport) over(mailbox string, size int64) (bool, error) {
	if t.Quota <= 0 {
		return false, nil
	}
	t.usageMu.Lock()
	u, ok := t.usage[mailbox]
	t.usageMu.Unlock()
	if !ok || time.Since(u.at) > usageTTL {
		_, used, err := t.Store.MailboxUsage(mailbox)
		if err != nil {
			return false, err
		}
		u = usage{size: used, at: time.Now()}
		t.usageMu.Lock()
		if t.usage == nil || len(t.usage) > 10000 {
			t.usage = map[string]usage{}
		}
		t.usage[mailbox] = u
		t.usageMu.Unlock()
	}
	return u.size+size > t.Quota, nil
}

// delivered adds what a delivery stored to the recent usage.
func (t *Transport) delivered(mailbox string, size int64) {
	t.usageMu.Lock()
	defer t.usageMu.Unlock()
	if u, ok := t.usage[mailbox]; ok {
		u.size += size
		t.usage[mailbox] = u
	}
}

// Check is the SMTP edge's question at RCPT and at the end of data: nil if
// address has a mailbox with room for size more octets (0: not known yet),
// else the refusal (550 5.1.1 unknown, 552 5.2.2 full).
func (t *Transport) Check(address string, size int64) *mta.Reply {
	user, ok := mailboxOf(t.Directory(), address)
	if !ok {
		return ReplyUnknown(address)
	}
	if full, err := t.over(user, size); err == nil && full && !t.takeWhenFull(address) {
		return ReplyFull(address, true)
	}
	return nil
}

func (t *Transport) takeWhenFull(address string) bool {
	return t.TakeWhenFull != nil && t.TakeWhenFull(address)
}
