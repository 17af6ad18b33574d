package scheduler

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/scheduler/conncache"
)

// worker is one connection to destination key: it sends the destination's
// queued messages one after another until the queue is empty, then parks
// the connection in the cache. own are the destination's own limits.
func (s *Scheduler) worker(key string, route Route, first *work, own DestinationLimits) {
	defer s.workers.Done()
	up := false // evUp sent: this worker counts as an open connection
	defer func() { s.events <- event{kind: evExit, key: key, up: up} }()
	var conn Conn
	var messages int
	reused := false
	if !first.requeued {
		// Work retried after a stale cached connection goes to a new one:
		// the other cached connections may be just as dead.
		conn, messages, reused = s.cache.Get(key)
	}
	start := s.opts.Now()
	if reused {
		s.m.connReused.Inc()
	} else {
		c, err := s.opts.Transport.Connect(s.sendCtx, route)
		if err != nil {
			s.m.connFailed.Inc()
			requeue := make(chan bool, 1)
			s.events <- event{kind: evConnFail, key: key, err: err, requeue: requeue}
			if <-requeue {
				// Refused while the destination's other connections are
				// open: the work goes to one of them.
				first.requeued = false
				s.events <- event{kind: evRequeue, key: key, work: first}
				return
			}
			if s.sendCtx.Err() != nil {
				// Stopping: no attempt was really made.
				s.events <- event{kind: evRequeue, key: key, work: first}
				return
			}
			// The message that asked for the connection had its attempt:
			// it is recorded with the reason, and the queue lifetime
			// applies to it as to any other failure.
			s.connectFailed(route, first, err)
			s.events <- event{kind: evDone, work: first}
			return
		}
		s.m.connOpened.Inc()
		s.m.connectLatency.Observe(s.opts.Now().Sub(start).Seconds())
		conn = c
		s.events <- event{kind: evConnOK, key: key, at: start}
	}
	s.m.activeConns.WithLabelValues(route.Class()).Inc()
	defer s.m.activeConns.WithLabelValues(route.Class()).Dec()
	s.events <- event{kind: evUp, key: key}
	up = true

	maxMessages := func() int {
		if own.MaxMessagesPerConnection > 0 {
			return own.MaxMessagesPerConnection
		}
		return s.limits().MaxMessagesPerConnection // a reload applies at once
	}
	reply := make(chan *work, 1) // for nextWork
	w, served := first, 0
	var begun *attempt // the next message, begun behind the last one's data
	for w != nil {
		carried := messages > 0 // this connection carried a message before this one
		a := begun
		begun = nil
		// follow hands the next work over while w's data goes out, so
		// that its transaction begins in the same write (see pipeliner).
		var taken *work
		follow := func() *attempt {
			if taken != nil || !conn.Usable() || messages+1 >= maxMessages() {
				return nil // (taken: asked again, by a later transaction of w's)
			}
			if taken = s.nextWork(key, served+1, reply); taken == nil {
				return nil
			}
			next, err := s.prepare(taken, false)
			if next == nil && err == nil { // nothing to send: handled
				s.events <- event{kind: evDone, work: taken}
				taken = nil
			}
			begun = next // nil when the memory budget is spent: sent after w
			return next
		}
		err := s.deliverSafely(conn, route, w, a, carried, follow)
		messages++
		served++
		switch {
		case errors.Is(err, errRetryNow):
			// A cached connection had died, or its server is closing:
			// try again on a new one.
			w.requeued = true
			_ = conn.Close()
			s.m.messagesPerConn.Observe(float64(messages - 1)) // the failed attempt carried nothing
			if errors.Is(err, ErrStale) {
				s.m.connClosed.WithLabelValues("stale").Inc()
			} else {
				s.m.connClosed.WithLabelValues("error").Inc()
				s.log.Info("server closing; the message goes to another host", zap.String("id", w.key.id),
					zap.String("destination", key), zap.String("ip", conn.Endpoint()), zap.Error(err))
			}
			s.events <- event{kind: evRequeue, key: key, work: w, handOver: true}
			s.giveBack(key, taken, begun)
			return
		case err != nil:
			s.events <- event{kind: evDone, work: w}
			_ = conn.Close()
			s.m.messagesPerConn.Observe(float64(messages)) // the end of its life
			s.m.connClosed.WithLabelValues("error").Inc()
			var r *mta.Reply
			if errors.As(err, &r) && r.Code == 421 {
				s.events <- event{kind: evConnFail, key: key, err: err}
			}
			// Its data never went out: the next message was not sent.
			s.giveBack(key, taken, begun)
			return
		}
		s.events <- event{kind: evDone, work: w}
		if reused && served == 1 { // the first message on a cached connection
			// A cached connection carried a message: the destination is
			// alive (this matters when it was the probe).
			s.events <- event{kind: evConnOK, key: key, at: start}
		}
		if taken != nil && conn.Usable() {
			w = taken // begun, or to be read now
			continue
		}
		s.giveBack(key, taken, begun)
		begun = nil
		if !conn.Usable() || messages >= maxMessages() {
			break
		}
		w = s.nextWork(key, served, reply)
	}
	if s.ctx.Err() != nil {
		// Stopping: say QUIT without holding the stop up (a slow peer
		// could take its full QUIT timeout).
		go conn.Close()
		s.m.messagesPerConn.Observe(float64(messages))
		s.m.connClosed.WithLabelValues("shutdown").Inc()
		return
	}
	// The cache observes messagesPerConn when it closes the connection.
	s.cache.Put(key, conn, messages, conncache.Limits{MaxMessages: own.MaxMessagesPerConnection, MaxIdle: own.MaxConnections})
}

