// Package outbound is the scheduler's Transport: it routes a domain with
// mta/resolve and opens connections with mta/smtpclient, trying a
// destination's hosts and addresses in order.
package outbound

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/mta/resolve"
	"github.com/mtaproject/mta/mta/smtpclient"
	"github.com/mtaproject/mta/scheduler"
)

// Transport implements scheduler.Transport.
type Transport struct {
	Resolver *resolve.Resolver
	// STARTTLS, when set, counts new connections by how STARTTLS went
	// (smtpclient.TLSUsed and the others).
	STARTTLS *prometheus.CounterVec
	settings atomic.Pointer[Settings]
	failing  failingAddrs // tried last for a while
}

// Settings are how a Transport connects; a reload replaces them
// (SetSettings).
type Settings struct {
	// Client holds the SMTP client options; TLS policy and AUTH are set
	// per destination from its route.
	Client smtpclient.Options
	// MaxAddresses bounds the addresses one Connect tries (Postfix's
	// smtp_mx_address_limit), so that a black-holed destination ties a
	// worker up for a bounded time; zero means 5.
	MaxAddresses int
}

// New returns a Transport that routes with res and connects as s says.
func New(res *resolve.Resolver, starttls *prometheus.CounterVec, s Settings) *Transport {
	t := &Transport{Resolver: res, STARTTLS: starttls}
	t.SetSettings(s)
	return t
}

// SetSettings replaces the settings: connections opened from then on use
// them, those open keep theirs.
func (t *Transport) SetSettings(s Settings) {
	if s.MaxAddresses <= 0 {
		s.MaxAddresses = 5
	}
	t.settings.Store(&s)
}

type route struct{ dest *resolve.Destination }

func (r route) Key() string { return r.dest.Key }

func (r route) Class() string {
	if r.dest.Route != nil {
		return "route"
	}
	return "mx"
}

// Route resolves domain. Errors wrap *mta.Reply (permanent or temporary).
func (t *Transport) Route(ctx context.Context, domain string) (scheduler.Route, error) {
	d, err := t.Resolver.Resolve(ctx, domain)
	if err != nil {
		return nil, err
	}
	return route{d}, nil
}

// Connect dials the destination's hosts in order (MX preference, then
// each host's addresses), those that failed in the last minute last, at
// most MaxAddresses of them, and returns the first connection made.
func (t *Transport) Connect(ctx context.Context, r scheduler.Route) (scheduler.Conn, error) {
	rt, ok := r.(route)
	if !ok {
		return nil, fmt.Errorf("outbound: foreign route %T", r)
	}
	set := t.settings.Load()
	opts := set.Client
	opts.TLS = smtpclient.TLSPolicy(rt.dest.TLS)
	if rt.dest.Route != nil && rt.dest.Route.Auth != nil {
		opts.Auth = &smtpclient.Auth{Username: rt.dest.Route.Auth.Username, Password: rt.dest.Route.Auth.Password}
	}
	var errs []error
	tried := 0
	for _, cand := range t.candidates(rt.dest, set.MaxAddresses) {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		tried++
		c, err := smtpclient.Dial(ctx, cand.addr, cand.name, opts)
		if err == nil {
			if t.STARTTLS != nil {
				t.STARTTLS.WithLabelValues(c.TLSOutcome()).Inc()
			}
			return &conn{c: c, t: t, dest: rt.dest, addr: cand.addr}, nil
		}
		if ctx.Err() == nil {
			t.failing.mark(cand.addr)
		}
		errs = append(errs, err)
	}
	if tried == 0 {
		return nil, fmt.Errorf("no address to connect to for %s", rt.dest.Key)
	}
	// The last error decides the class (a 421 backs the destination off
	// like any other failure to connect) and is what the queue shows.
	if tried == 1 {
		return nil, errs[0]
	}
	return nil, fmt.Errorf("%w (%d addresses tried)", errs[len(errs)-1], tried)
}

// candidate is one address to dial and the host name it is for.
type candidate struct{ addr, name string }

// candidates returns the addresses of d to dial, at most limit: in
// preference order (equal preferences shuffled), those that failed lately
// after the others.
func (t *Transport) candidates(d *resolve.Destination, limit int) []candidate {
	var good, failed []candidate
	for _, h := range shuffleEqual(d.Hosts) {
		for _, a := range h.Addrs {
			c := candidate{addr: netip.AddrPortFrom(a, uint16(h.Port)).String(), name: h.Name}
			if c.name == "" {
				c.name = a.String()
			}
			if t.failing.has(c.addr) {
				failed = append(failed, c)
			} else {
				good = append(good, c)
			}
		}
	}
	all := append(good, failed...)
	return all[:min(limit, len(all))]
}

// otherHost reports whether d has an address besides addr that has not
// failed lately.
func (t *Transport) otherHost(d *resolve.Destination, addr string) bool {
	for _, h := range d.Hosts {
		for _, a := range h.Addrs {
			if s := netip.AddrPortFrom(a, uint16(h.Port)).String(); s != addr && !t.failing.has(s) {
				return true
			}
		}
	}
	return false
}

// failedFor is how long an address that failed (no connection, no
// greeting, a 421) is tried after the others.
const failedFor = time.Minute

// failingAddrs are the addresses that failed in the last failedFor.
type failingAddrs struct {
	mu    sync.Mutex
	until map[string]time.Time
}

func (f *failingAddrs) mark(addr string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	if f.until == nil {
		f.until = map[string]time.Time{}
	}
	if len(f.until) >= 4096 {
		// Bounded, and without a scan per failure in a wide outage: the
		// memory is advice, so it starts again.
		clear(f.until)
	}
	f.until[addr] = now.Add(failedFor)
}

