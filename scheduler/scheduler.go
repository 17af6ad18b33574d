package scheduler

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/scheduler/conncache"
)

// ErrStale is wrapped by a Conn's Send error when a reused connection
// turned out to be dead before the transaction started (RSET or MAIL got
// no reply): the work is retried at once on a new connection, without
// counting an attempt.
var ErrStale = errors.New("stale connection")

// ErrOtherHost is wrapped by a Conn's Send error when the server ended the
// session (421) without taking the message and the route has another host
// that has not failed lately: the work is tried again at once on a new
// connection, which the Transport makes to another host, without counting
// an attempt or backing off the destination, as Postfix tries the next MX.
// A work is tried so once; the next such failure is a deferral.
var ErrOtherHost = errors.New("the server is closing; another host may take the mail")

// Options configure a Scheduler. Zero values get the defaults in brackets.
type Options struct {
	Store     Store
	Transport Transport

	// Limits are the limits a reload may change (SetLimits).
	Limits
	Lease        time.Duration // next attempt written before an attempt (1m)
	WindowSize   int           // work items in memory (20000)
	ScanInterval time.Duration // due-index scan period (1s)
	RouteTTL     time.Duration // domain → destination kept this long (30s)
	StopGrace    time.Duration // on stop, transactions in flight may finish this long (30s)
	// Memory bounds the message bodies held at once, shared with the SMTP
	// edge: a delivery waits for room before it reads its body; nil:
	// unbounded.
	Memory *mta.Budget

	Logger     *zap.Logger
	Registerer prometheus.Registerer
	// Observe, when set, is told of every recipient outcome (the
	// accounting log). It is called from delivery workers: it must be quick
	// and safe for concurrent use.
	Observe func(OutcomeEvent)
	Now     func() time.Time
	Seed    uint64 // jitter; 0: random
}

// Limits are the settings a running scheduler can change (SetLimits).
type Limits struct {
	MaxConnections           int // all destinations (500)
	MaxPerDestination        int // per destination (20)
	InitialPerDestination    int // a destination starts with this many, +1 per good connection (5)
	MaxMessagesPerConnection int // then a new connection (1000)
	// MaxRecipientsPerTransaction bounds the RCPTs of one transaction: a
	// message's recipients at one domain past it go in further
	// transactions of the same attempt (100, the least RFC 5321
	// §4.5.3.1.8 lets a server take).
	MaxRecipientsPerTransaction int
	IdleTimeout                 time.Duration // idle connection kept for reuse (10s)
	MinBackoff, MaxBackoff      time.Duration // retry delay bounds (5m, 4000s)
	MaxLifetime                 time.Duration // then a deferral is a failure (5 days)
	// Domains replaces some of these limits for the mail of a recipient
	// domain (lower case): a receiver that wants fewer connections or
	// fewer messages on each, or a relay that can take more.
	Domains map[string]DestinationLimits
}

// DestinationLimits are an operator's limits for one recipient domain's
// mail; a zero field keeps the Limits value. The mail of a domain with its
// own limits has its own destination queue and connections, apart from
// other domains with the same next hops, so that the limits are its own.
type DestinationLimits struct {
	MaxConnections           int // at once, instead of MaxPerDestination (still within MaxConnections)
	MaxMessagesPerConnection int // instead of MaxMessagesPerConnection
	// MaxRecipientsPerTransaction replaces Limits' for the domain's
	// transactions. It is not a limit of the destination's: a domain with
	// only this one shares its next hops' destination.
	MaxRecipientsPerTransaction int
}

// keySuffix is what a destination key carries for these limits: domains
// with the same next hops and the same limits share a destination.
func (l DestinationLimits) keySuffix() string {
	if l.MaxConnections == 0 && l.MaxMessagesPerConnection == 0 {
		return ""
	}
	return fmt.Sprintf(" limits=%d/%d", l.MaxConnections, l.MaxMessagesPerConnection)
}

// defaults fills in the zero values.
func (l *Limits) defaults() {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	defd := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&l.MaxConnections, 500)
	def(&l.MaxPerDestination, 20)
	def(&l.InitialPerDestination, 5)
	def(&l.MaxMessagesPerConnection, 1000)
	def(&l.MaxRecipientsPerTransaction, 100)
	defd(&l.IdleTimeout, 10*time.Second)
	defd(&l.MinBackoff, 5*time.Minute)
	defd(&l.MaxBackoff, 4000*time.Second)
	defd(&l.MaxLifetime, 5*24*time.Hour)
}

func (o *Options) defaults() {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	defd := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	o.Limits.defaults()
	def(&o.WindowSize, 20000)
	defd(&o.Lease, time.Minute)
	defd(&o.ScanInterval, time.Second)
	defd(&o.RouteTTL, 30*time.Second)
	defd(&o.StopGrace, 30*time.Second)
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Seed == 0 {
		o.Seed = rand.Uint64()
	}
}

