// Package webhook delivers message events to HTTP endpoints: each webhook
// has a bounded queue on disk (in the spool's database, through Store),
// a sender that posts JSON batches signed with HMAC-SHA256 and retries
// with backoff, and counters for what it queued, delivered and dropped. A
// dead endpoint never holds mail up: past its buffer's limit new events
// are dropped and counted. docs/webhooks.md describes the format.
package webhook

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// StoredEvent is one queued event with its sequence number.
type StoredEvent struct {
	Seq  uint64
	Data []byte
}

// Store keeps each webhook's queue.
type Store interface {
	AppendEvents(hook string, events []StoredEvent) error
	Events(hook string, limit int) ([]StoredEvent, error)
	DeleteEvents(hook string, through uint64) error
	EventBacklog(hook string) (n int, bytes int64, last uint64, err error)
}

// Hook is one endpoint.
type Hook struct {
	Name      string
	URL       string
	Secret    string // HMAC-SHA256 key of the signature header
	MaxBuffer int64  // bytes of events kept while the endpoint does not take them
}

// Options configure a Dispatcher.
type Options struct {
	Store      Store
	Hooks      []Hook
	BatchSize  int           // events per POST (100)
	MinBackoff time.Duration // first retry delay (1s)
	MaxBackoff time.Duration // longest retry delay (5m)
	Timeout    time.Duration // per POST (10s)
	UserAgent  string
	Logger     *zap.Logger
	Registerer prometheus.Registerer
	Client     *http.Client // nil: one with Timeout that follows no redirects
}

// Dispatcher queues events and runs the senders.
type Dispatcher struct {
	opts  Options
	hooks map[string]*hook
	in    chan queued
	wg    sync.WaitGroup

	queued, dropped, delivered *prometheus.CounterVec
	posts                      *prometheus.CounterVec
	buffered                   *prometheus.GaugeVec
}

type queued struct {
	hook string
	data []byte
}

type hook struct {
	Hook
	bytes atomic.Int64  // queued on disk
	seq   atomic.Uint64 // last sequence number given
	wake  chan struct{}
}

// New returns a Dispatcher; Run starts it. It reads each hook's backlog
// left by an earlier run.
func New(opts Options) (*Dispatcher, error) {
	if opts.BatchSize <= 0 {
		opts.BatchSize = 100
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = time.Second
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = 5 * time.Minute
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 10 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.Client == nil {
		opts.Client = &http.Client{Timeout: opts.Timeout, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	}
	d := &Dispatcher{opts: opts, hooks: map[string]*hook{}, in: make(chan queued, 10000)}
	label := []string{"webhook"}
	d.queued = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mta_webhook_events_queued_total", Help: "Events queued for a webhook."}, label)
	d.dropped = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mta_webhook_events_dropped_total", Help: "Events dropped: the webhook's buffer was full."}, label)
	d.delivered = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mta_webhook_events_delivered_total", Help: "Events the webhook accepted (2xx)."}, label)
	d.posts = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mta_webhook_posts_total", Help: "Batches posted to a webhook by result (ok, failed)."}, []string{"webhook", "result"})
	d.buffered = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "mta_webhook_buffer_bytes", Help: "Bytes of events waiting for a webhook."}, label)
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(d.queued, d.dropped, d.delivered, d.posts, d.buffered)
	}
	for _, hk := range opts.Hooks {
		h := &hook{Hook: hk, wake: make(chan struct{}, 1)}
		_, b, last, err := opts.Store.EventBacklog(hk.Name)
		if err != nil {
			return nil, fmt.Errorf("webhook %s: reading its backlog: %w", hk.Name, err)
		}
		h.bytes.Store(b)
		// Sequence numbers start past the backlog and past the clock, so
		// that an event ID never repeats across restarts.
		h.seq.Store(max(last, uint64(time.Now().UnixNano())))
		d.hooks[hk.Name] = h
		d.buffered.WithLabelValues(hk.Name).Set(float64(b))
		for _, c := range []*prometheus.CounterVec{d.queued, d.dropped, d.delivered} {
			c.WithLabelValues(hk.Name)
		}
		d.posts.WithLabelValues(hk.Name, "ok")
		d.posts.WithLabelValues(hk.Name, "failed")
	}
	return d, nil
}

