package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/mta/accounting"
	"github.com/mtaproject/mta/mta/admin"
	"github.com/mtaproject/mta/mta/config"
	"github.com/mtaproject/mta/mta/inject"
	"github.com/mtaproject/mta/mta/mailbox"
	"github.com/mtaproject/mta/mta/outbound"
	"github.com/mtaproject/mta/mta/resolve"
	"github.com/mtaproject/mta/mta/smtpclient"
	"github.com/mtaproject/mta/scheduler"
	"github.com/mtaproject/mta/spool"
)

// newTransport builds the resolver and the SMTP client options. self
// describes this server for loop detection; its listener addresses may be
// filled in later, before delivery starts.
func newTransport(cfg *config.Config, reg prometheus.Registerer, self *resolve.Self) (*outbound.Transport, error) {
	routes, err := buildRoutes(cfg)
	if err != nil {
		return nil, err
	}
	res, err := resolve.New(resolve.Config{
		Servers:    cfg.DNS.Servers,
		Timeout:    cfg.DNS.Timeout.D(),
		Port:       cfg.Delivery.Port,
		Routes:     routes,
		DefaultTLS: resolve.TLSPolicy(cfg.Delivery.TLS),
		IPv6:       cfg.DNS.IPv6,
		Self:       self,
		Registerer: reg,
	})
	if err != nil {
		return nil, fmt.Errorf("dns: %w", err)
	}
	return outbound.New(res, outbound.NewSTARTTLSCounter(reg), clientSettings(cfg)), nil
}

// clientSettings are the outbound SMTP client's settings from cfg, which a
// reload may change.
func clientSettings(cfg *config.Config) outbound.Settings {
	t := cfg.Delivery.Timeouts
	return outbound.Settings{
		MaxAddresses: cfg.Delivery.MaxMXAddresses,
		Client: smtpclient.Options{
			LocalName:  cfg.Delivery.HeloName,
			NoChunking: !cfg.Delivery.Chunking,
			TLSConfig:  &tls.Config{MinVersion: tls.VersionTLS12},
			Timeouts: smtpclient.Timeouts{
				Connect: t.Connect.D(), Greeting: t.Greeting.D(), Command: t.Command.D(),
				DataInit: t.DataInit.D(), DataBlock: t.DataBlock.D(), DataDone: t.DataDone.D(),
			},
		},
	}
}

// buildRoutes turns the configuration's routes into the resolver's,
// reading their password files.
func buildRoutes(cfg *config.Config) (map[string]resolve.Route, error) {
	routes := map[string]resolve.Route{}
	for dom, r := range cfg.Routes {
		rr := resolve.Route{Hosts: r.Hosts, TLS: resolve.TLSPolicy(r.TLS)}
		if r.Auth != nil {
			field := "routes." + dom + ".auth.password_file"
			pw, err := readFirstLine(r.Auth.PasswordFile)
			if err != nil {
				return nil, cfg.FieldErr(field, err)
			}
			if pw == "" {
				return nil, cfg.FieldErr(field, fmt.Errorf("%s: empty password", r.Auth.PasswordFile))
			}
			rr.Auth = &resolve.Auth{Username: r.Auth.Username, Password: pw}
		}
		routes[dom] = rr
	}
	return routes, nil
}

// newSelf describes this server for the resolver's loop detection: its
// names and this machine's addresses; the listeners add themselves once
// bound (addListener).
func newSelf(cfg *config.Config) *resolve.Self {
	local := map[netip.Addr]bool{}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if p, err := netip.ParsePrefix(a.String()); err == nil {
				local[p.Addr().Unmap()] = true
			}
		}
	}
	names := []string{cfg.Hostname}
	if cfg.Delivery.HeloName != cfg.Hostname {
		names = append(names, cfg.Delivery.HeloName)
	}
	return &resolve.Self{Names: names, Local: func(a netip.Addr) bool { return local[a.Unmap()] }}
}

// addListener records a bound SMTP listener in self.
func addListener(self *resolve.Self, ln net.Listener) {
	if ap, err := netip.ParseAddrPort(ln.Addr().String()); err == nil {
		self.Listen = append(self.Listen, ap)
	}
}

