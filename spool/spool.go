package spool

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
)

// Options configure a Spool.
type Options struct {
	// Sync makes Put and every transition wait for the WAL fsync. Turning it
	// off loses acknowledged mail on a crash; it exists to measure the cost.
	Sync bool
	// MinFreeSpace is the free-space reserve in bytes: while the spool's
	// file system has less, Put returns mta.ErrStorageFull. The spool
	// keeps at least three memtables' worth (see pebbleHeadroom).
	MinFreeSpace int64
	// MinSyncInterval delays a WAL sync until this long after the previous
	// one, so that more concurrent commits share it (group commit). Zero
	// syncs as soon as the previous sync is done.
	MinSyncInterval time.Duration
	// MemTableSize is the size of Pebble's memtable; zero means
	// DefaultMemTableSize. A small volume gets less (see memTableSize).
	MemTableSize uint64
	// BodyFileThreshold is the message size from which the bytes are kept
	// in a body file beside Pebble instead of in it (see bodyfiles.go);
	// zero keeps every message in Pebble. Bodies already in files are read
	// whatever it is.
	BodyFileThreshold int64
	// Logger receives Pebble's and the spool's own messages; nil discards them.
	Logger *zap.Logger
	// Registerer gets the spool's metrics; nil registers nothing.
	Registerer prometheus.Registerer
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// FreshLease makes a new message due this long after it is accepted
	// instead of at once: the scheduler receives new messages in memory, and
	// the lease is the next attempt time written before that attempt, so a
	// crash cannot make the message due again at once.
	FreshLease time.Duration
	// Notifier, when set, is asked for the notice (DSN) each delivery,
	// failure or deferral owes; see Notifier.
	Notifier Notifier
	// OnNotice is called after a notice was committed, with its queue ID
	// and recipient domains, so that it can be handed to delivery at once.
	OnNotice func(id string, domains []string)
}

// Spool is the durable message store. It is safe for concurrent use. The
// caller MUST call Close to release the Pebble database.
type Spool struct {
	db      *pebble.DB
	dir     string
	opts    Options
	log     *zap.Logger
	write   *pebble.WriteOptions
	ids     *idGen
	locks   [256]sync.Mutex // per-message read-modify-write, striped by ID
	fresh   freshRecords    // records as accepted, until they change
	count   atomic.Int64    // messages in the spool
	broken  atomic.Pointer[error]
	free    freeSpace
	metrics *spoolMetrics

	syncPending atomic.Bool  // a sync for unsynced outcomes is scheduled
	lastReclaim atomic.Int64 // UnixNano of the last flush asked for to reclaim space
	reclaiming  atomic.Bool  // a reclaim is running
	// reclaimCtx ends a reclaim's compaction when the spool closes.
	reclaimCtx  context.Context
	stopReclaim context.CancelFunc
	closeMu     sync.RWMutex // held for reading by the delayed sync, for writing by Close
	closed      bool

	finished []string // messages recovery found with nothing left queued: see SettleFinished

	suppressed *suppressionFilter // which addresses may be on a suppression list

	bodies     *bodyFiles    // the bytes of large messages
	reaperStop chan struct{} // closed by Close
	reaperDone chan struct{} // closed when reapBodyFiles returns
}

// DueEntry names one destination of one message whose attempt is due.
type DueEntry struct {
	ID     string    // queue ID
	Domain string    // recipient domain
	Due    time.Time // when it became due
}