// Scheduler delivers the queue. Create it with New, start it with Run.
type Scheduler struct {
	opts  Options
	lim   atomic.Pointer[Limits] // opts.Limits, replaced whole by SetLimits
	log   *zap.Logger
	m     *instruments
	cache *conncache.Cache[Conn]

	// Channels into the state-owning goroutine.
	fresh chan Due
	// urgentFresh carries transactional work; the loop serves it as
	// fresh, its own channel keeps bulk bursts from filling it.
	urgentFresh chan Due
	next        chan nextReq
	events      chan event
	kick        chan struct{}
	unback      chan chan struct{} // end every destination's backoff (flush); closed when done
	status      chan chan []DestinationStatus
	// settle asks the loop to close the channel once the postponements
	// made so far are written to the store (see awaitPostponed).
	settle   chan chan struct{}
	settling []settleWaiter // the loop's: waiting for postponement batches
	retune   chan struct{}  // the limits changed: serve what they now allow
	drops    chan struct{}  // signals that dropIDs has IDs
	dropMu   sync.Mutex

	// suspended holds the domains an operator suspended (Suspend), each
	// until a time (zero: until Resume). Read by workers, hence the lock.
	suspendMu sync.Mutex
	everHeld  atomic.Bool // a domain was ever suspended: until then nothing below needs the lock
	suspended map[string]time.Time
	since     map[string]time.Time     // when each suspension began
	grace     map[string]time.Duration // time a domain spent suspended: added to its lifetime
	dropIDs   []string

	// Owned by run.
	window map[workKey]*work
	count  map[string]int // work items in the window, by domain
	// overflow holds fresh work that found its domain at its share of the
	// window, in arrival order per domain: it enters as room frees, instead
	// of waiting a lease for the due scan. Keys still in waitingFresh are
	// live; a key the scan brought in meanwhile is dropped from it.
	overflow     map[string][]workKey
	waitingFresh map[workKey]bool
	roomFreed    bool // work left the window since the last refill
	domains      map[string]*domainState
	dests        map[string]*dest
	waiting      []*dest // destinations with queued work waiting for a global slot
	active       int     // connection workers running
	rnd          *rand.Rand
	full         bool // the last scan filled its limit: scan again soon
	// scanning is set while the work a scan found is being leased, off
	// the loop; rescan asks for another scan once it is done.
	scanning, rescan bool

	rndMu     sync.Mutex // guards workerRnd, shared by workers
	workerRnd *rand.Rand

	postponing   []Due // postponements not yet written
	postponeBusy bool  // a batch of postponements is being written
	// Batches of postponements started and written, counted so that a
	// settle waits for the batches holding what was postponed before it,
	// not for a moment when nothing at all is being postponed.
	postponeStarted, postponeWritten uint64

	running      atomic.Bool  // Run is running
	windowSize   atomic.Int64 // len(window), for metrics
	freshWaiting atomic.Int64 // len(waitingFresh), for metrics
	backedOff    atomic.Int64 // destinations backed off now, for metrics
	activeDests  atomic.Int64 // destinations with work or connections, for metrics

	workers sync.WaitGroup
	ctx     context.Context // cancelled when Run is told to stop: no new work
	sendCtx context.Context // cancelled StopGrace later: transactions abort
}

type workKey struct{ id, domain string }

// work is one (message, domain) pair in the active window.
type work struct {
	key      workKey
	dropped  bool // held or removed while queued
	requeued bool // already retried once on a fresh connection
	urgent   bool // transactional: queued ahead of bulk work
}

type domainState struct {
	route     Route
	key       string            // of its destination: the route's, and own's (see setRoute)
	own       DestinationLimits // the operator's limits for the domain
	routedAt  time.Time
	resolving bool
	waiting   []*work
}

// dest is a destination: a next-hop set and its queue.
type dest struct {
	key       string
	route     Route
	queue     []*work   // the urgent work first (urgent of them), then the rest, each in arrival order
	urgent    int       // how many at the front of queue are urgent
	active    int       // connection workers
	deadUntil time.Time // backed off after connection failures
	failures  int       // consecutive connection failures
	window    int       // connections allowed now: grows from the initial window by one per good new connection
	why       string    // the last connection failure, for the queue listing
	failedAt  time.Time // when it was
	inWaiting bool
	own       DestinationLimits // the operator's, for the domains of this key
	open      int               // workers with a connection open (evUp)
}

type nextReq struct {
	key    string
	served int
	reply  chan *work
}

// event is what workers and resolvers report to run.
type event struct {
	kind   eventKind
	key    string // destination key
	domain string
	route  Route
	err    error
	work   *work
	at     time.Time // evConnOK: when the connection attempt began
	leased []Due     // evLeased: the scanned work the store leased
	// evConnFail of a new connection: told whether the work that asked
	// for it goes back to the queue (true) or had its attempt (false).
	requeue chan bool
	up      bool // evExit: the worker had sent evUp
	// evRequeue from a worker that closed its connection and ends: the
	// work is to go to a new connection, which takes the worker's place.
	handOver bool
}

type eventKind int

const (
	evDone      eventKind = iota // work finished (any outcome)
	evRequeue                    // work goes back to the front of its queue
	evExit                       // a connection worker ended
	evConnOK                     // a connection was made: the destination is alive
	evConnFail                   // a connection could not be made or broke with 421
	evRouted                     // a domain was resolved (or failed to)
	evPostponed                  // a batch of postponements is written
	evLeased                     // the work a scan found is leased (or failed to be)
	evUp                         // a worker has a connection open (its evExit then says up)
)

// New returns a scheduler; Run starts it.
func New(opts Options) *Scheduler {
	opts.defaults()
	s := &Scheduler{
		opts:         opts,
		log:          opts.Logger,
		fresh:        make(chan Due, 8192),
		urgentFresh:  make(chan Due, 1024),
		next:         make(chan nextReq),
		events:       make(chan event, 1024),
		kick:         make(chan struct{}, 1),
		unback:       make(chan chan struct{}),
		status:       make(chan chan []DestinationStatus),
		settle:       make(chan chan struct{}),
		retune:       make(chan struct{}, 1),
		drops:        make(chan struct{}, 1),
		window:       map[workKey]*work{},
		count:        map[string]int{},
		overflow:     map[string][]workKey{},
		waitingFresh: map[workKey]bool{},
		domains:      map[string]*domainState{},
		dests:        map[string]*dest{},
		rnd:          rand.New(rand.NewPCG(opts.Seed, opts.Seed^0x9e3779b97f4a7c15)),
	}
	lim := opts.Limits
	s.lim.Store(&lim)
	s.workerRnd = rand.New(rand.NewPCG(opts.Seed+1, opts.Seed))
	s.m = newMetrics(s, opts.Registerer)
	s.cache = conncache.New[Conn](conncache.Options{
		IdleTimeout: opts.IdleTimeout,
		MaxMessages: opts.MaxMessagesPerConnection,
		MaxIdle:     opts.MaxPerDestination,
		Now:         opts.Now,
		OnClose: func(reason string, messages int) {
			s.m.connClosed.WithLabelValues(reason).Inc()
			s.m.messagesPerConn.Observe(float64(messages))
		},
	})
	return s
}

// limits returns the limits in force.
func (s *Scheduler) limits() *Limits { return s.lim.Load() }