// nextWork asks the state goroutine for the next work of destination key
// for a connection that served messages, on the worker's reply channel.
// nil means the connection is to end.
func (s *Scheduler) nextWork(key string, served int, reply chan *work) *work {
	s.next <- nextReq{key: key, served: served, reply: reply}
	return <-reply
}

// giveBack returns work taken for a connection that cannot send it, and
// what was read for it, without counting an attempt.
func (s *Scheduler) giveBack(key string, taken *work, begun *attempt) {
	if begun != nil {
		begun.release(s)
	}
	if taken != nil {
		s.events <- event{kind: evRequeue, key: key, work: taken}
	}
}

// retryOnNewConn reports whether work whose first transaction failed
// with err is tried again at once on a new connection instead of being
// deferred: once, when a reused connection turned out to be dead before
// the transaction began, or when the server closed and another host may
// take it (ErrOtherHost). deliver then returns the error wrapped in
// errRetryNow, having recorded nothing.
func retryOnNewConn(reused bool, w *work, err error) bool {
	return !w.requeued && (reused && errors.Is(err, ErrStale) || errors.Is(err, ErrOtherHost))
}

// errRetryNow wraps the error of a deliver that recorded nothing and
// leaves the work to be tried again at once on a new connection.
var errRetryNow = errors.New("retry on a new connection")

// deliverSafely is deliver with a panic quarantined to the one message:
// it is deferred, counted and logged, and the connection is dropped.
func (s *Scheduler) deliverSafely(conn Conn, route Route, w *work, a *attempt, reused bool, follow func() *attempt) (err error) {
	defer func() {
		if r := recover(); r != nil {
			s.m.panics.Inc()
			s.log.Error("panic delivering a message; deferred", zap.String("id", w.key.id),
				zap.String("domain", w.key.domain), zap.Any("panic", r), zap.ByteString("stack", debug.Stack()))
			s.deferWork(w, nil, local(fmt.Sprintf("451 4.3.0 internal error: %v", r)))
			err = fmt.Errorf("panic: %v", r)
		}
	}()
	return s.deliver(conn, route, w, a, reused, follow)
}

// pipeliner is a Conn that can begin the next transaction in the same
// write as the current message's data (outbound's, when the server offers
// PIPELINING): SendThen is Send, and just before the body goes out it asks
// next for the envelope and body to send after it on this connection (nil
// for none). The Conn's next Send must then be of that envelope. When
// SendThen fails, what next returned was not sent.
type pipeliner interface {
	SendThen(ctx context.Context, env *Envelope, body []byte, next func() (*Envelope, []byte)) ([]*mta.Reply, error)
}

// attempt is one message read for sending: the envelope of one domain's
// recipients, the body, and the memory they hold until release.
type attempt struct {
	w        *work
	m        *Message
	env      *Envelope       // the first transaction's
	more     []mta.Recipient // the recipients past env's, for further transactions
	attempts int             // the most any of the recipients has had
	buf      *[]byte
	body     []byte
}