// Open opens (creating if needed) the spool in dir and recovers it: it
// counts the messages and repairs the due index, so that every message with
// queued recipients that is not held has its due entries.
func Open(dir string, opts Options) (*Spool, error) {
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	s := &Spool{dir: dir, opts: opts, log: opts.Logger, ids: newIDGen()}
	s.reclaimCtx, s.stopReclaim = context.WithCancel(context.Background())
	s.write = pebble.NoSync
	if opts.Sync {
		s.write = pebble.Sync
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	memTable := memTableSize(dir, opts.MemTableSize)
	s.free = freeSpace{dir: dir, reserve: max(opts.MinFreeSpace, pebbleHeadroom(memTable))}
	if s.free.reserve > opts.MinFreeSpace {
		s.log.Info("free-space reserve raised to what Pebble needs (three memtables)",
			zap.Int64("configured_bytes", opts.MinFreeSpace), zap.Int64("reserve_bytes", s.free.reserve))
	}
	popts := &pebble.Options{
		Logger: pebbleLogger{s},
		// A large memtable lets a message that is delivered soon after it
		// was accepted be deleted before it is ever flushed to a table:
		// most mail then costs one WAL write and no compaction. On a small
		// volume it is smaller (see memTableSize).
		MemTableSize:                memTable,
		MemTableStopWritesThreshold: 4,
	}
	if opts.MinSyncInterval > 0 {
		interval := opts.MinSyncInterval
		popts.WALMinSyncInterval = func() time.Duration { return interval }
	}
	db, err := openPebble(dir, popts)
	if errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EWOULDBLOCK) {
		return nil, fmt.Errorf("spool: %s is locked by another process (is another mta serve running on this data_dir?)", dir)
	}
	if err != nil {
		return nil, fmt.Errorf("spool: open %s: %w", dir, err)
	}
	s.db = db
	if s.bodies, err = openBodyFiles(dir, opts.Sync); err != nil {
		db.Close()
		return nil, err
	}
	if err := s.recover(); err != nil {
		s.bodies.closeAll()
		db.Close()
		return nil, err
	}
	s.suppressed = newSuppressionFilter()
	if err := s.suppressed.build(db); err != nil {
		s.bodies.closeAll()
		db.Close()
		return nil, fmt.Errorf("spool: reading the suppression list: %w", err)
	}
	s.metrics = newSpoolMetrics(s, opts.Registerer)
	s.reaperStop, s.reaperDone = make(chan struct{}), make(chan struct{})
	go s.reapBodyFiles()
	s.bodies.poke() // files that recovery found unused
	return s, nil
}

// openPebble is pebble.Open with its fatal errors (reported through the
// logger, which panics) turned into an error: on a full disk the very
// first MANIFEST write fails, and that must stop start-up with a message,
// not a stack trace.
func openPebble(dir string, opts *pebble.Options) (db *pebble.DB, err error) {
	defer func() {
		if r := recover(); r != nil {
			msg, ok := r.(pebbleFatal)
			if !ok {
				panic(r)
			}
			if strings.Contains(string(msg), "no space left on device") {
				err = fmt.Errorf("spool: %s: the file system is full (%s)", dir, msg)
				return
			}
			err = fmt.Errorf("spool: open %s: %s", dir, msg)
		}
	}()
	return pebble.Open(dir, opts)
}

// Close closes the database. Writes in flight must have returned first.
func (s *Spool) Close() error {
	s.stopReclaim() // a compaction to reclaim space must not hold the close up
	s.closeMu.Lock()
	again := s.closed
	s.closed = true
	s.closeMu.Unlock()
	if again {
		return errors.New("spool: closed twice")
	}
	close(s.reaperStop)
	<-s.reaperDone
	if s.metrics != nil {
		s.metrics.unregister()
	}
	return errors.Join(s.db.Close(), s.bodies.closeAll())
}

// NewID returns a fresh queue ID for a message about to be Put.
func (s *Spool) NewID() string { return s.ids.next(s.opts.Now()) }

// Count returns the number of messages in the spool.
func (s *Spool) Count() int64 { return s.count.Load() }

// Healthy returns nil while the spool accepts writes.
func (s *Spool) Healthy() error {
	if e := s.broken.Load(); e != nil {
		return *e
	}
	return nil
}

// Put stores a new message: its record, its bytes (header followed by body,
// stored as one value) and one due entry per recipient domain, in one batch.
// With Options.Sync it returns only after the batch is on disk. m.ID must
// come from NewID; Put sets m.Size, the recipients' Domain, Status and
// NextAttempt, and m.Received if zero.
func (s *Spool) Put(m *Message, header, body []byte) error {
	return s.PutAll([]Incoming{{Message: m, Header: header, Body: body}})
}

// Incoming is one new message for PutAll.
type Incoming struct {
	Message      *Message
	Header, Body []byte
	// Sent, when set, is kept after the message leaves the queue, to
	// match a later bounce (VERP).
	Sent *SentRecord
}