// SetLimits replaces the limits while the scheduler runs (a reload): new
// connections and attempts follow them at once; connections open over a
// lowered limit finish their current message and are not replaced. Zero
// values take the defaults.
func (s *Scheduler) SetLimits(l Limits) {
	l.defaults()
	s.lim.Store(&l)
	s.cache.SetLimits(l.IdleTimeout, l.MaxMessagesPerConnection, l.MaxPerDestination)
	select {
	case s.retune <- struct{}{}:
	default:
	}
}

// Submit hands over a message that was just accepted: its work enters the
// window at once, without waiting for a scan. It never blocks; if the
// scheduler is busy the work is found by the next scan instead.
// Transactional work goes ahead of the bulk work queued for its
// destination, and enters the window even when bulk work fills its share.
func (s *Scheduler) Submit(id string, domains []string, p mta.Priority) {
	ch := s.fresh
	if p == mta.PriorityTransactional {
		ch = s.urgentFresh // a burst of bulk mail cannot crowd it out
	}
	for _, d := range domains {
		select {
		case ch <- Due{ID: id, Domain: d, urgent: p == mta.PriorityTransactional}:
		default:
			s.m.submitDropped.Inc()
		}
	}
}

// Kick makes the scheduler scan the due index now (after flush or release).
func (s *Scheduler) Kick() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// EndBackoffs ends the backoff of every destination: after `mta queue
// flush`, mail for a destination that was backed off is tried at once, as
// the operator asked. It returns once the scheduler has applied it (or
// after a few seconds if it is too busy or not running), so that work made
// due after it is not postponed again.
func (s *Scheduler) EndBackoffs() {
	if !s.running.Load() {
		return
	}
	done := make(chan struct{})
	select {
	case s.unback <- done:
		<-done
	case <-time.After(5 * time.Second):
	}
}

// Drop removes a message's queued work from memory (after hold or remove).
// Work already being delivered finishes. It never blocks.
func (s *Scheduler) Drop(id string) {
	if !s.running.Load() {
		return // not delivering: nothing in memory to drop
	}
	s.dropMu.Lock()
	s.dropIDs = append(s.dropIDs, id)
	s.dropMu.Unlock()
	select {
	case s.drops <- struct{}{}:
	default:
	}
}

// Run delivers until ctx is cancelled, then waits for the transactions in
// flight to end and closes the cached connections.
func (s *Scheduler) Run(ctx context.Context) {
	s.running.Store(true)
	defer s.running.Store(false)
	s.ctx = ctx
	sendCtx, abort := context.WithCancel(context.WithoutCancel(ctx))
	defer abort()
	s.sendCtx = sendCtx
	context.AfterFunc(ctx, func() { time.AfterFunc(s.opts.StopGrace, abort) })
	tick := time.NewTicker(s.opts.ScanInterval)
	defer tick.Stop()
	s.scan()
	for {
		select {
		case <-ctx.Done():
			s.stop()
			return
		case d := <-s.urgentFresh:
			if !s.addUrgent(d.ID, d.Domain) {
				s.addFresh(d.ID, d.Domain)
			}
		case d := <-s.fresh:
			s.addFresh(d.ID, d.Domain)
		case r := <-s.next:
			r.reply <- s.nextFor(r)
		case ev := <-s.events:
			s.handle(ev)
		case <-s.drops:
			s.dropMu.Lock()
			ids := s.dropIDs
			s.dropIDs = nil
			s.dropMu.Unlock()
			for _, id := range ids {
				s.drop(id)
			}
		case <-s.kick:
			s.scan()
		case <-s.retune:
			s.retuned()
		case done := <-s.unback:
			for _, d := range s.dests {
				d.deadUntil, d.failures = time.Time{}, 0
			}
			close(done)
		case reply := <-s.status:
			reply <- s.destinations()
		case done := <-s.settle:
			upTo := s.postponeStarted
			if len(s.postponing) > 0 {
				upTo++ // they go in the next batch
			}
			s.settling = append(s.settling, settleWaiter{done: done, upTo: upTo})
		case <-tick.C:
			s.scan()
			s.sweep()
		}
		if s.roomFreed {
			s.refill()
		}
		if s.full && len(s.window) < s.opts.WindowSize/2 {
			s.scan()
		}
		s.flushPostponed()
		if len(s.settling) > 0 {
			s.releaseSettled(false)
		}
		s.windowSize.Store(int64(len(s.window)))
		s.freshWaiting.Store(int64(len(s.waitingFresh)))
	}
}

// stop drains the workers: they see ctx cancelled and finish, within
// StopGrace. The idle cached connections are closed (with QUIT) at once and
// in parallel, and what is not done by the end of the grace is left to
// finish by itself: the stop never waits longer than StopGrace.
func (s *Scheduler) stop() {
	// No more postponements are started: a Resume waits for nothing now
	// (a batch being written may still land after its flush).
	s.releaseSettled(true)
	deadline := time.Now().Add(s.opts.StopGrace)
	cacheClosed := make(chan struct{})
	go func() { s.cache.Close(); close(cacheClosed) }()
	done := make(chan struct{})
	go func() { s.workers.Wait(); close(done) }()
	for {
		select {
		case <-done:
			select {
			case <-cacheClosed:
			case <-time.After(time.Until(deadline)):
			}
			return
		case r := <-s.next:
			r.reply <- nil
		case ev := <-s.events:
			if ev.kind == evDone || ev.kind == evRequeue {
				s.forget(ev.work)
			}
			if ev.requeue != nil {
				ev.requeue <- true // stopping: the work goes back (and is forgotten) without an attempt
			}
		case done := <-s.settle:
			close(done)
		}
	}
}