// Has reports whether a webhook of that name exists.
func (d *Dispatcher) Has(name string) bool { return d != nil && d.hooks[name] != nil }

// Enqueue queues one event (a JSON object) for the named webhook. It never
// blocks: when the queue in memory or the buffer on disk is full, the
// event is dropped and counted.
func (d *Dispatcher) Enqueue(name string, event []byte) {
	h := d.hooks[name]
	if h == nil {
		return
	}
	if h.bytes.Load()+int64(len(event)) > h.MaxBuffer {
		d.dropped.WithLabelValues(name).Inc()
		return
	}
	select {
	case d.in <- queued{name, event}:
	default:
		d.dropped.WithLabelValues(name).Inc()
	}
}

// Run writes queued events to the store and posts them until ctx ends.
// Events still in memory then are written out first.
func (d *Dispatcher) Run(ctx context.Context) {
	for _, h := range d.hooks {
		d.wg.Add(1)
		go func() { defer d.wg.Done(); d.send(ctx, h) }()
	}
	d.write(ctx)
	d.wg.Wait()
}

// write moves events from memory to the store, in batches.
func (d *Dispatcher) write(ctx context.Context) {
	batch := map[string][]StoredEvent{}
	flush := func() {
		for name, evs := range batch {
			h := d.hooks[name]
			var n int64
			for _, e := range evs {
				n += int64(len(e.Data))
			}
			if err := d.opts.Store.AppendEvents(name, evs); err != nil {
				d.dropped.WithLabelValues(name).Add(float64(len(evs)))
				d.opts.Logger.Warn("webhook events not stored; dropped", zap.String("webhook", name), zap.Int("events", len(evs)), zap.Error(err))
				continue
			}
			h.bytes.Add(n)
			d.buffered.WithLabelValues(name).Set(float64(h.bytes.Load()))
			d.queued.WithLabelValues(name).Add(float64(len(evs)))
			select {
			case h.wake <- struct{}{}:
			default:
			}
		}
		clear(batch)
	}
	add := func(q queued) {
		h := d.hooks[q.hook]
		seq := h.seq.Add(1)
		batch[q.hook] = append(batch[q.hook], StoredEvent{Seq: seq, Data: withID(q.data, q.hook, seq)})
	}
	for {
		select {
		case <-ctx.Done():
			for {
				select {
				case q := <-d.in:
					add(q)
				default:
					flush()
					return
				}
			}
		case q := <-d.in:
			add(q)
			for more := true; more && len(batch[q.hook]) < 1000; {
				select {
				case q := <-d.in:
					add(q)
				default:
					more = false
				}
			}
			flush()
		}
	}
}

// withID puts "event_id" first in the event object.
func withID(event []byte, hook string, seq uint64) []byte {
	id := `{"event_id":"` + hook + "-" + strconv.FormatUint(seq, 16) + `"`
	if len(event) > 2 {
		id += ","
	}
	return append([]byte(id), event[1:]...)
}