// PutAll stores several new messages as Put does, in one batch and one
// sync: all of them or, on an error, none. The injection API uses it so
// that one request of many recipients costs one fsync.
func (s *Spool) PutAll(msgs []Incoming) error {
	if err := s.Healthy(); err != nil {
		return err
	}
	var size int64
	for _, in := range msgs {
		if !ValidID(in.Message.ID) {
			return fmt.Errorf("spool: put: invalid queue ID %q", in.Message.ID)
		}
		size += int64(len(in.Header) + len(in.Body))
	}
	if !s.admit(size) {
		s.metrics.errors.WithLabelValues("put_full").Inc()
		s.reclaim()
		return mta.ErrStorageFull
	}
	if err := s.writeBodyFiles(msgs); err != nil {
		return err
	}
	now := s.opts.Now()
	due := now.Add(s.opts.FreshLease)
	b := s.db.NewBatch()
	defer b.Close()
	key := keyBuf{}
	rec := recordPool.Get().(*[]byte)
	for _, in := range msgs {
		m := in.Message
		if m.Received.IsZero() {
			m.Received = now
		}
		m.Size = int64(len(in.Header) + len(in.Body))
		m.queueAll(due)
		*rec = m.encode((*rec)[:0])
		_ = b.Set(key.message(m.ID), *rec, nil)
		s.fresh.add(m, *rec)
		if m.body.File == 0 {
			op := b.SetDeferred(len(key.body(m.ID)), int(m.Size))
			copy(op.Key, key.body(m.ID))
			copy(op.Value[copy(op.Value, in.Header):], in.Body)
			op.Finish()
		}
		if !m.Held {
			for _, d := range m.Pending() {
				_ = b.Set(key.due(due, m.ID, d), nil, nil)
			}
		}
		if in.Sent != nil {
			v, _ := json.Marshal(in.Sent)
			_ = b.Set(sentKey(m.ID), v, nil)
		}
	}
	recordPool.Put(rec)
	start := time.Now()
	if err := s.commit(b, "put"); err != nil {
		for _, in := range msgs {
			s.fresh.drop(in.Message.ID)
		}
		s.releaseBodies(msgs)
		return err
	}
	s.metrics.commit.Observe(time.Since(start).Seconds())
	s.count.Add(int64(len(msgs)))
	return nil
}

var recordPool = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

// commit applies a batch, turning a Pebble fatal error into a broken spool
// and an ENOSPC into mta.ErrStorageFull.
func (s *Spool) commit(b *pebble.Batch, op string) (err error) {
	return s.commitWith(b, op, s.write)
}

// outcomeOps are the transitions that record a delivery attempt's outcome.
// They are committed without waiting for an fsync: losing one in a crash
// can only repeat an attempt (a delivery is at least once anyway), never
// lose a message, and they become durable with the next synced commit —
// Pebble's WAL is ordered, and acceptances sync continuously — or within
// outcomeSyncDelay on an otherwise idle spool. Delivery workers therefore do
// not wait for the disk after every message.
var outcomeOps = map[string]bool{"deliver": true, "fail": true, "defer": true}

// movesBody names the transitions after which a message waits, so that its
// bytes move from their body file into Pebble ("move" does nothing else).
// A move need not be synced either: a lost one leaves the bytes in their
// file, which is kept until a synced commit follows the move.
var movesBody = map[string]bool{"defer": true, "hold": true, "move": true}

func (s *Spool) commitWith(b *pebble.Batch, op string, wo *pebble.WriteOptions) (err error) {
	defer func() {
		if r := recover(); r != nil {
			f, ok := r.(pebbleFatal)
			if !ok {
				panic(r)
			}
			e := fmt.Errorf("spool: broken by a fatal storage error: %s", string(f))
			s.broken.CompareAndSwap(nil, &e)
			s.log.Error("spool broken: refusing all writes until restart", zap.String("reason", string(f)))
			err = e
		}
		if err != nil {
			s.metrics.errors.WithLabelValues(op).Inc()
		}
	}()
	if err := b.Commit(wo); err != nil {
		if errors.Is(err, syscall.ENOSPC) {
			return mta.ErrStorageFull
		}
		return fmt.Errorf("spool: %s: %w", op, err)
	}
	return nil
}