// scan brings due work from the store into the window, leasing it first.
// Work for a destination that is backed off is postponed in the same batch
// instead, without entering the window. The loop reads the due index; the
// lease, which reads and rewrites every record found, is written by
// another goroutine, and leased adds what it leased to the window: with a
// deep queue in the tables a batch takes long enough that, in the loop,
// it held up every worker waiting for its next message. One lease is
// written at a time; a scan asked for meanwhile runs when it is done.
func (s *Scheduler) scan() {
	if s.scanning {
		s.rescan = true
		return
	}
	room := s.opts.WindowSize - len(s.window)
	if room <= 0 {
		return
	}
	limit := min(room, 5000)
	now := s.opts.Now()
	// Take each domain's due work only up to its share of the window, as
	// the entries come, so that the earliest entries (one deep backlog)
	// do not fill the window ahead of everyone else's.
	taken, extra := map[string]int{}, 0
	skip := func(domain string) bool {
		if s.backedOffDest(domain, now) != nil {
			return false // postponed in the lease batch, without entering
		}
		if !s.admits(domain, taken[domain], extra) {
			return true
		}
		taken[domain]++
		extra++
		return false
	}
	due, err := s.opts.Store.Due(now, limit, skip)
	if err != nil {
		s.full = false
		s.log.Error("scheduler: reading the due index", zap.Error(err))
		return
	}
	s.full = len(due) == limit
	items := due[:0]
	postponed := 0
	for _, d := range due {
		d.Was = d.At // lease only if still due then: a deferral written meanwhile wins
		switch dst := s.backedOffDest(d.Domain, now); {
		case s.window[workKey{d.ID, d.Domain}] != nil:
			// Still in memory past its lease (a slow destination): renew
			// the lease, so that the scan moves on to other due work and
			// a crash still finds it due one lease later.
			d.At = now.Add(s.opts.Lease)
		case dst != nil:
			d.At = s.spread(dst.deadUntil, now)
			d.Reply = dst.why
			postponed++
		default:
			d.At = now.Add(s.opts.Lease)
		}
		items = append(items, d)
	}
	if len(items) == 0 {
		return
	}
	s.scanning = true
	s.workers.Add(1)
	go func() {
		defer s.workers.Done()
		leased, err := s.opts.Store.Lease(items)
		if err != nil {
			s.log.Error("scheduler: leasing due work", zap.Error(err))
		} else {
			s.m.postponed.Add(float64(postponed))
			if old := s.expired(leased, now); len(old) > 0 {
				s.workers.Add(1)
				go s.expireDue(old)
			}
		}
		s.events <- event{kind: evLeased, leased: leased, err: err}
	}()
}

// leased adds the work a scan's lease batch leased to the window, and
// runs the scan asked for while it was written.
func (s *Scheduler) leased(items []Due, err error) {
	s.scanning = false
	if err != nil {
		s.full = false // retry at the next tick, not in a loop
		s.rescan = false
		return
	}
	for _, d := range items {
		// Only work the store actually leased: a message held meanwhile
		// was skipped and must not start.
		if d.Reply == "" && s.window[workKey{d.ID, d.Domain}] == nil {
			delete(s.waitingFresh, workKey{d.ID, d.Domain}) // the scan brought it: the overflow copy is stale
			if d.Priority != mta.PriorityTransactional || !s.addUrgent(d.ID, d.Domain) {
				s.add(d.ID, d.Domain)
			}
		}
	}
	if s.rescan {
		s.rescan = false
		s.scan()
	}
}

// admits reports whether work for domain may enter the window, with plus
// more of its items and extra more items in all already promised. A domain
// may hold up to its share: three quarters of the window divided among the
// domains in it (at least a 64th of the window), so that a quarter is
// always free for a newcomer and no deep backlog crowds out the others.
func (s *Scheduler) admits(domain string, plus, extra int) bool {
	size := s.opts.WindowSize
	if len(s.window)+extra >= size {
		return false
	}
	c := s.count[domain] + plus
	domains := len(s.count)
	if s.count[domain] == 0 {
		domains++
	}
	share := max(size*3/4/domains, size/64, 1)
	return c < share
}

// addFresh puts freshly accepted work in the window, or, when its domain
// is at its share, in the overflow to enter as room frees. Only past the
// overflow's bound is it left to the due scan, and that is counted.
func (s *Scheduler) addFresh(id, domain string) {
	k := workKey{id, domain}
	if len(s.overflow[domain]) == 0 && s.add(id, domain) {
		return
	}
	if s.window[k] != nil || s.waitingFresh[k] {
		return
	}
	if len(s.waitingFresh) >= 4*s.opts.WindowSize {
		s.m.freshToScan.Inc()
		return
	}
	s.overflow[domain] = append(s.overflow[domain], k)
	s.waitingFresh[k] = true
}

// maxUrgentOver bounds, as a multiple of the window, the transactional
// work let into the window past its limits: beyond it, transactional mail
// waits its turn as bulk mail does.
const maxUrgentOver = 1

// addUrgent puts transactional work in the window even when bulk work
// fills its domain's share or the window; it reports false (the work then
// goes the ordinary way) past maxUrgentOver windows.
func (s *Scheduler) addUrgent(id, domain string) bool {
	k := workKey{id, domain}
	if w := s.window[k]; w != nil {
		return true
	}
	if len(s.window) >= (1+maxUrgentOver)*s.opts.WindowSize {
		return false
	}
	s.insert(k, true)
	return true
}

// refill moves fresh work from the overflow into the window while its
// domains are admitted.
func (s *Scheduler) refill() {
	s.roomFreed = false
	for domain, q := range s.overflow {
		n := 0
		for ; n < len(q); n++ {
			k := q[n]
			if !s.waitingFresh[k] {
				continue // brought in by the scan, or dropped
			}
			if !s.add(k.id, k.domain) {
				break
			}
			delete(s.waitingFresh, k)
		}
		if n == len(q) {
			delete(s.overflow, domain)
		} else {
			s.overflow[domain] = q[n:]
		}
	}
}

// remove takes work out of the window.
func (s *Scheduler) remove(k workKey) {
	if _, ok := s.window[k]; !ok {
		return
	}
	delete(s.window, k)
	if s.count[k.domain]--; s.count[k.domain] <= 0 {
		delete(s.count, k.domain)
	}
	s.roomFreed = true
}

// backedOffDest returns the destination domain is known to route to if
// that destination is backed off now, else nil.
func (s *Scheduler) backedOffDest(domain string, now time.Time) *dest {
	ds := s.domains[domain]
	if ds == nil || ds.route == nil {
		return nil
	}
	if d := s.dests[ds.key]; d != nil && now.Before(d.deadUntil) {
		return d
	}
	return nil
}

