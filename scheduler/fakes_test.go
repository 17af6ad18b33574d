package scheduler

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mtaproject/mta/mta"
)

// memStore is an in-memory Store for testing the scheduler's policy.
type memStore struct {
	dueCalls atomic.Int64
	mu       sync.Mutex
	msgs     map[string]*Message
	due      map[workKey]time.Time
	events   []string
	defers   map[workKey]int
	failures map[string]string      // address → reply
	done     map[string]string      // address → reply
	body     func(id string) string // message id's body; nil: a small one naming it
	// onLease, when set, is called by Lease before it changes anything,
	// without mu: a test can hold a write up with it.
	onLease func(items []Due)
	onDue   func() // called by Due first, without mu
	// postponed counts the Lease calls, returned, that postponed work
	// (their items carry a reason).
	postponed atomic.Int64
}

func newMemStore() *memStore {
	return &memStore{msgs: map[string]*Message{}, due: map[workKey]time.Time{}, defers: map[workKey]int{},
		failures: map[string]string{}, done: map[string]string{}}
}

func (s *memStore) add(id string, received, due time.Time, rcpts ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := &Message{ID: id, From: "from@example.org", Received: received}
	for _, r := range rcpts {
		d := mta.Domain(r)
		m.Recipients = append(m.Recipients, Recipient{Recipient: mta.Recipient{Address: r}, Domain: d, Queued: true})
		s.due[workKey{id, d}] = due
	}
	s.msgs[id] = m
}