// Get returns the record of message id, or mta.ErrNotFound.
func (s *Spool) Get(id string) (m *Message, err error) {
	if m := s.fresh.get(id); m != nil {
		return m, nil
	}
	return s.stored(id)
}

// stored reads the record of message id from Pebble.
func (s *Spool) stored(id string) (m *Message, err error) {
	var k keyBuf
	err = s.read(k.message(id), id, func(v []byte) (err error) {
		m, err = decodeMessage(id, v)
		return err
	})
	return m, err
}

// Body returns a copy of the stored bytes of message id.
func (s *Spool) Body(id string) ([]byte, error) {
	return s.AppendBody(nil, id)
}

// AppendBody appends the stored bytes of message id to dst, so that a
// caller that delivers many messages can reuse one buffer.
func (s *Spool) AppendBody(dst []byte, id string) ([]byte, error) {
	var k keyBuf
	// A message's bytes move from a body file into Pebble when it is
	// deferred; a second look finds them where they went.
	for try := 0; ; try++ {
		out := dst
		err := s.read(k.body(id), id, func(v []byte) error {
			out = append(dst, v...)
			return nil
		})
		if !errors.Is(err, mta.ErrNotFound) {
			return out, err
		}
		m, err := s.Get(id)
		if err != nil {
			return dst, err
		}
		if m.body.File != 0 {
			out, err = s.bodies.read(dst, m.body, m.Size)
			if !errors.Is(err, errBodyFileGone) {
				return out, err
			}
		}
		if try > 0 {
			return dst, fmt.Errorf("%w: the bytes of %s", mta.ErrNotFound, id)
		}
	}
}

// read looks key up and hands its value to fn, which must not keep it.
func (s *Spool) read(key []byte, id string, fn func([]byte) error) error {
	v, closer, err := s.db.Get(key)
	if errors.Is(err, pebble.ErrNotFound) {
		return fmt.Errorf("%w: %s", mta.ErrNotFound, id)
	}
	if err != nil {
		return fmt.Errorf("spool: reading %s: %w", id, err)
	}
	defer closer.Close()
	return fn(v)
}

// maxDueExamined bounds, as a multiple of the limit, how many due entries
// one Due call looks at when skip leaves most of them out.
const maxDueExamined = 20

// Due returns up to limit due-index entries with a due time at or before
// now, earliest first, without those whose domain skip (if not nil)
// reports true for. It looks at no more than maxDueExamined × limit
// entries.
func (s *Spool) Due(now time.Time, limit int, skip func(domain string) bool) ([]DueEntry, error) {
	var k keyBuf
	upper := append([]byte(nil), k.dueBound(now.Add(time.Nanosecond))...)
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte(prefixDue), UpperBound: upper})
	if err != nil {
		return nil, fmt.Errorf("spool: due: %w", err)
	}
	defer it.Close()
	var out []DueEntry
	examined := 0
	for ok := it.First(); ok && len(out) < limit && examined < maxDueExamined*max(limit, 1); ok = it.Next() {
		examined++
		e, perr := parseDue(it.Key())
		if perr != nil {
			s.log.Warn("spool: skipping malformed due entry", zap.ByteString("key", it.Key()))
			continue
		}
		if skip != nil && skip(e.Domain) {
			continue
		}
		out = append(out, e)
	}
	return out, it.Error()
}

// List returns up to limit messages with IDs greater than after, in ID
// (acceptance) order. It is for the admin CLI; it decodes every record.
func (s *Spool) List(after string, limit int) ([]*Message, error) {
	var out []*Message
	err := s.eachRecord("list", after, func(id, rec []byte) (bool, error) {
		if len(out) == limit {
			return false, nil
		}
		m, err := decodeMessage(string(id), rec)
		if err != nil {
			return false, err
		}
		out = append(out, m)
		return true, nil
	})
	return out, err
}