// spread returns until plus a random part of a tenth of the delay, so that
// a backlog postponed together does not come due at one instant.
func (s *Scheduler) spread(until, now time.Time) time.Time {
	if window := until.Sub(now) / 10; window > 0 {
		return until.Add(time.Duration(s.rnd.Int64N(int64(window))))
	}
	return until
}

// add puts work in the window and routes it. It reports false when the
// domain is not admitted (see admits); work already in the window counts
// as added.
func (s *Scheduler) add(id, domain string) bool {
	k := workKey{id, domain}
	if _, ok := s.window[k]; ok {
		return true
	}
	if !s.admits(domain, 0, 0) {
		return false
	}
	s.insert(k, false)
	return true
}

// insert puts new work in the window and queues it for its destination
// (routing the domain first when its route is not known).
func (s *Scheduler) insert(k workKey, urgent bool) {
	domain := k.domain
	w := &work{key: k, urgent: urgent}
	s.window[k] = w
	s.count[domain]++
	ds := s.domains[domain]
	if ds == nil {
		ds = &domainState{}
		s.domains[domain] = ds
	}
	if ds.route != nil && s.opts.Now().Sub(ds.routedAt) < s.opts.RouteTTL {
		s.enqueue(s.destFor(ds), w)
		return
	}
	ds.waiting = append(ds.waiting, w)
	if !ds.resolving {
		ds.resolving = true
		s.workers.Add(1)
		go s.resolve(domain)
	}
}

func (s *Scheduler) resolve(domain string) {
	defer s.workers.Done()
	ctx, cancel := context.WithTimeout(s.sendCtx, time.Minute)
	defer cancel()
	r, err := s.opts.Transport.Route(ctx, domain)
	s.events <- event{kind: evRouted, domain: domain, route: r, err: err}
}

// setRoute records route r for domain's mail, and the key of its
// destination: the route's, and the domain's own limits when it has some.
func (s *Scheduler) setRoute(domain string, ds *domainState, r Route) {
	if a, ok := mta.NormalizeDomain(domain); ok {
		domain = a // an internationalized domain as the configuration has it: A-labels
	}
	ds.route, ds.own = r, s.limits().Domains[domain]
	ds.key = r.Key() + ds.own.keySuffix()
}

// destFor returns the destination of a domain's mail, made if new. A new
// one for next hops that another destination (with other limits) knows
// to be failing starts backed off as that one is: a reload of the limits
// does not earn a dead destination a probe.
func (s *Scheduler) destFor(ds *domainState) *dest {
	d := s.dests[ds.key]
	if d == nil {
		d = &dest{key: ds.key, route: ds.route, own: ds.own}
		if len(s.limits().Domains) > 0 { // only then do two destinations share next hops
			for _, o := range s.dests {
				if o.failures > 0 && o.route != nil && o.route.Key() == ds.route.Key() {
					d.deadUntil, d.failures, d.why, d.failedAt = o.deadUntil, o.failures, o.why, o.failedAt
					break
				}
			}
		}
		s.dests[ds.key] = d
	}
	d.route = ds.route
	return d
}

// requeueMoved moves the queued work of domains whose destination key
// changed (their own limits did, in a reload) to their new destination,
// so that the new limits hold for it at once rather than after the old
// destination's backlog has drained under the old ones; the old
// destination's connections end as they find nothing more to send.
func (s *Scheduler) requeueMoved() {
	var moved []*work
	for _, d := range s.dests {
		kept, urgent := d.queue[:0], 0
		for _, w := range d.queue {
			if ds := s.domains[w.key.domain]; ds != nil && ds.route != nil && ds.key != d.key {
				moved = append(moved, w)
				continue
			}
			kept = append(kept, w)
			if w.urgent {
				urgent++
			}
		}
		clear(d.queue[len(kept):])
		d.queue, d.urgent = kept, urgent
	}
	for _, w := range moved {
		s.enqueue(s.destFor(s.domains[w.key.domain]), w)
	}
}

// enqueue queues work for its destination, or postpones it if the
// destination is backed off.
func (s *Scheduler) enqueue(d *dest, w *work) {
	now := s.opts.Now()
	if now.Before(d.deadUntil) {
		s.postpone([]*work{w}, d.deadUntil, d.why)
		return
	}
	if w.urgent {
		d.queue = slices.Insert(d.queue, d.urgent, w)
		d.urgent++
	} else {
		d.queue = append(d.queue, w)
	}
	s.serve(d)
}

// limit is the connection limit of d: one probe while it is failing.
func (s *Scheduler) limit(d *dest) int {
	if d.failures > 0 {
		return 1
	}
	most := s.maxPer(d)
	if d.window == 0 {
		d.window = min(s.limits().InitialPerDestination, most)
	}
	d.window = min(d.window, most) // lowered by a reload
	return d.window
}

// maxPer is the most connections d may have: its own limit, or
// MaxPerDestination.
func (s *Scheduler) maxPer(d *dest) int {
	if d.own.MaxConnections > 0 {
		return d.own.MaxConnections
	}
	return s.limits().MaxPerDestination
}

// serve starts connection workers for d while it has queued work and
// slots; a destination that is out of global slots waits its turn.
func (s *Scheduler) serve(d *dest) {
	for len(d.queue) > 0 && d.active < s.limit(d) && (d.active == 0 || len(d.queue) > d.active*queuedPerConnection) {
		if s.active >= s.limits().MaxConnections {
			if !d.inWaiting {
				d.inWaiting = true
				s.waiting = append(s.waiting, d)
			}
			return
		}
		w := s.pop(d)
		if w == nil {
			return
		}
		d.active++
		s.active++
		s.workers.Add(1)
		go s.worker(d.key, d.route, w, d.own)
	}
}

// queuedPerConnection is the work that must be waiting for each
// connection a destination has before another is started: a connection
// is added when the ones open cannot keep up, not merely because the
// limit allows it. So a run to one destination uses few connections, each
// for many messages, and one that reaches its message limit near the end
// of a run is not replaced by several that carry a handful each.
const queuedPerConnection = 64

