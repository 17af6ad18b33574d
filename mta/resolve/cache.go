package resolve

import (
	"context"
	"net/netip"
	"sync"
	"time"
)

// status is the outcome of a definitive DNS answer.
type status uint8

const (
	statusOK       status = iota // records of the type asked for
	statusNXDomain               // the name does not exist
	statusNoData                 // the name exists without such records
)

// mxHost is one MX record: host is lower case without the trailing dot.
type mxHost struct {
	host string
	pref uint16
}

// entry is a definitive answer for one (name, type), after following CNAMEs.
// Entries are never changed once made, so they are shared without locks.
type entry struct {
	expires time.Time
	status  status
	addrs   []netip.Addr // A or AAAA answers
	mx      []mxHost     // MX answers sorted by preference, null targets removed
	nullMX  bool         // every MX target is "." (RFC 7505)
	key     string       // Destination.Key of the MX set
}

type cacheKey struct {
	name  string
	qtype uint16
}

// cache holds definitive answers until they expire. Temporary failures are
// never stored.
type cache struct {
	mu  sync.RWMutex
	max int
	m   map[cacheKey]*entry
}

func newCache(size int) *cache {
	return &cache{max: size, m: make(map[cacheKey]*entry)}
}

// get returns the live entry for k, or nil.
func (c *cache) get(k cacheKey, now time.Time) *entry {
	c.mu.RLock()
	e := c.m[k]
	c.mu.RUnlock()
	if e == nil || !now.Before(e.expires) {
		return nil
	}
	return e
}

// put stores e, making room first when the cache is full.
func (c *cache) put(k cacheKey, e *entry, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.m[k]; !ok && len(c.m) >= c.max {
		c.evict(now)
	}
	c.m[k] = e
}

// evict drops the expired entries, then arbitrary ones, until a 64th of the
// cache is free, so that a full cache is swept only once in a while.
func (c *cache) evict(now time.Time) {
	for k, e := range c.m {
		if !now.Before(e.expires) {
			delete(c.m, k)
		}
	}
	target := c.max - c.max/64 - 1
	for k := range c.m {
		if len(c.m) <= target {
			break
		}
		delete(c.m, k)
	}
}

func (c *cache) len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.m)
}

// flight is a query in progress; callers asking for the same (name, type)
// meanwhile wait for it instead of sending their own.
type flight struct {
	done chan struct{}
	e    *entry
	err  error
}

// cached returns the live cache entry for (name, qtype), or nil.
func (r *Resolver) cached(k cacheKey) *entry {
	e := r.cache.get(k, r.now())
	if e != nil {
		r.metrics.hit()
	}
	return e
}

// lookup returns the answer for (name, qtype) from the cache, or from the
// query already in flight for it, or from a new query. The query runs on its
// own, detached from ctx (it is bounded by the timeouts), so that a caller
// giving up does not fail the others waiting for it; ctx only bounds the
// wait.
func (r *Resolver) lookup(ctx context.Context, name string, qtype uint16) (*entry, error) {
	k := cacheKey{name, qtype}
	if e := r.cached(k); e != nil {
		return e, nil
	}
	r.flightMu.Lock()
	f := r.flights[k]
	if f == nil {
		// The flight may have landed between the cache check and the lock.
		if e := r.cached(k); e != nil {
			r.flightMu.Unlock()
			return e, nil
		}
		f = &flight{done: make(chan struct{})}
		r.flights[k] = f
		go r.fly(context.WithoutCancel(ctx), k, f)
	}
	r.flightMu.Unlock()
	select {
	case <-f.done:
		return f.e, f.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (r *Resolver) fly(ctx context.Context, k cacheKey, f *flight) {
	e, err := r.fetch(ctx, k.name, k.qtype)
	if err == nil {
		r.cache.put(k, e, r.now())
	}
	r.flightMu.Lock()
	delete(r.flights, k)
	r.flightMu.Unlock()
	f.e, f.err = e, err
	close(f.done)
}