// errMemoryBusy: prepare was not to wait, and the memory budget is spent.
var errMemoryBusy = errors.New("scheduler: memory budget spent")

// prepare reads w's message and body for an attempt. It returns nil and
// no error when there is nothing to send, and has then done what that
// needs: the message was removed or its recipients of the domain are done;
// it outlived the queue lifetime (expired); it could not be read
// (deferred); the scheduler is stopping (the lease makes it due again).
// With wait false it returns errMemoryBusy instead of waiting for memory.
func (s *Scheduler) prepare(w *work, wait bool) (*attempt, error) {
	m, err := s.opts.Store.Message(w.key.id)
	if errors.Is(err, mta.ErrNotFound) {
		return nil, nil // removed meanwhile
	}
	if err != nil {
		s.log.Error("scheduler: reading a message", zap.String("id", w.key.id), zap.Error(err))
		s.deferWork(w, nil, local("451 4.3.0 local error reading the queue"))
		return nil, nil
	}
	env := &Envelope{ID: m.ID, From: m.From, EnvID: m.EnvID, Ret: m.Ret, SMTPUTF8: m.SMTPUTF8, Body8Bit: m.Body8Bit}
	var attempts int
	env.Recipients, attempts = pending(m, w.key.domain)
	if len(env.Recipients) == 0 {
		return nil, nil
	}
	// The last attempt is due at the end of the lifetime (temporary): it
	// is made if it comes within a lease of it, and then expires the mail
	// if it fails too. Later than that, no attempt is made.
	if s.opts.Now().Sub(m.Received) >= s.lifetime(w.key.domain)+s.opts.Lease {
		s.expire(m, addresses(env.Recipients), local(lastReply(m, w.key.domain)))
		return nil, nil
	}
	if !wait {
		if !s.opts.Memory.TryAcquire(m.Size) {
			return nil, errMemoryBusy
		}
	} else if err := s.opts.Memory.Acquire(s.sendCtx, m.Size); err != nil {
		return nil, nil
	}
	a := &attempt{w: w, m: m, env: env, attempts: attempts, buf: bodyBuffers.Get().(*[]byte)}
	if n := s.recipientLimit(w.key.domain); len(env.Recipients) > n {
		env.Recipients, a.more = env.Recipients[:n], env.Recipients[n:]
	}
	if a.body, err = s.opts.Store.AppendBody((*a.buf)[:0], m.ID); err != nil {
		a.release(s)
		s.log.Error("scheduler: reading a message body", zap.String("id", m.ID), zap.Error(err))
		s.deferWork(w, m, local("451 4.3.0 local error reading the queue"))
		return nil, nil
	}
	return a, nil
}

// release gives back the memory a holds, and its body buffer for the next
// message, unless the buffer is large.
func (a *attempt) release(s *Scheduler) {
	s.opts.Memory.Release(a.m.Size)
	switch {
	case a.body == nil: // not read: the buffer is as it was
		bodyBuffers.Put(a.buf)
	case cap(a.body) <= maxPooledBody:
		*a.buf = a.body[:0]
		bodyBuffers.Put(a.buf)
	}
}