// queueStore adapts the spool to the scheduler's Store.
type queueStore struct{ sp *spool.Spool }

func (q queueStore) Due(now time.Time, limit int, skip func(string) bool) ([]scheduler.Due, error) {
	entries, err := q.sp.Due(now, limit, skip)
	out := make([]scheduler.Due, len(entries))
	for i, e := range entries {
		out[i] = scheduler.Due{ID: e.ID, Domain: e.Domain, At: e.Due}
	}
	return out, err
}

func (q queueStore) Lease(items []scheduler.Due) ([]scheduler.Due, error) {
	li := make([]spool.LeaseItem, len(items))
	for i, it := range items {
		li[i] = spool.LeaseItem{ID: it.ID, Domain: it.Domain, At: it.At, Reply: it.Reply, Was: it.Was}
	}
	leased, err := q.sp.Lease(li)
	out := make([]scheduler.Due, len(leased))
	for i, it := range leased {
		out[i] = scheduler.Due{ID: it.ID, Domain: it.Domain, At: it.At, Reply: it.Reply, Received: it.Received, Priority: it.Priority}
	}
	return out, err
}

func (q queueStore) Message(id string) (*scheduler.Message, error) {
	m, err := q.sp.Get(id)
	if err != nil {
		return nil, err
	}
	out := &scheduler.Message{ID: m.ID, From: m.From, EnvID: m.EnvID, Ret: m.Ret, SMTPUTF8: m.SMTPUTF8,
		Body8Bit: m.Body8Bit, Received: m.Received, MessageID: m.MessageID, Size: m.Size,
		AuthUser: m.AuthUser, Priority: m.Priority, Metadata: m.Metadata, Recipients: make([]scheduler.Recipient, len(m.Recipients))}
	for i, r := range m.Recipients {
		out.Recipients[i] = scheduler.Recipient{Recipient: r.Recipient, Domain: r.Domain, Queued: r.Status == spool.Queued, Attempts: r.Attempts,
			LastReply: r.LastReply}
	}
	return out, nil
}

func (q queueStore) AppendBody(dst []byte, id string) ([]byte, error) {
	return q.sp.AppendBody(dst, id)
}

func (q queueStore) Defer(id, domain string, until time.Time, o scheduler.Outcome) error {
	return ignoreGone(q.sp.Defer(id, domain, until, spool.Outcome(o)))
}

func (q queueStore) Delivered(id string, results []scheduler.Result) error {
	return ignoreGone(q.sp.MarkDelivered(id, spoolResults(results)))
}

func (q queueStore) Failed(id string, results []scheduler.Result) error {
	return ignoreGone(q.sp.Fail(id, spoolResults(results)))
}

func spoolResults(results []scheduler.Result) []spool.Result {
	out := make([]spool.Result, len(results))
	for i, r := range results {
		out[i] = spool.Result{Address: r.Address, Outcome: spool.Outcome(r.Outcome)}
	}
	return out
}

// ignoreGone: a message removed by the administrator while in flight.
func ignoreGone(err error) error {
	if errors.Is(err, mta.ErrNotFound) {
		return nil
	}
	return err
}

// acceptor is the SMTP edge's Spooler: it stores a message and hands it to
// the scheduler in memory.
type acceptor struct {
	sp      *spool.Spool
	sched   *scheduler.Scheduler
	dkim    *signing
	returns *returnPath // nil without bounces.domain
	tenants tenantSet
}

func (a acceptor) NewID() string         { return a.sp.NewID() }
func (a acceptor) Room(size int64) error { return a.sp.Room(size) }

func (a acceptor) Accept(id string, env *mta.Envelope, header, body []byte) error {
	header, body = a.dkim.sign(id, env, header, body)
	if err := a.sp.Accept(id, env, header, body); err != nil {
		return err
	}
	if a.returns.ours(env) {
		a.returns.process(id, env, body) // stored first: the report is kept whatever it says
	}
	a.sched.Submit(id, domainsOf(env), env.Priority)
	return nil
}