func (f *failingAddrs) has(addr string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	u, ok := f.until[addr]
	return ok && time.Now().Before(u)
}

// conn adapts an smtpclient.Conn to scheduler.Conn.
type conn struct {
	c    *smtpclient.Conn
	t    *Transport
	dest *resolve.Destination
	addr string // as dialled
	// begun is the message SendThen's next handed to the client for
	// envelope begunEnv: the scheduler's next Send of that envelope must
	// pass the same *smtpclient.Message.
	begunEnv *scheduler.Envelope
	begun    *smtpclient.Message
}

func (c *conn) Usable() bool     { return c.c.Usable() }
func (c *conn) Endpoint() string { return c.c.RemoteAddr() }
func (c *conn) Close() error     { return c.c.Close() }

// OffersDSN reports whether the server offered DSN.
func (c *conn) OffersDSN() bool { return c.c.OffersDSN() }

// Describe names the peer and the TLS session for the log.
func (c *conn) Describe() (host, tls string) {
	if tls = c.c.TLSInfo(); tls == "" {
		tls = "none"
	}
	return c.c.Host(), tls
}

// Send runs one transaction. A failure of RSET on a connection that
// already carried messages means the server dropped it while idle: the
// error wraps scheduler.ErrStale so the work is retried on a new
// connection without counting an attempt. Anything later (no reply to
// MAIL after RSET was answered, a connection lost during or after the
// data) may have delivered the message and counts as an attempt.
func (c *conn) Send(ctx context.Context, env *scheduler.Envelope, body []byte) ([]*mta.Reply, error) {
	return c.SendThen(ctx, env, body, nil)
}

// SendThen is Send, and lets the next message's transaction begin in the
// same write as this one's data (smtpclient.Conn.SendThen): next returns
// the envelope and body the scheduler sends next on this connection, or a
// nil envelope.
func (c *conn) SendThen(ctx context.Context, env *scheduler.Envelope, body []byte, next func() (*scheduler.Envelope, []byte)) ([]*mta.Reply, error) {
	m := c.begun
	if m == nil || c.begunEnv != env {
		m = message(env, body)
	}
	c.begunEnv, c.begun = nil, nil
	var follow func() *smtpclient.Message
	if next != nil {
		follow = func() *smtpclient.Message {
			env, body := next()
			if env == nil {
				return nil
			}
			c.begunEnv, c.begun = env, message(env, body)
			return c.begun
		}
	}
	res, err := c.c.SendThen(ctx, m, follow)
	if err != nil {
		if stale(err) {
			return nil, fmt.Errorf("%w: %w", scheduler.ErrStale, err)
		}
		if closing(err) && c.t != nil {
			c.t.failing.mark(c.addr)
			if c.t.otherHost(c.dest, c.addr) {
				return nil, fmt.Errorf("%w: %w", scheduler.ErrOtherHost, err)
			}
		}
		return nil, err
	}
	return res.Recipients, nil
}

// message is the smtpclient form of a scheduler envelope and its body.
func message(env *scheduler.Envelope, body []byte) *smtpclient.Message {
	return &smtpclient.Message{
		From: env.From, Recipients: env.Recipients, EnvID: env.EnvID, Ret: env.Ret,
		SMTPUTF8: env.SMTPUTF8, Body8Bit: env.Body8Bit, Data: body,
	}
}

// stale reports whether a Send error means the connection was spent
// before the transaction began: its RSET got no reply, or a 421 (the
// server closing a connection it found idle too long, as Postfix's smtpd
// does under load), or a transaction begun behind the last message's data
// got the same at MAIL (a server that ends sessions after some messages).
func stale(err error) bool {
	var e *smtpclient.Error
	if !errors.As(err, &e) {
		return false
	}
	return (e.Stage == "rset" || e.Begun) && (e.Reply == nil || e.Reply.Code == 421)
}

// closing reports whether a Send error is the server ending the session
// with 421 during the transaction, which it then did not take (RFC 5321
// §3.8). A 421 to RSET is stale instead.
func closing(err error) bool {
	var e *smtpclient.Error
	return errors.As(err, &e) && e.Stage != "rset" && e.Reply != nil && e.Reply.Code == 421
}

// shuffleEqual returns hosts with each run of equal preference in a new
// random order. The resolver's order is cached with the route, so without
// this every connection of a destination would go to the same one of its
// equally preferred MX hosts (RFC 5321 §5.1 asks to spread them).
func shuffleEqual(hosts []resolve.Host) []resolve.Host {
	if len(hosts) < 2 {
		return hosts
	}
	out := slices.Clone(hosts)
	for i := 0; i < len(out); {
		j := i + 1
		for j < len(out) && out[j].Preference == out[i].Preference {
			j++
		}
		group := out[i:j]
		rand.Shuffle(len(group), func(a, b int) { group[a], group[b] = group[b], group[a] })
		i = j
	}
	return out
}

// NewSTARTTLSCounter makes the counter of Transport.STARTTLS and registers
// it with reg (nil: not registered).
func NewSTARTTLSCounter(reg prometheus.Registerer) *prometheus.CounterVec {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mta_delivery_starttls_total",
		Help: "New outbound connections by how STARTTLS went: used, not_offered, refused (offered, then refused), fell_back (the handshake failed; sent without TLS), disabled (policy none).",
	}, []string{"result"})
	for _, r := range []string{smtpclient.TLSUsed, smtpclient.TLSNotOffered, smtpclient.TLSRefused, smtpclient.TLSFellBack, smtpclient.TLSDisabled} {
		c.WithLabelValues(r)
	}
	if reg != nil {
		reg.MustRegister(c)
	}
	return c
}