// deliver sends one message to the recipients of one domain and records
// the outcome of each recipient in the store: a, or w read now when a is
// nil. follow, when not nil, is asked during the send for the attempt to
// begin behind this one's data (see pipeliner). It returns the
// connection's error, if the connection failed.
//
// The recipients go in transactions of at most the domain's
// MaxRecipientsPerTransaction, one after another on conn. When the server
// answers some RCPTs that the transaction is full (Reply.TooManyRecipients)
// and took others, those it refused go in the next transaction, sized to
// what the server took: RFC 5321 §4.5.3.1.10's limit costs no backoff. All
// of it is one attempt.
func (s *Scheduler) deliver(conn Conn, route Route, w *work, a *attempt, reused bool, follow func() *attempt) error {
	if a == nil {
		if a, _ = s.prepare(w, true); a == nil {
			return nil
		}
	}
	defer a.release(s)
	m, attempts := a.m, a.attempts
	env, rest := a.env, a.more // the first transaction's envelope may have been begun: it is sent as it is
	limit := len(env.Recipients)
	var left []mta.Recipient // deferred: queued for a retry
	var deferred Outcome
	for first := true; ; first = false {
		var next func() *attempt
		began := false
		if len(rest) == 0 && follow != nil {
			next = func() *attempt { n := follow(); began = n != nil; return n }
		}
		replies, err := s.send(conn, env, a.body, next)
		if err != nil {
			if first && retryOnNewConn(reused, w, err) {
				return fmt.Errorf("%w: %w", errRetryNow, err)
			}
			unsent := slices.Concat(env.Recipients, rest)
			s.m.outcomes.WithLabelValues("deferred", route.Class()).Add(float64(len(unsent)))
			why := codedReason("4.4.2", fmt.Errorf("connection failed: %w", err))
			// Logged like any outcome: after the data went out the server may
			// have taken the message, and the retry may deliver it twice.
			s.logLocal("deferred", m, addresses(unsent), why)
			s.temporary(w, m, addresses(slices.Concat(left, unsent)), attempts, local(why))
			return err
		}
		t := s.record(conn, route, m, env.Recipients, replies, attempts+1, !began && conn.Usable())
		left = append(left, t.deferred...)
		if len(t.deferred) > 0 {
			deferred = t.outcome
		}
		if len(t.resend) > 0 {
			limit = t.delivered // what the server takes
			rest = slices.Concat(t.resend, rest)
		}
		if len(rest) == 0 {
			break
		}
		if !conn.Usable() {
			// The connection ended with the transaction (a server that
			// closes after a message): the rest waits its retry.
			deferred = local("451 4.4.2 connection closed after a transaction, before the recipients left")
			s.m.outcomes.WithLabelValues("deferred", route.Class()).Add(float64(len(rest)))
			s.logLocal("deferred", m, addresses(rest), deferred.Reply)
			left = append(left, rest...)
			break
		}
		n := min(limit, len(rest))
		e := *a.env
		e.Recipients, rest = rest[:n], rest[n:]
		env = &e
	}
	if len(left) > 0 {
		s.temporary(w, m, addresses(left), attempts, deferred)
	}
	return nil
}

// send runs env's transaction on conn, with follow as deliver's.
func (s *Scheduler) send(conn Conn, env *Envelope, body []byte, follow func() *attempt) ([]*mta.Reply, error) {
	start := time.Now()
	defer func() { s.m.attemptLatency.Observe(time.Since(start).Seconds()) }()
	if p, ok := conn.(pipeliner); ok && follow != nil {
		return p.SendThen(s.sendCtx, env, body, func() (*Envelope, []byte) {
			if next := follow(); next != nil {
				return next.env, next.body
			}
			return nil, nil
		})
	}
	return conn.Send(s.sendCtx, env, body)
}

// transaction is what record made of one transaction's replies.
type transaction struct {
	delivered int
	deferred  []mta.Recipient // temporary failures
	outcome   Outcome         // the last of them
	resend    []mta.Recipient // past the server's limit, for the next transaction
}

// record stores the outcomes of one transaction's recipients (rcpts, with
// their replies), reports them, and returns what is left. With more, the
// recipients the server had no room for in a transaction that delivered
// to others are left to resend instead of deferred, and not reported.
func (s *Scheduler) record(conn Conn, route Route, m *Message, rcpts []mta.Recipient, replies []*mta.Reply, attempt int, more bool) transaction {
	host, _ := describe(conn)
	offersDSN := false
	if d, ok := conn.(dsnOfferer); ok {
		offersDSN = d.OffersDSN()
	}
	var t transaction
	var delivered, failed []Result
	for _, rep := range replies {
		if rep != nil && rep.Code/100 == 2 {
			t.delivered++
		}
	}
	more = more && t.delivered > 0
	var resent []bool // by index: left out of the report
	for i, r := range rcpts {
		rep := replies[i]
		if rep == nil {
			t.deferred, t.outcome = append(t.deferred, r), local("no reply")
			continue
		}
		text := rep.Error()
		o := Outcome{Reply: text, RemoteMTA: host, Diagnostic: text, RemoteDSN: offersDSN}
		if rep.Local {
			o = local(text) // our client's decision, not the server's words
		}
		switch outcomeOf(rep) {
		case "delivered":
			delivered = append(delivered, Result{Address: r.Address, Outcome: o})
		case "failed":
			failed = append(failed, Result{Address: r.Address, Outcome: o})
		default:
			if more && rep.TooManyRecipients() {
				if resent == nil {
					resent = make([]bool, len(rcpts))
				}
				resent[i] = true
				t.resend = append(t.resend, r)
				continue
			}
			t.deferred, t.outcome = append(t.deferred, r), o
		}
	}
	// Reported before they are recorded, so that the accounting log has a
	// failure before the bounce its recording makes.
	if resent == nil {
		s.logOutcomes(conn, route, m, rcpts, replies, attempt)
	} else {
		var rs []mta.Recipient
		var reps []*mta.Reply
		for i := range rcpts {
			if !resent[i] {
				rs, reps = append(rs, rcpts[i]), append(reps, replies[i])
			}
		}
		s.logOutcomes(conn, route, m, rs, reps, attempt)
	}
	class := route.Class()
	if len(delivered) > 0 {
		s.m.outcomes.WithLabelValues("delivered", class).Add(float64(len(delivered)))
		if err := s.opts.Store.Delivered(m.ID, delivered); err != nil {
			s.log.Error("scheduler: recording a delivery (it may be repeated)", zap.String("id", m.ID), zap.Error(err))
		}
	}
	if len(failed) > 0 {
		s.m.outcomes.WithLabelValues("failed", class).Add(float64(len(failed)))
		if err := s.opts.Store.Failed(m.ID, failed); err != nil {
			s.log.Error("scheduler: recording a failure", zap.String("id", m.ID), zap.Error(err))
		}
	}
	if len(t.deferred) > 0 {
		s.m.outcomes.WithLabelValues("deferred", class).Add(float64(len(t.deferred)))
	}
	return t
}