// eachRecord calls fn with the ID and stored record of each message whose
// ID is greater than after ("": every message), in ID order, until fn
// returns false or an error. op names the caller in errors.
func (s *Spool) eachRecord(op, after string, fn func(id, rec []byte) (bool, error)) error {
	// Background readers (the queue metrics) may still be scanning when
	// the spool closes: an iterator on a closed Pebble panics.
	s.closeMu.RLock()
	defer s.closeMu.RUnlock()
	if s.closed {
		return errors.New("spool: closed")
	}
	lower := []byte(prefixMessage + after + "\x00")
	if after == "" {
		lower = []byte(prefixMessage)
	}
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: []byte(prefixEnd(prefixMessage))})
	if err != nil {
		return fmt.Errorf("spool: %s: %w", op, err)
	}
	defer it.Close()
	for ok := it.First(); ok; ok = it.Next() {
		v, err := it.ValueAndErr()
		if err != nil {
			return fmt.Errorf("spool: %s: %w", op, err)
		}
		if more, err := fn(it.Key()[len(prefixMessage):], v); err != nil || !more {
			return err
		}
	}
	return it.Error()
}

// update runs fn on message id under its lock and commits the result in one
// batch: the new record, whatever due-index changes fn added to the batch,
// and the notice the Notifier makes for the transition fn returns (nil:
// none to report). If no recipient is left queued, the message is removed instead.
func (s *Spool) update(op, id string, fn func(m *Message, b *pebble.Batch) (*Transition, error)) error {
	if err := s.Healthy(); err != nil {
		return err
	}
	mu := &s.locks[stripe(id)]
	mu.Lock()
	defer mu.Unlock()
	m, err := s.Get(id)
	if err != nil {
		return err
	}
	s.fresh.drop(id) // the record changes (see freshRecords)
	if op == "move" && (m.Done() || m.body.File == 0) {
		return nil // nothing to move; a finished message is SettleFinished's
	}
	b := s.db.NewBatch()
	defer b.Close()
	t, err := fn(m, b)
	if err != nil {
		return err
	}
	// Where the bytes stop being needed once b is committed.
	var released bodyLocation
	var notice *Notice
	var noticeDomains []string
	now := s.opts.Now()
	if s.opts.Notifier != nil && t != nil && len(t.Changed) > 0 {
		t.Message, t.Now = m, now
		notice, err = s.opts.Notifier(t, func() ([]byte, error) { return s.Body(id) })
		if err != nil {
			return fmt.Errorf("spool: %s %s: making its notice: %w", op, id, err)
		}
		if notice != nil {
			noticeDomains = s.addNotice(b, notice, now)
		}
	}
	var k keyBuf
	done := m.Done()
	switch {
	case done && m.body.File != 0:
		_ = b.Delete(k.message(id), nil)
		released = m.body
	case done:
		_ = b.Delete(k.message(id), nil)
		_ = b.Delete(k.body(id), nil)
	default:
		// It will wait: not in a body file. But not below the free-space
		// reserve, where the WAL must not grow: the bytes stay where they are.
		if movesBody[op] && m.body.File != 0 && s.admit(m.Size) {
			file := m.body.File
			if released, err = s.moveBodyIntoPebble(m, b); err != nil {
				s.log.Warn("spool: keeping a message's bytes in their body file", zap.String("id", id), zap.Error(err))
				s.bodies.markUnmovable(file)
			}
		}
		_ = b.Set(k.message(id), m.encode(nil), nil)
	}
	// Outcomes ride on the next sync, except one that carries a notice:
	// the notice is handed to delivery right after the commit, and if the
	// commit were then lost in a crash, the attempt would be made again
	// and fail again, and the sender would get a second, different bounce.
	lazy := (outcomeOps[op] || op == "move") && notice == nil
	wo := s.write
	if lazy {
		wo = pebble.NoSync
	}
	if err := s.commitWith(b, op, wo); err != nil {
		return err
	}
	s.bodies.release(released, m.Size)
	if lazy {
		s.syncSoon()
	}
	if done {
		s.count.Add(-1)
	}
	if notice != nil {
		s.noticeCommitted(notice, noticeDomains)
	}
	return nil
}

// noticeCommitted counts a committed notice and hands it on.
func (s *Spool) noticeCommitted(n *Notice, domains []string) {
	s.count.Add(1)
	if n.Committed != nil {
		n.Committed()
	}
	if s.opts.OnNotice != nil {
		s.opts.OnNotice(n.Message.ID, domains)
	}
}