// AcceptAll stores injected messages in one batch and hands them to
// delivery.
func (a acceptor) AcceptAll(msgs []inject.Message) error {
	in := make([]spool.Incoming, len(msgs))
	for i, m := range msgs {
		header, body := a.dkim.sign(m.ID, m.Env, m.Header, m.Body)
		in[i] = spool.Incoming{Message: spool.NewMessage(m.ID, m.Env), Header: header, Body: body}
		if m.VERP {
			in[i].Sent = &spool.SentRecord{Tenant: a.tenants.of(m.Env.AuthUser), Recipient: m.Env.Recipients[0].Address,
				MessageID: m.Env.MessageID, Metadata: m.Env.Metadata, Sent: m.Env.Received}
		}
	}
	if err := a.sp.PutAll(in); err != nil {
		return err
	}
	for _, m := range msgs {
		a.sched.Submit(m.ID, domainsOf(m.Env), m.Env.Priority)
	}
	return nil
}

// domainsOf lists the recipient domains of env, each once.
func domainsOf(env *mta.Envelope) []string {
	var domains []string
	for _, r := range env.Recipients {
		if d := mta.Domain(r.Address); !slices.Contains(domains, d) {
			domains = append(domains, d)
		}
	}
	return domains
}

// adminStore is the admin API's store: the spool, with the scheduler told
// of every change so that it takes effect at once.
type adminStore struct {
	*spool.Spool
	sched   *scheduler.Scheduler
	log     *zap.Logger // operator actions are logged at info; nil: not logged
	events  *eventLog   // and sent as events (accounting log, webhooks)
	tenants tenantSet
	// reload applies the configuration file again (mta reload).
	reload func() error
}

// Reload applies the configuration file again.
func (a adminStore) Reload() error {
	if a.reload == nil {
		return errors.New("reload is not available")
	}
	return a.reload()
}

// accountingEvents names the accounting event of each operator action.
var accountingEvents = map[string]string{"hold": accounting.Hold, "release": accounting.Release,
	"remove": accounting.Remove, "bounce": accounting.OperatorBounce}

// logged records an operator's action on a message.
// before reads a message's record ahead of an operator action, for its
// event; nil when no event is wanted or it cannot be read.
func (a adminStore) before(id string) *spool.Message {
	if !a.events.on() {
		return nil
	}
	m, _ := a.Spool.Get(id)
	return m
}

func (a adminStore) logged(action, id string, m *spool.Message, err error) error {
	if err != nil {
		return err
	}
	if a.log != nil {
		a.log.Info("operator action", zap.String("action", action), zap.String("id", id))
	}
	if ev := accountingEvents[action]; ev != "" && a.events.on() {
		e := &accounting.Event{Event: ev, ID: id, Tenant: defaultTenant}
		if m != nil {
			e.MessageID, e.Sender, e.Tenant, e.Metadata = m.MessageID, m.From, a.tenants.of(m.AuthUser), m.Metadata
		}
		a.events.Write(e)
	}
	return nil
}

func (a adminStore) Hold(id string) error {
	m := a.before(id)
	err := a.Spool.Hold(id)
	if err == nil {
		a.sched.Drop(id)
	}
	return a.logged("hold", id, m, err)
}

func (a adminStore) Remove(id string) error {
	m := a.before(id)
	err := a.Spool.Remove(id)
	if err == nil {
		a.sched.Drop(id)
	}
	return a.logged("remove", id, m, err)
}

// Bounce fails the message's remaining recipients now and returns it to
// its sender.
func (a adminStore) Bounce(id string) error {
	m := a.before(id)
	err := a.Spool.Bounce(id, "550 5.0.0 Returned to the sender by the mail administrator")
	if err == nil {
		a.sched.Drop(id)
	}
	return a.logged("bounce", id, m, err)
}

func (a adminStore) Release(id string) error {
	m := a.before(id)
	err := a.Spool.Release(id)
	if err == nil {
		a.sched.Kick()
	}
	return a.logged("release", id, m, err)
}