// outcomeOf classifies a recipient's reply: delivered, failed or
// deferred. A 552 that says the transaction is full is temporary (RFC 5321
// §4.5.3.1.10).
func outcomeOf(rep *mta.Reply) string {
	switch {
	case rep.Code/100 == 2:
		return "delivered"
	case rep.Permanent() && !rep.TooManyRecipients():
		return "failed"
	}
	return "deferred"
}

// bodyBuffers are the buffers message bodies are read into for delivery:
// reused, they spare an allocation of the body's size (and its share of
// garbage collection) per attempt, 6 % of the CPU at 100 KB.
var bodyBuffers = sync.Pool{New: func() any { return new([]byte) }}

// maxPooledBody is the largest buffer kept for reuse: a pool of 10 MiB
// buffers would hold on to memory the memory budget no longer counts.
const maxPooledBody = 1 << 20

// describer is what a Conn may tell the log about itself.
type describer interface{ Describe() (host, tls string) }

// dsnOfferer is a Conn that knows whether its server offered DSN.
type dsnOfferer interface{ OffersDSN() bool }

// describe returns what conn says of its host and TLS session, if anything.
func describe(conn Conn) (host, tls string) {
	if d, ok := conn.(describer); ok {
		return d.Describe()
	}
	return "", ""
}

// logOutcomes reports one outcome per recipient of an attempt: a log line
// (what a mail operator greps for when a user asks where their mail went)
// and, when set, Options.Observe (the accounting log).
func (s *Scheduler) logOutcomes(conn Conn, route Route, m *Message, rcpts []mta.Recipient, replies []*mta.Reply, attempt int) {
	host, tlsInfo := describe(conn)
	for i, r := range rcpts {
		e := OutcomeEvent{Outcome: "deferred", Message: m, Recipient: r.Address, Destination: route.Key(),
			MX: host, IP: conn.Endpoint(), TLS: tlsInfo, Reply: replies[i], Attempt: attempt}
		if rep := replies[i]; rep == nil {
			e.Reason = "no reply"
		} else {
			e.Outcome = outcomeOf(rep)
		}
		s.report(e)
	}
}