// deleteDue adds to b the deletion of the due entries of m's queued
// recipients (it has none while held).
func deleteDue(b *pebble.Batch, m *Message) {
	eachDueKey(m, func(key []byte) { _ = b.Delete(key, nil) })
}

// setDue adds to b the due entries of m's queued recipients.
func setDue(b *pebble.Batch, m *Message) {
	eachDueKey(m, func(key []byte) { _ = b.Set(key, nil, nil) })
}

// eachDueKey calls fn with the due-index key of every queued recipient of
// m, unless m is held. The key is only valid during the call.
func eachDueKey(m *Message, fn func(key []byte)) {
	if m.Held {
		return
	}
	var k keyBuf
	for i := range m.Recipients {
		if r := &m.Recipients[i]; r.Status == Queued {
			fn(k.due(r.NextAttempt, m.ID, r.Domain))
		}
	}
}

// Defer records a failed attempt (a temporary failure) for the queued
// recipients of domain in message id, with the reply that caused it, and
// makes them due again at until.
func (s *Spool) Defer(id, domain string, until time.Time, o Outcome) error {
	now := s.opts.Now()
	return s.update("defer", id, func(m *Message, b *pebble.Batch) (*Transition, error) {
		deleteDue(b, m)
		t := &Transition{}
		for i := range m.Recipients {
			r := &m.Recipients[i]
			if r.Status == Queued && r.Domain == domain {
				r.Attempts++
				r.LastAttempt = now
				r.record(o)
				r.NextAttempt = until
				t.Changed = append(t.Changed, i)
			}
		}
		setDue(b, m)
		return t, nil
	})
}

// record sets the recipient's last reply from o. RemoteMTA and Diagnostic
// keep the last reply a remote server gave: an outcome with a local reason
// (a refused connection, a postponement, the expiry) leaves them, so that
// a bounce at expiry can still quote what the server last said.
func (r *RecipientState) record(o Outcome) {
	r.LastReply = o.Reply
	if o.RemoteMTA != "" {
		r.RemoteMTA, r.Diagnostic = o.RemoteMTA, o.Diagnostic
	}
}

// MarkDelivered records that recipients of message id were accepted by
// their server, each with its reply. The message is removed once no
// recipient is queued.
func (s *Spool) MarkDelivered(id string, results []Result) error {
	return s.finish("deliver", id, results, Delivered)
}

// Fail records that recipients of message id failed permanently, each with
// its reply (a 5xx, or a local reason such as the queue lifetime). With a
// Notifier, the bounce is made in the same batch.
func (s *Spool) Fail(id string, results []Result) error {
	return s.finish("fail", id, results, Failed)
}

// Bounce fails every queued recipient of message id now, with reason, and
// so bounces them: the operator's "return to sender".
func (s *Spool) Bounce(id, reason string) error {
	m, err := s.Get(id)
	if err != nil {
		return err
	}
	var results []Result
	for _, r := range m.Recipients {
		if r.Status == Queued {
			results = append(results, Result{Address: r.Address, Outcome: Outcome{Reply: reason}})
		}
	}
	return s.finish("bounce", id, results, Failed)
}

func (s *Spool) finish(op, id string, results []Result, st Status) error {
	now := s.opts.Now()
	return s.update(op, id, func(m *Message, b *pebble.Batch) (*Transition, error) {
		deleteDue(b, m)
		t := &Transition{}
		for i := range m.Recipients {
			r := &m.Recipients[i]
			if r.Status != Queued {
				continue
			}
			for _, res := range results {
				if res.Address != r.Address {
					continue
				}
				r.Status = st
				r.Attempts++
				r.LastAttempt = now
				r.record(res.Outcome)
				t.Changed = append(t.Changed, i)
				t.RemoteDSN = res.RemoteDSN
				break
			}
		}
		setDue(b, m)
		return t, nil
	})
}

// Hold takes message id out of the due index until Release.
func (s *Spool) Hold(id string) error {
	return s.update("hold", id, func(m *Message, b *pebble.Batch) (*Transition, error) {
		deleteDue(b, m)
		m.Held = true
		return nil, nil
	})
}