// FlushMessage makes message id's queued recipients due now.
func (a adminStore) FlushMessage(id string) error {
	if m, err := a.Spool.Get(id); err == nil && m.Held {
		return fmt.Errorf("%s: %w", id, admin.ErrHeld)
	}
	err := a.Spool.Reschedule(id, time.Now())
	if err == nil {
		a.sched.Kick()
	}
	return a.logged("flush", id, nil, err) // logged, no event
}

// EndBackoffs ends every destination's backoff.
func (a adminStore) EndBackoffs() { a.sched.EndBackoffs() }

// Flush makes every deferred message due now and ends every destination's
// backoff, so that the mail is tried at once.
func (a adminStore) Flush() (int, error) {
	a.sched.EndBackoffs() // first: a scan between the two would postpone the flushed mail again
	n, err := a.Spool.Flush()
	a.sched.Kick()
	if a.log != nil && err == nil {
		a.log.Info("operator action", zap.String("action", "flush"), zap.Int("rescheduled", n))
	}
	return n, err
}

// router is the scheduler's Transport: local domains go to the mailboxes,
// every other domain over SMTP.
type router struct {
	local   map[string]bool
	mailbox scheduler.Transport
	remote  scheduler.Transport
}

func newRouter(localDomains []string, mailbox, remote scheduler.Transport) router {
	local := map[string]bool{}
	for _, d := range localDomains {
		local[strings.ToLower(d)] = true
	}
	return router{local: local, mailbox: mailbox, remote: remote}
}

func (r router) Route(ctx context.Context, domain string) (scheduler.Route, error) {
	if r.local[strings.ToLower(domain)] {
		return r.mailbox.Route(ctx, domain)
	}
	return r.remote.Route(ctx, domain)
}

func (r router) Connect(ctx context.Context, rt scheduler.Route) (scheduler.Conn, error) {
	if rt.Class() == mailbox.Class {
		return r.mailbox.Connect(ctx, rt)
	}
	return r.remote.Connect(ctx, rt)
}

// mailboxStore adapts the spool to local delivery's Store.
type mailboxStore struct{ sp *spool.Spool }

func (m mailboxStore) DeliverLocal(id string, copies []mailbox.Copy) error {
	out := make([]spool.LocalCopy, len(copies))
	for i, c := range copies {
		out[i] = spool.LocalCopy{Mailbox: c.Mailbox, Recipients: c.Recipients, Header: c.Header, Body: c.Body}
	}
	return ignoreGone(m.sp.DeliverLocal(id, out))
}

func (m mailboxStore) MailboxUsage(name string) (int, int64, error) { return m.sp.MailboxUsage(name) }

// Destinations gives the admin API delivery's view of its destinations.
func (a adminStore) Destinations() []admin.Destination {
	var out []admin.Destination
	for _, d := range a.sched.Destinations() {
		ad := admin.Destination{Key: d.Key, Class: d.Class, Queued: d.Queued, Connections: d.Connections, Window: d.Window,
			BackedOff: d.BackedOff, Failures: d.Failures, LastError: d.LastError}
		if d.BackedOff {
			t := d.BackoffEnds
			ad.BackoffEnds = &t
		}
		if !d.LastErrorAt.IsZero() {
			t := d.LastErrorAt
			ad.LastErrorAt = &t
		}
		out = append(out, ad)
	}
	return out
}

// Suspend stops delivery to domain (mta dest suspend).
func (a adminStore) Suspend(domain string, d time.Duration) {
	a.sched.Suspend(domain, d)
	if a.log != nil {
		a.log.Info("operator action", zap.String("action", "suspend"), zap.String("domain", domain), zap.Duration("for", d))
	}
}

// Resume ends a suspension (mta dest resume).
func (a adminStore) Resume(domain string) error {
	if !a.sched.Resume(domain) {
		return mta.ErrNotFound
	}
	// The domain's mail waits postponed: make the waiting mail due now, as
	// queue flush does, so that it goes at once.
	if _, err := a.Spool.Flush(); err != nil {
		return err
	}
	a.sched.Kick()
	if a.log != nil {
		a.log.Info("operator action", zap.String("action", "resume"), zap.String("domain", domain))
	}
	return nil
}

// Suspensions lists the suspended domains.
func (a adminStore) Suspensions() map[string]time.Time { return a.sched.Suspended() }