// report logs an outcome and hands it to Options.Observe.
func (s *Scheduler) report(e OutcomeEvent) {
	if e.Message != nil {
		e.QueuedFor = s.opts.Now().Sub(e.Message.Received)
	}
	s.m.replyCodes.WithLabelValues(e.Outcome, codeLabel(e.Reply)).Inc()
	if e.Outcome != "deferred" && e.Message != nil {
		s.m.endToEnd.WithLabelValues(e.Outcome).Observe(e.QueuedFor.Seconds())
	}
	if e.Outcome == "delivered" && e.Attempt > 0 {
		s.m.attempts.Observe(float64(e.Attempt))
	}
	if s.opts.Observe != nil {
		s.opts.Observe(e)
	}
	ce := s.log.Check(zap.InfoLevel, "delivery outcome")
	if ce == nil {
		return
	}
	id := ""
	if e.Message != nil {
		id = e.Message.ID
	}
	fields := []zap.Field{zap.String("outcome", e.Outcome), zap.String("id", id), zap.String("rcpt", e.Recipient)}
	if e.Reply == nil {
		ce.Write(append(fields, zap.String("reply", e.Reason))...)
		return
	}
	ce.Write(append(fields, zap.String("destination", e.Destination), zap.String("mx", e.MX),
		zap.String("ip", e.IP), zap.Int("code", e.Reply.Code), zap.String("enhanced", e.Reply.Enhanced.String()),
		zap.String("reply", e.Reply.Text), zap.Int("attempt", e.Attempt), zap.Duration("delay", e.QueuedFor.Round(time.Millisecond)),
		zap.String("tls", e.TLS))...)
}

// temporary defers the domain's queued recipients with backoff, or fails
// them (rcpts, those of the domain still queued) if the message has
// outlived MaxLifetime. A retry that would come
// after the end of the lifetime is made at its end instead, so that the
// mail is tried until then (as a delay notice's Will-Retry-Until says),
// like Postfix and unlike giving up up to a whole backoff early.
func (s *Scheduler) temporary(w *work, m *Message, rcpts []string, attempts int, o Outcome) {
	now := s.opts.Now()
	end := m.Received.Add(s.lifetime(w.key.domain))
	if !now.Before(end) {
		s.expire(m, rcpts, o)
		return
	}
	next := now.Add(s.backoffFor(attempts + 1))
	if next.After(end) {
		next = end
	}
	if err := s.opts.Store.Defer(w.key.id, w.key.domain, next, o); err != nil {
		s.log.Error("scheduler: deferring", zap.String("id", w.key.id), zap.Error(err))
	}
}

// deferWork defers after a local problem; m may be nil.
func (s *Scheduler) deferWork(w *work, m *Message, o Outcome) {
	attempts := 0
	if m != nil {
		_, attempts = pending(m, w.key.domain)
	}
	_ = s.opts.Store.Defer(w.key.id, w.key.domain, s.opts.Now().Add(s.backoffFor(attempts+1)), o)
}

func (s *Scheduler) backoffFor(attempt int) time.Duration {
	// The jitter source is shared by workers: guard it.
	s.rndMu.Lock()
	defer s.rndMu.Unlock()
	return backoff(attempt, s.limits().MinBackoff, s.limits().MaxBackoff, s.workerRnd)
}

// expire fails recipients whose message outlived the queue lifetime
// (RFC 3463 5.4.7: delivery time expired). last is the outcome of the last
// attempt, whose remote reply (if it had one) the bounce quotes.
func (s *Scheduler) expire(m *Message, rcpts []string, last Outcome) {
	o := last
	o.Reply = fmt.Sprintf("550 5.4.7 Delivery time expired after %s; last error: %s", s.limits().MaxLifetime, last.Reply)
	s.m.outcomes.WithLabelValues("expired", classUnrouted).Add(float64(len(rcpts)))
	s.logLocal("expired", m, rcpts, o.Reply)
	if err := s.opts.Store.Failed(m.ID, results(rcpts, o)); err != nil {
		s.log.Error("scheduler: expiring", zap.String("id", m.ID), zap.Error(err))
	}
}

// connectFailed records a failure to reach the destination as an attempt
// of the work that asked for the connection: deferred with backoff and the
// reason, or expired past the queue lifetime.
func (s *Scheduler) connectFailed(route Route, w *work, cause error) {
	m, err := s.opts.Store.Message(w.key.id)
	if err != nil {
		return // removed meanwhile, or unreadable: the next scan finds it
	}
	rcpts, attempts := pending(m, w.key.domain)
	if len(rcpts) == 0 {
		return
	}
	s.m.outcomes.WithLabelValues("deferred", route.Class()).Add(float64(len(rcpts)))
	why := codedReason("4.4.1", cause)
	s.logLocal("deferred", m, addresses(rcpts), why)
	s.temporary(w, m, addresses(rcpts), attempts, local(why))
}