// pop takes the next live work of d's queue. Work for a suspended domain
// is postponed instead: a suspended domain gets no attempts.
func (s *Scheduler) pop(d *dest) *work {
	now := s.opts.Now()
	for len(d.queue) > 0 {
		w := d.queue[0]
		d.queue[0] = nil
		d.queue = d.queue[1:]
		if d.urgent > 0 {
			d.urgent--
		}
		if w.dropped {
			continue
		}
		if until, ok := s.suspendedUntil(w.key.domain, now); ok {
			s.postpone([]*work{w}, until, suspendedReply(w.key.domain))
			continue
		}
		return w
	}
	d.queue, d.urgent = nil, 0
	return nil
}

// fairShare is how many messages a worker sends in a row while other
// destinations wait for a global connection slot; then it yields.
const fairShare = 10

func (s *Scheduler) nextFor(r nextReq) *work {
	d := s.dests[r.key]
	if d == nil || s.ctx.Err() != nil {
		return nil
	}
	if len(s.waiting) > 0 && r.served >= fairShare {
		return nil
	}
	if d.active > s.maxPer(d) || s.active > s.limits().MaxConnections {
		return nil // over limits lowered by a reload: this connection ends
	}
	return s.pop(d)
}

func (s *Scheduler) handle(ev event) {
	switch ev.kind {
	case evDone:
		s.forget(ev.work)
	case evRequeue:
		d := s.dests[ev.key]
		switch {
		case d == nil || ev.work.dropped:
			s.forget(ev.work)
		case s.opts.Now().Before(d.deadUntil):
			s.postpone([]*work{ev.work}, d.deadUntil, d.why)
		case ev.handOver && s.ctx.Err() == nil:
			// It asks for a new connection (its cached one was stale, or
			// its server is closing): a worker of its own in the place of
			// the one that ends (whose evExit follows), not another's
			// connection, which may be to the same host.
			d.active++
			s.active++
			s.workers.Add(1)
			go s.worker(d.key, d.route, ev.work, d.own)
		default:
			if ev.work.urgent {
				d.queue = append([]*work{ev.work}, d.queue...)
				d.urgent++
			} else {
				d.queue = slices.Insert(d.queue, d.urgent, ev.work)
			}
			s.serve(d)
		}
	case evUp:
		if d := s.dests[ev.key]; d != nil {
			d.open++
		}
	case evExit:
		s.active--
		d := s.dests[ev.key]
		if d != nil {
			d.active--
			if ev.up {
				d.open--
			}
		}
		// Destinations that waited for a slot go first; d queues behind.
		s.serveWaiting()
		if d != nil {
			s.serve(d)
		}
	case evConnOK:
		d := s.dests[ev.key]
		if d == nil || ev.at.Before(d.failedAt) {
			// Begun before the destination last failed: says nothing.
			break
		}
		if d.failures > 0 {
			s.log.Info("destination reachable again", zap.String("destination", d.key), zap.Int("failures", d.failures))
			d.failures = 0
			d.deadUntil = time.Time{}
			d.window = 0 // start again from the initial window
		} else if d.window < s.maxPer(d) {
			d.window++ // each good new connection earns one more
		}
		s.serve(d)
	case evConnFail:
		d := s.dests[ev.key]
		if ev.requeue != nil && d != nil && d.failures == 0 && d.open > 0 && s.opts.Now().After(d.deadUntil) {
			// Its other connections are open: this one met the
			// receiver's limit of connections (a 421 greeting, a refused
			// connect), not an outage. The window shrinks to what is
			// open (Postfix's negative concurrency feedback) instead of
			// the destination being backed off, and a new connection's
			// work waits for an open one, without an attempt.
			d.window = max(1, d.open)
			s.log.Info("destination refused a connection while others are open; fewer connections", zap.String("destination", d.key),
				zap.Int("window", d.window), zap.Error(ev.err))
			ev.requeue <- true
			break
		}
		if ev.requeue != nil {
			ev.requeue <- false
		}
		s.backOff(ev.key, ev.err)
	case evRouted:
		s.routed(ev.domain, ev.route, ev.err)
	case evPostponed:
		s.postponeBusy = false
		s.postponeWritten++
	case evLeased:
		s.leased(ev.leased, ev.err)
	}
}

// retuned applies new limits: a destination's window is at least the new
// initial one (a raised limit is used at once, not earned again
// connection by connection), and what they now allow is served.
func (s *Scheduler) retuned() {
	lim := s.limits()
	for domain, ds := range s.domains {
		if ds.route != nil {
			s.setRoute(domain, ds, ds.route) // its own limits may have changed: its work goes by them
		}
	}
	s.requeueMoved()
	for _, d := range s.dests {
		if d.window != 0 {
			d.window = max(d.window, min(lim.InitialPerDestination, s.maxPer(d)))
		}
	}
	s.serveWaiting()
	for _, d := range s.dests {
		s.serve(d)
	}
}

// serveWaiting gives freed global slots to waiting destinations in turn.
func (s *Scheduler) serveWaiting() {
	for len(s.waiting) > 0 && s.active < s.limits().MaxConnections {
		d := s.waiting[0]
		s.waiting = s.waiting[1:]
		d.inWaiting = false
		s.serve(d)
	}
}

// backOff marks a destination dead after a connection failure and
// postpones its queued work to the end of the backoff.
func (s *Scheduler) backOff(key string, cause error) {
	d := s.dests[key]
	if d == nil {
		return
	}
	now := s.opts.Now()
	if now.Before(d.deadUntil) {
		// Another connection of the same outage failed too: the
		// destination is already backed off; count an outage once.
		return
	}
	d.failures++
	d.failedAt = now
	until := now.Add(backoff(d.failures, s.limits().MinBackoff, s.limits().MaxBackoff, s.rnd))
	if until.After(d.deadUntil) {
		d.deadUntil = until
	}
	s.m.destBackoffs.Inc()
	s.log.Warn("destination backed off", zap.String("destination", key), zap.Int("failures", d.failures),
		zap.Time("until", d.deadUntil), zap.Error(cause))
	queued := make([]*work, 0, len(d.queue))
	for _, w := range d.queue {
		if !w.dropped {
			queued = append(queued, w)
		}
	}
	d.queue, d.urgent = nil, 0
	d.why = "451 4.4.1 destination backed off after a connection failure: " + errText(cause)
	s.postpone(queued, d.deadUntil, d.why)
}