// Release puts a held message back in the due index, due now.
func (s *Spool) Release(id string) error {
	now := s.opts.Now()
	return s.update("release", id, func(m *Message, b *pebble.Batch) (*Transition, error) {
		if !m.Held {
			return nil, nil
		}
		m.Held = false
		reschedule(m, now)
		setDue(b, m)
		return nil, nil
	})
}

// Reschedule makes every queued recipient of message id due at t, unless it
// is held. Flush uses it with t = now.
func (s *Spool) Reschedule(id string, t time.Time) error {
	return s.update("reschedule", id, func(m *Message, b *pebble.Batch) (*Transition, error) {
		deleteDue(b, m)
		reschedule(m, t)
		setDue(b, m)
		return nil, nil
	})
}

func reschedule(m *Message, t time.Time) {
	for i := range m.Recipients {
		if m.Recipients[i].Status == Queued {
			m.Recipients[i].NextAttempt = t
		}
	}
}

// Flush makes every message that is waiting for a retry due now. It makes
// one pass over the due index as it was when Flush began, so it ends even
// while new mail keeps arriving. It returns how many messages it
// rescheduled.
func (s *Spool) Flush() (int, error) {
	now := s.opts.Now()
	var k keyBuf
	lower := append([]byte(nil), k.dueBound(now.Add(time.Nanosecond))...)
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: []byte(prefixEnd(prefixDue))})
	if err != nil {
		return 0, err
	}
	defer it.Close()
	n := 0
	seen := map[string]bool{}
	for ok := it.First(); ok; ok = it.Next() {
		e, err := parseDue(it.Key())
		if err != nil || seen[e.ID] {
			continue
		}
		if len(seen) >= 10000 {
			clear(seen) // bounded memory; a repeat only reschedules again
		}
		seen[e.ID] = true
		if err := s.Reschedule(e.ID, now); err != nil && !errors.Is(err, mta.ErrNotFound) {
			return n, err
		}
		n++
	}
	return n, it.Error()
}

// Remove deletes message id and all its entries, whatever their state.
func (s *Spool) Remove(id string) error {
	return s.update("remove", id, func(m *Message, b *pebble.Batch) (*Transition, error) {
		deleteDue(b, m)
		for i := range m.Recipients {
			if m.Recipients[i].Status == Queued {
				m.Recipients[i].Status = Failed
				m.Recipients[i].LastReply = "removed by the administrator"
			}
		}
		return nil, nil
	})
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func stripe(id string) uint8 {
	h := fnv.New32a()
	h.Write([]byte(id))
	return uint8(h.Sum32())
}

// Key prefixes.
const (
	prefixMessage = "m/"
	prefixBody    = "b/"
	prefixDue     = "q/"
)

// prefixEnd returns the smallest key greater than every key with prefix p.
func prefixEnd(p string) string { return p[:len(p)-1] + string(p[len(p)-1]+1) }

// keyBuf builds keys without allocating more than once per key.
type keyBuf struct{ b [64]byte }

func (k *keyBuf) message(id string) []byte { return append(append(k.b[:0], prefixMessage...), id...) }
func (k *keyBuf) body(id string) []byte    { return append(append(k.b[:0], prefixBody...), id...) }

func (k *keyBuf) dueBound(t time.Time) []byte {
	b := append(k.b[:0], prefixDue...)
	return binary.BigEndian.AppendUint64(b, uint64(t.UnixNano()))
}

func (k *keyBuf) due(t time.Time, id, domain string) []byte {
	b := k.dueBound(t)
	b = append(b, '/')
	b = append(b, id...)
	b = append(b, '/')
	return append(b, domain...)
}

func parseDue(key []byte) (DueEntry, error) {
	const head = len(prefixDue) + 8 + 1
	if len(key) < head+IDLen+1 || key[head-1] != '/' || key[head+IDLen] != '/' {
		return DueEntry{}, errCorrupt
	}
	ns := binary.BigEndian.Uint64(key[len(prefixDue):])
	return DueEntry{
		ID:     string(key[head : head+IDLen]),
		Domain: string(key[head+IDLen+1:]),
		Due:    time.Unix(0, int64(ns)),
	}, nil
}