// codedReason is the queue's and the log's reason for a failed connection
// (enhanced 4.4.1: no connection; 4.4.2: lost), led by a reply code as
// every other reason is, so that `mta queue ls --reply 4.4.*` and a
// bounce's Status find it: the server's own code when it said something
// (a 421 greeting), else 451 and enhanced.
func codedReason(enhanced string, err error) string {
	var r *mta.Reply
	if errors.As(err, &r) && r.Code >= 400 && r.Code < 600 {
		e := r.Enhanced.String()
		if e == "" {
			e = fmt.Sprintf("%d.%s", r.Code/100, enhanced[2:])
		}
		return fmt.Sprintf("%d %s %s", r.Code, e, errText(err))
	}
	return "451 " + enhanced + " " + errText(err)
}

// logLocal reports an outcome decided without a remote reply (expiry, a
// routing failure, no connection), one per recipient.
func (s *Scheduler) logLocal(outcome string, m *Message, rcpts []string, reason string) {
	for _, r := range rcpts {
		s.report(OutcomeEvent{Outcome: outcome, Message: m, Recipient: r, Reason: reason})
	}
}

// expireDue fails the postponed items whose message has outlived the
// queue lifetime: a destination that stays backed off cannot keep its mail
// forever. The reply says why the mail waited.
func (s *Scheduler) expireDue(items []Due) {
	defer s.workers.Done()
	for _, d := range items {
		m, err := s.opts.Store.Message(d.ID)
		if err != nil {
			continue
		}
		rcpts, _ := pending(m, d.Domain)
		if len(rcpts) == 0 {
			continue
		}
		s.expire(m, addresses(rcpts), local(d.Reply))
	}
}

// expired returns the postponed items of leased (those with a Reply) whose
// message is past the queue lifetime at now.
func (s *Scheduler) expired(leased []Due, now time.Time) []Due {
	var old []Due
	for _, d := range leased {
		if _, suspended := s.suspendedUntil(d.Domain, now); suspended {
			continue // no lifetime penalty while an operator holds the domain
		}
		if d.Reply != "" && !d.Received.IsZero() && now.Sub(d.Received) >= s.lifetime(d.Domain) {
			old = append(old, d)
		}
	}
	return old
}

// failDomain fails (permanent routing error) or defers (temporary) the
// recipients of a domain that could not be routed.
func (s *Scheduler) failDomain(w *work, cause error) {
	defer s.workers.Done()
	defer func() { s.events <- event{kind: evDone, work: w} }()
	m, err := s.opts.Store.Message(w.key.id)
	if err != nil {
		return
	}
	queued, attempts := pending(m, w.key.domain)
	if len(queued) == 0 {
		return
	}
	rcpts := addresses(queued)
	var reply *mta.Reply
	text := cause.Error()
	if errors.As(cause, &reply) {
		text = reply.Error()
	}
	if mta.IsPermanent(cause) {
		s.m.outcomes.WithLabelValues("failed", classUnrouted).Add(float64(len(rcpts)))
		s.logLocal("failed", m, rcpts, text)
		_ = s.opts.Store.Failed(m.ID, results(rcpts, local(text)))
		return
	}
	s.m.outcomes.WithLabelValues("deferred", classUnrouted).Add(float64(len(rcpts)))
	s.temporary(w, m, rcpts, attempts, local(text))
}

// pending returns the queued recipients of domain in m, and the most
// attempts any of them has had.
func pending(m *Message, domain string) (rcpts []mta.Recipient, attempts int) {
	for _, r := range m.Recipients {
		if r.Queued && r.Domain == domain {
			rcpts = append(rcpts, r.Recipient)
			attempts = max(attempts, r.Attempts)
		}
	}
	return rcpts, attempts
}

// lastReply is the last attempt's reply of domain's queued recipients in
// m, for an expiry that comes without another attempt.
func lastReply(m *Message, domain string) string {
	for _, r := range m.Recipients {
		if r.Queued && r.Domain == domain && r.LastReply != "" {
			return r.LastReply
		}
	}
	return "no attempt made"
}

// addresses returns the addresses of rcpts.
func addresses(rcpts []mta.Recipient) []string {
	out := make([]string, len(rcpts))
	for i, r := range rcpts {
		out[i] = r.Address
	}
	return out
}

// results gives every recipient in rcpts the same outcome.
func results(rcpts []string, o Outcome) []Result {
	out := make([]Result, len(rcpts))
	for i, r := range rcpts {
		out[i] = Result{Address: r, Outcome: o}
	}
	return out
}