// postpone moves work out of the window and makes it due again at until,
// without counting an attempt. The store write is batched: see
// flushPostponed.
func (s *Scheduler) postpone(ws []*work, until time.Time, why string) {
	now := s.opts.Now()
	for _, w := range ws {
		s.remove(w.key)
		s.postponing = append(s.postponing, Due{ID: w.key.id, Domain: w.key.domain, At: s.spread(until, now), Reply: why})
	}
	s.m.postponed.Add(float64(len(ws)))
}

// flushPostponed writes the postponements collected in one turn of the
// loop as one batch, off this goroutine, one batch at a time.
func (s *Scheduler) flushPostponed() {
	if len(s.postponing) == 0 || s.postponeBusy {
		return
	}
	items := s.postponing
	s.postponing = nil
	s.postponeBusy = true
	s.postponeStarted++
	s.workers.Add(1)
	go func() {
		defer s.workers.Done()
		leased, err := s.opts.Store.Lease(items)
		if err != nil {
			s.log.Error("scheduler: postponing work", zap.Error(err), zap.Int("items", len(items)))
		}
		if old := s.expired(leased, s.opts.Now()); len(old) > 0 {
			s.workers.Add(1)
			s.expireDue(old)
		}
		s.events <- event{kind: evPostponed}
	}()
}

// routed handles the resolution of a domain.
func (s *Scheduler) routed(domain string, r Route, err error) {
	ds := s.domains[domain]
	if ds == nil {
		return
	}
	ds.resolving = false
	waiting := ds.waiting
	ds.waiting = nil
	if err != nil {
		s.m.routeErrors.Inc()
		s.log.Info("routing failed", zap.String("domain", domain), zap.Error(err), zap.Bool("permanent", mta.IsPermanent(err)))
		delete(s.domains, domain)
		if until, ok := s.suspendedUntil(domain, s.opts.Now()); ok {
			// Suspended: its mail waits whatever the routing says (it
			// is routed again when it is next due).
			s.postpone(s.live(waiting), until, suspendedReply(domain))
			return
		}
		for _, w := range waiting {
			if w.dropped {
				s.forget(w)
				continue
			}
			s.workers.Add(1)
			go s.failDomain(w, err)
		}
		return
	}
	s.setRoute(domain, ds, r)
	ds.routedAt = s.opts.Now()
	d := s.destFor(ds)
	for _, w := range waiting {
		if w.dropped {
			s.forget(w)
			continue
		}
		s.enqueue(d, w)
	}
}

// live returns the work of ws that was not dropped, and forgets the rest.
func (s *Scheduler) live(ws []*work) []*work {
	return slices.DeleteFunc(ws, func(w *work) bool {
		if w.dropped {
			s.forget(w)
		}
		return w.dropped
	})
}

// suspendedReply is why the mail of a suspended domain waits.
func suspendedReply(domain string) string {
	return "451 4.4.5 delivery to " + domain + " suspended by the operator"
}

// sweep forgets idle destinations and domains, and updates the
// destination gauges; it runs once per scan interval.
func (s *Scheduler) sweep() {
	now := s.opts.Now()
	var backed, active int64
	for k, d := range s.dests {
		switch {
		case now.Before(d.deadUntil):
			backed++
		case len(d.queue) > 0 || d.active > 0:
			active++
		case !d.inWaiting && (d.failures == 0 || now.After(d.deadUntil.Add(s.limits().MaxBackoff))):
			delete(s.dests, k) // idle: forget it; routing re-creates it
		}
	}
	for name, ds := range s.domains {
		if !ds.resolving && len(ds.waiting) == 0 && now.Sub(ds.routedAt) > s.opts.RouteTTL {
			delete(s.domains, name)
		}
	}
	s.backedOff.Store(backed)
	s.activeDests.Store(active)
}

// forget removes finished work from the window, unless the window already
// holds newer work for the same key (the message was released and due
// again while this work was in flight).
func (s *Scheduler) forget(w *work) {
	if s.window[w.key] == w {
		s.remove(w.key)
	}
}