func (s *memStore) Due(now time.Time, limit int, skip func(string) bool) ([]Due, error) {
	s.dueCalls.Add(1)
	if s.onDue != nil {
		s.onDue()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Due
	for k, t := range s.due {
		if !t.After(now) {
			out = append(out, Due{ID: k.id, Domain: k.domain, At: t})
		}
	}
	sort.Slice(out, func(i, j int) bool {
		return out[i].At.Before(out[j].At) || out[i].At.Equal(out[j].At) && out[i].ID < out[j].ID
	})
	if skip != nil {
		kept := out[:0]
		for _, d := range out {
			if !skip(d.Domain) {
				kept = append(kept, d)
			}
		}
		out = kept
	}
	if len(out) > limit {
		out = out[:limit]
	}
	return out, nil
}

func (s *memStore) Lease(items []Due) ([]Due, error) {
	if s.onLease != nil {
		s.onLease(items)
	}
	if len(items) > 0 && items[0].Reply != "" {
		defer s.postponed.Add(1)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Due
	for _, it := range items {
		k := workKey{it.ID, it.Domain}
		if t, ok := s.due[k]; !ok || !it.Was.IsZero() && !t.Equal(it.Was) {
			continue
		}
		s.due[k] = it.At
		if m := s.msgs[it.ID]; m != nil {
			it.Received, it.Priority = m.Received, m.Priority
		}
		out = append(out, it)
	}
	return out, nil
}

// flush makes every entry due later due now, as the spool's Flush (an
// operator's queue flush) does; entries already due are left to the scan.
func (s *memStore) flush(now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, t := range s.due {
		if t.After(now) {
			s.due[k] = now
		}
	}
}

func (s *memStore) Message(id string) (*Message, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, ok := s.msgs[id]
	if !ok {
		return nil, mta.ErrNotFound
	}
	c := *m
	c.Recipients = append([]Recipient(nil), m.Recipients...)
	return &c, nil
}

func (s *memStore) AppendBody(dst []byte, id string) ([]byte, error) {
	if s.body != nil {
		return append(dst, s.body(id)...), nil
	}
	return append(dst, "Subject: "+id+"\r\n\r\nx\r\n"...), nil
}

func (s *memStore) Defer(id, domain string, until time.Time, o Outcome) error {
	reply := o.Reply
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.msgs[id]
	for i := range m.Recipients {
		if r := &m.Recipients[i]; r.Queued && r.Domain == domain {
			r.Attempts++
			r.LastReply = reply
		}
	}
	s.due[workKey{id, domain}] = until
	s.defers[workKey{id, domain}]++
	s.events = append(s.events, fmt.Sprintf("defer %s %s %s", id, domain, reply))
	return nil
}

func (s *memStore) finish(id string, results []Result, into map[string]string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.msgs[id]
	for i := range m.Recipients {
		r := &m.Recipients[i]
		for _, res := range results {
			if r.Address == res.Address && r.Queued {
				r.Queued = false
				into[id+" "+res.Address] = res.Reply
			}
		}
	}
	for _, r := range m.Recipients {
		if !r.Queued {
			continue
		}
		return
	}
	for k := range s.due {
		if k.id == id {
			delete(s.due, k)
		}
	}
}

func (s *memStore) Delivered(id string, results []Result) error {
	s.finish(id, results, s.done)
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range s.msgs[id].Recipients {
		if r.Queued {
			return nil
		}
	}
	return nil
}

func (s *memStore) Failed(id string, results []Result) error {
	s.finish(id, results, s.failures)
	return nil
}

func (s *memStore) counts() (delivered, failed int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.done), len(s.failures)
}

// fakeRoute routes every domain to the destination named by domainDest.
type fakeRoute struct{ key string }

func (r fakeRoute) Key() string   { return r.key }
func (r fakeRoute) Class() string { return "mx" }

type fakeTransport struct {
	mu         sync.Mutex
	dests      map[string]string // domain → destination key; missing: the domain itself
	routeErr   map[string]error
	connectErr map[string]error // destination → error
	replies    func(rcpt string) *mta.Reply
	delay      map[string]time.Duration // destination → per-message delay
	connects   map[string]int
	sent       map[string]int // destination → messages
	active     map[string]int
	maxActive  map[string]int
	sendErr    func(dest string, n int) error
	onSend     func(env *Envelope, body []byte) // called by every Send, without mu
	// By the domain of a Send's first recipient: Sends in progress at
	// once, the most of them, and the most messages one connection
	// carried.
	sending, mostSending, mostPerConn map[string]int

	maxConns map[string]int // destination → connections it takes at once; more are refused
	// rcptLimit, when not 0, is the recipients a transaction takes; those
	// past it get tooMany (default 452 4.5.3).
	rcptLimit     int
	tooMany       *mta.Reply
	txns          []int // recipients of each Send, in order
	connectDelay  time.Duration
	connecting    int // Connect calls in progress
	maxConnecting int
}

func newFakeTransport() *fakeTransport {
	return &fakeTransport{dests: map[string]string{}, routeErr: map[string]error{}, connectErr: map[string]error{},
		delay: map[string]time.Duration{}, connects: map[string]int{}, sent: map[string]int{},
		active: map[string]int{}, maxActive: map[string]int{},
		sending: map[string]int{}, mostSending: map[string]int{}, mostPerConn: map[string]int{},
		replies: func(string) *mta.Reply { return &mta.Reply{Code: 250, Text: "ok"} }}
}

func (f *fakeTransport) Route(ctx context.Context, domain string) (Route, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.routeErr[domain]; err != nil {
		return nil, err
	}
	if d, ok := f.dests[domain]; ok {
		return fakeRoute{d}, nil
	}
	return fakeRoute{domain}, nil
}

func (f *fakeTransport) Connect(ctx context.Context, r Route) (Conn, error) {
	f.mu.Lock()
	f.connecting++
	f.maxConnecting = max(f.maxConnecting, f.connecting)
	delay := f.connectDelay
	f.mu.Unlock()
	time.Sleep(delay)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.connecting--
	f.connects[r.Key()]++
	if err := f.connectErr[r.Key()]; err != nil {
		return nil, err
	}
	if n, ok := f.maxConns[r.Key()]; ok && f.active[r.Key()] >= n {
		return nil, errors.New("421 4.7.0 too many connections")
	}
	f.active[r.Key()]++
	f.maxActive[r.Key()] = max(f.maxActive[r.Key()], f.active[r.Key()])
	return &fakeConn{f: f, dest: r.Key(), usable: true}, nil
}

func (f *fakeTransport) stats(dest string) (connects, sent, maxActive int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.connects[dest], f.sent[dest], f.maxActive[dest]
}

type fakeConn struct {
	f       *fakeTransport
	dest    string
	usable  bool
	closed  bool
	n       int
	carried map[string]int // messages, by domain
}

func (c *fakeConn) Send(ctx context.Context, env *Envelope, body []byte) ([]*mta.Reply, error) {
	domain := mta.Domain(env.Recipients[0].Address)
	c.f.mu.Lock()
	d := c.f.delay[c.dest]
	c.f.sending[domain]++
	c.f.mostSending[domain] = max(c.f.mostSending[domain], c.f.sending[domain])
	if c.carried == nil {
		c.carried = map[string]int{}
	}
	c.carried[domain]++
	c.f.mostPerConn[domain] = max(c.f.mostPerConn[domain], c.carried[domain])
	c.f.mu.Unlock()
	if d > 0 {
		time.Sleep(d)
	}
	c.f.mu.Lock()
	c.f.sending[domain]--
	c.f.mu.Unlock()
	if c.f.onSend != nil {
		c.f.onSend(env, body)
	}
	c.f.mu.Lock()
	defer c.f.mu.Unlock()
	c.n++
	if c.f.sendErr != nil {
		if err := c.f.sendErr(c.dest, c.n); err != nil {
			c.usable = false
			return nil, err
		}
	}
	c.f.sent[c.dest]++
	c.f.txns = append(c.f.txns, len(env.Recipients))
	out := make([]*mta.Reply, len(env.Recipients))
	accepted := 0
	for i, r := range env.Recipients {
		if c.f.rcptLimit > 0 && accepted >= c.f.rcptLimit {
			out[i] = c.f.tooMany
			if out[i] == nil {
				out[i] = &mta.Reply{Code: 452, Enhanced: mta.Enhanced{4, 5, 3}, Text: "Too many recipients"}
			}
			continue
		}
		if out[i] = c.f.replies(r.Address); out[i].Code/100 == 2 {
			accepted++
		}
	}
	return out, nil
}

func (c *fakeConn) Usable() bool     { return c.usable && !c.closed }
func (c *fakeConn) Endpoint() string { return c.dest }
func (c *fakeConn) Close() error {
	c.f.mu.Lock()
	defer c.f.mu.Unlock()
	if !c.closed {
		c.closed = true
		c.f.active[c.dest]--
	}
	return nil
}

var errRefused = errors.New("connection refused")