// send posts a hook's queue in order, retrying a failed batch with
// exponential backoff and jitter.
func (d *Dispatcher) send(ctx context.Context, h *hook) {
	failures := 0
	batch := d.opts.BatchSize // smaller after a refusal of the content, until a post is taken
	for ctx.Err() == nil {
		evs, err := d.opts.Store.Events(h.Name, batch)
		if err != nil {
			d.opts.Logger.Warn("webhook queue unreadable", zap.String("webhook", h.Name), zap.Error(err))
		}
		if len(evs) == 0 {
			select {
			case <-ctx.Done():
				return
			case <-h.wake:
			case <-time.After(time.Second):
			}
			continue
		}
		if err := d.post(ctx, h, evs); err != nil {
			d.posts.WithLabelValues(h.Name, "failed").Inc()
			var st statusError
			if errors.As(err, &st) && refusesContent(int(st)) && len(evs) > 1 {
				// Too large, or one event the receiver cannot take:
				// smaller batches get what it can take through.
				batch = max(1, len(evs)/2)
				continue
			}
			failures++
			wait := min(d.opts.MinBackoff<<min(failures-1, 20), d.opts.MaxBackoff)
			wait = wait/2 + rand.N(wait/2+1)
			if failures == 1 || failures%10 == 0 {
				d.opts.Logger.Warn("webhook post failed; retrying", zap.String("webhook", h.Name), zap.Int("failures", failures),
					zap.Duration("in", wait), zap.Error(err))
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
			continue
		}
		failures, batch = 0, d.opts.BatchSize
		d.posts.WithLabelValues(h.Name, "ok").Inc()
		d.delivered.WithLabelValues(h.Name).Add(float64(len(evs)))
		d.remove(h, evs)
	}
}

// remove deletes evs, posted or dropped, from h's queue.
func (d *Dispatcher) remove(h *hook, evs []StoredEvent) {
	if err := d.opts.Store.DeleteEvents(h.Name, evs[len(evs)-1].Seq); err != nil {
		d.opts.Logger.Warn("webhook events delivered but not removed; they may be posted again", zap.String("webhook", h.Name), zap.Error(err))
	}
	var n int64
	for _, e := range evs {
		n += int64(len(e.Data))
	}
	d.buffered.WithLabelValues(h.Name).Set(float64(h.bytes.Add(-n)))
}

// refusesContent reports whether an HTTP status may refuse what was
// posted rather than where or when: 400, 413, 415, 422. A batch so
// refused is split, so that one event too large or too odd for the
// receiver does not keep the others back; nothing is ever dropped for it,
// since a misconfigured receiver (a wrong secret gets 400 from common
// webhook libraries) answers the same to every post.
func refusesContent(code int) bool {
	switch code {
	case http.StatusBadRequest, http.StatusRequestEntityTooLarge, http.StatusUnsupportedMediaType, http.StatusUnprocessableEntity:
		return true
	}
	return false
}

// redacted is a webhook URL for the log: without its user information
// and query, which may hold credentials.
func redacted(u string) string {
	p, err := url.Parse(u)
	if err != nil {
		return "(the webhook's URL)"
	}
	p.User = nil
	if p.RawQuery != "" {
		p.RawQuery = "…"
	}
	return p.String()
}

// statusError is a post answered with a status other than 2xx.
type statusError int

func (e statusError) Error() string {
	return "HTTP " + strconv.Itoa(int(e)) + " " + http.StatusText(int(e))
}

// SignatureHeader is the header carrying the signature.
const SignatureHeader = "X-MTA-Signature"

// Sign returns the signature header value for body sent at t:
// "t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">".
func Sign(secret string, t time.Time, body []byte) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(ts + "."))
	mac.Write(body)
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac.Sum(nil))
}

// post sends one batch as a JSON array.
func (d *Dispatcher) post(ctx context.Context, h *hook, evs []StoredEvent) error {
	var body bytes.Buffer
	body.WriteByte('[')
	for i, e := range evs {
		if i > 0 {
			body.WriteByte(',')
		}
		body.Write(e.Data)
	}
	body.WriteByte(']')
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.URL, bytes.NewReader(body.Bytes()))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(SignatureHeader, Sign(h.Secret, time.Now(), body.Bytes()))
	if d.opts.UserAgent != "" {
		req.Header.Set("User-Agent", d.opts.UserAgent)
	}
	resp, err := d.opts.Client.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			ue.URL = redacted(h.URL) // the log must not show a token in the query
		}
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode/100 != 2 {
		return statusError(resp.StatusCode)
	}
	return nil
}