// drop forgets the queued work of message id, in the window and in the
// overflow.
func (s *Scheduler) drop(id string) {
	for k, w := range s.window {
		if k.id == id {
			w.dropped = true
			s.remove(k)
		}
	}
	for k := range s.waitingFresh {
		if k.id == id {
			delete(s.waitingFresh, k)
		}
	}
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// DestinationStatus is what the scheduler holds about one destination.
type DestinationStatus struct {
	Key         string    `json:"key"`         // the next-hop set
	Class       string    `json:"class"`       // mx, route or local
	Queued      int       `json:"queued"`      // work waiting in memory for a connection
	Connections int       `json:"connections"` // connection workers now
	Window      int       `json:"window"`      // connections allowed now
	BackedOff   bool      `json:"backed_off"`  // no new connections until BackoffUntil
	BackoffEnds time.Time `json:"backoff_until,omitempty"`
	Failures    int       `json:"failures"`             // consecutive connection failures
	LastError   string    `json:"last_error,omitempty"` // the last connection failure
	LastErrorAt time.Time `json:"last_error_at,omitempty"`
}

// Destinations returns the state of every destination the scheduler
// knows, busiest first; nil when it is not running (or too busy to answer
// within two seconds).
func (s *Scheduler) Destinations() []DestinationStatus {
	if !s.running.Load() {
		return nil
	}
	reply := make(chan []DestinationStatus, 1)
	select {
	case s.status <- reply:
	case <-time.After(2 * time.Second):
		return nil
	}
	select {
	case st := <-reply:
		return st
	case <-time.After(2 * time.Second):
		return nil
	}
}

// destinations snapshots s.dests; it runs in run.
func (s *Scheduler) destinations() []DestinationStatus {
	now := s.opts.Now()
	out := make([]DestinationStatus, 0, len(s.dests))
	for _, d := range s.dests {
		st := DestinationStatus{Key: d.key, Queued: len(d.queue), Connections: d.active, Window: d.window,
			Failures: d.failures, LastError: d.why, LastErrorAt: d.failedAt}
		if d.route != nil {
			st.Class = d.route.Class()
		}
		if now.Before(d.deadUntil) {
			st.BackedOff, st.BackoffEnds = true, d.deadUntil
		}
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool {
		if a, b := out[i].Queued+out[i].Connections, out[j].Queued+out[j].Connections; a != b {
			return a > b
		}
		return out[i].Key < out[j].Key
	})
	return out
}

// suspendRecheck is how often postponed work of a suspended domain is
// looked at again: a resume takes effect within it.
const suspendRecheck = time.Minute

// Suspend stops delivery to domain: its mail waits, without attempts and
// without expiring, for d (0: until Resume). Work already on a connection
// finishes its message. Suspensions live in memory: a restart ends them.
func (s *Scheduler) Suspend(domain string, d time.Duration) {
	var until time.Time
	if d > 0 {
		until = s.opts.Now().Add(d)
	}
	s.suspendMu.Lock()
	if s.suspended == nil {
		s.suspended, s.since, s.grace = map[string]time.Time{}, map[string]time.Time{}, map[string]time.Duration{}
	}
	if _, already := s.suspended[domain]; !already {
		s.since[domain] = s.opts.Now()
	}
	s.suspended[domain] = until
	s.everHeld.Store(true)
	s.suspendMu.Unlock()
}

// lifetime is MaxLifetime for domain's mail, plus the time the domain
// spent suspended: an operator's hold costs the mail none of its lifetime.
// recipientLimit is the most recipients of domain one transaction
// carries: the domain's own limit, or MaxRecipientsPerTransaction.
func (s *Scheduler) recipientLimit(domain string) int {
	l := s.limits()
	if len(l.Domains) > 0 {
		if a, ok := mta.NormalizeDomain(domain); ok {
			domain = a
		}
		if n := l.Domains[domain].MaxRecipientsPerTransaction; n > 0 {
			return n
		}
	}
	return l.MaxRecipientsPerTransaction
}

func (s *Scheduler) lifetime(domain string) time.Duration {
	if !s.everHeld.Load() {
		return s.limits().MaxLifetime // the delivery path, before any suspension: no lock
	}
	s.suspendMu.Lock()
	defer s.suspendMu.Unlock()
	s.endSuspensionsLocked(s.opts.Now())
	l := s.limits().MaxLifetime + s.grace[domain]
	if since, ok := s.since[domain]; ok {
		l += s.opts.Now().Sub(since)
	}
	return l
}

// Resume ends a suspension; it reports whether domain was suspended.
// Its mail is tried again within suspendRecheck; a flush of the store
// after Resume returns makes it due at once (Resume waits until the
// postponements made while the domain was suspended are written, so that
// none lands after the flush and puts mail back into the future).
func (s *Scheduler) Resume(domain string) bool {
	s.suspendMu.Lock()
	_, ok := s.suspended[domain]
	if ok {
		s.grace[domain] += s.opts.Now().Sub(s.since[domain])
	}
	delete(s.suspended, domain)
	delete(s.since, domain)
	s.suspendMu.Unlock()
	if ok {
		s.awaitPostponed()
	}
	s.Kick()
	return ok
}

// awaitPostponed waits until the postponements the loop has made so far
// are written to the store: at most postponeWait, and not at all when the
// scheduler is not running.
func (s *Scheduler) awaitPostponed() {
	if !s.running.Load() {
		return
	}
	timeout := time.NewTimer(postponeWait)
	defer timeout.Stop()
	done := make(chan struct{})
	select {
	case s.settle <- done:
	case <-timeout.C:
		return
	}
	select {
	case <-done:
	case <-timeout.C:
	}
}

// releaseSettled closes the settle requests whose batches are written,
// or all of them.
func (s *Scheduler) releaseSettled(all bool) {
	s.settling = slices.DeleteFunc(s.settling, func(w settleWaiter) bool {
		if all || w.upTo <= s.postponeWritten {
			close(w.done)
			return true
		}
		return false
	})
}

// settleWaiter is a settle request: done is closed once upTo batches of
// postponements are written.
type settleWaiter struct {
	done chan struct{}
	upTo uint64
}

// postponeWait bounds awaitPostponed: past it, a resumed domain's mail
// whose postponement is still being written waits for suspendRecheck.
const postponeWait = 5 * time.Second

// Suspended returns the suspended domains and until when (zero: until
// resumed).
func (s *Scheduler) Suspended() map[string]time.Time {
	s.suspendMu.Lock()
	defer s.suspendMu.Unlock()
	s.endSuspensionsLocked(s.opts.Now())
	out := map[string]time.Time{}
	for d, until := range s.suspended {
		out[d] = until
	}
	return out
}

// endSuspensionsLocked ends the timed suspensions that are over, as
// Resume would. suspendMu is held.
func (s *Scheduler) endSuspensionsLocked(now time.Time) {
	for d, until := range s.suspended {
		if !until.IsZero() && !now.Before(until) {
			s.grace[d] += until.Sub(s.since[d])
			delete(s.suspended, d)
			delete(s.since, d)
		}
	}
}

// suspendedUntil reports whether domain is suspended at now, and when its
// postponed work should be looked at again.
func (s *Scheduler) suspendedUntil(domain string, now time.Time) (time.Time, bool) {
	if !s.everHeld.Load() {
		return time.Time{}, false
	}
	s.suspendMu.Lock()
	if len(s.suspended) == 0 {
		s.suspendMu.Unlock()
		return time.Time{}, false
	}
	s.endSuspensionsLocked(now)
	until, ok := s.suspended[domain]
	s.suspendMu.Unlock()
	if !ok {
		return time.Time{}, false
	}
	next := now.Add(suspendRecheck)
	if !until.IsZero() && until.Before(next) {
		next = until
	}
	return next, true
}
