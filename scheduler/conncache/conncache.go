// Package conncache keeps idle outbound connections for reuse, keyed by
// destination (the next-hop set) and remembering each one's endpoint. A
// connection is reused until it has carried MaxMessages messages or sat
// idle for IdleTimeout; the user checks it with RSET when it sends the next
// message (pipelined with MAIL, so the check costs no round trip).
package conncache

import (
	"slices"
	"sync"
	"time"
)

// Conn is what the cache needs of a connection.
type Conn interface {
	Usable() bool
	Endpoint() string
	Close() error
}

// Options configure a Cache.
type Options struct {
	IdleTimeout time.Duration    // close a connection idle this long
	MaxMessages int              // close a connection after this many messages
	MaxIdle     int              // idle connections kept per destination
	Now         func() time.Time // nil: time.Now
	// OnClose is told why the cache closed a connection: "idle_timeout",
	// "message_limit", "unusable", "too_many_idle", "shutdown", and how
	// many messages it carried in its life.
	OnClose func(reason string, messages int)
}

// Limits are a destination's own MaxMessages and MaxIdle, given with each
// Put; a zero field keeps the Options value.
type Limits struct {
	MaxMessages, MaxIdle int
}

type entry[C Conn] struct {
	conn        C
	messages    int
	maxMessages int // the destination's own, or 0: Options.MaxMessages
	since       time.Time
}

// entryOverLimit reports whether e has carried its destination's most messages.
func (c *Cache[C]) entryOverLimit(e entry[C]) bool {
	max := e.maxMessages
	if max <= 0 {
		max = c.opts.MaxMessages
	}
	return max > 0 && e.messages >= max
}

// Cache holds idle connections. It is safe for concurrent use. Close
// closes every connection it holds.
type Cache[C Conn] struct {
	opts Options
	mu   sync.Mutex
	idle map[string][]entry[C]
	stop chan struct{}
	done chan struct{}
}

// New returns a cache and starts its janitor, which closes expired
// connections.
func New[C Conn](opts Options) *Cache[C] {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.OnClose == nil {
		opts.OnClose = func(string, int) {}
	}
	c := &Cache[C]{opts: opts, idle: map[string][]entry[C]{}, stop: make(chan struct{}), done: make(chan struct{})}
	period := opts.IdleTimeout / 2
	if period <= 0 || period > time.Second {
		period = time.Second
	}
	go c.janitor(period)
	return c
}

// Get takes the parked connection of dest that has carried the fewest
// messages (of those, the most recently parked), with that number.
//
// Taking the least used one makes the connections of a destination wear
// evenly: when a bulk run arrives in bursts, the connections a big burst
// opened are used again by the small ones, instead of a few connections
// reaching the message limit and being replaced while the others sit half
// used. The price: while traffic continues, every parked connection stays
// in the rotation as long as each is taken within the idle timeout, so a
// destination keeps the connections its last busy spell needed (at most
// MaxIdle) until traffic pauses for the idle timeout.
func (c *Cache[C]) Get(dest string) (conn C, messages int, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.opts.Now()
	list := c.idle[dest][:0]
	best := -1
	for _, e := range c.idle[dest] {
		switch {
		case now.Sub(e.since) >= c.opts.IdleTimeout || !e.conn.Usable():
			go c.close(e.conn, "idle_timeout", e.messages)
			continue
		case c.entryOverLimit(e): // lowered since it was parked
			go c.close(e.conn, "message_limit", e.messages)
			continue
		}
		list = append(list, e)
		if best < 0 || e.messages <= list[best].messages {
			best = len(list) - 1
		}
	}
	if best < 0 {
		c.set(dest, list)
		return conn, 0, false
	}
	e := list[best]
	list = slices.Delete(list, best, best+1)
	c.set(dest, list)
	return e.conn, e.messages, true
}

// Put parks a connection that has carried messages messages, or closes it
// when it is unusable or at its message limit; own are the destination's
// own limits.
func (c *Cache[C]) Put(dest string, conn C, messages int, own Limits) {
	e := entry[C]{conn: conn, messages: messages, maxMessages: own.MaxMessages}
	if !conn.Usable() {
		c.close(conn, "unusable", messages)
		return
	}
	c.mu.Lock()
	if c.entryOverLimit(e) {
		c.mu.Unlock()
		c.close(conn, "message_limit", messages)
		return
	}
	select {
	case <-c.stop:
		c.mu.Unlock()
		c.close(conn, "shutdown", messages)
		return
	default:
	}
	e.since = c.opts.Now()
	list := append(c.idle[dest], e)
	maxIdle := c.opts.MaxIdle
	if own.MaxIdle > 0 {
		maxIdle = own.MaxIdle
	}
	var evicted []entry[C]
	for maxIdle > 0 && len(list) > maxIdle {
		evicted = append(evicted, list[0])
		list = list[1:]
	}
	c.set(dest, list)
	c.mu.Unlock()
	for _, e := range evicted {
		c.close(e.conn, "too_many_idle", e.messages)
	}
}

// Idle returns how many connections the cache holds.
func (c *Cache[C]) Idle() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, l := range c.idle {
		n += len(l)
	}
	return n
}

// Close closes every idle connection and stops the janitor.
func (c *Cache[C]) Close() {
	c.mu.Lock()
	select {
	case <-c.stop:
		c.mu.Unlock()
		return
	default:
	}
	close(c.stop)
	all := c.idle
	c.idle = map[string][]entry[C]{}
	c.mu.Unlock()
	<-c.done
	// In parallel: each close may wait for a slow peer's reply to QUIT.
	var wg sync.WaitGroup
	for _, l := range all {
		for _, e := range l {
			wg.Add(1)
			go func() { defer wg.Done(); c.close(e.conn, "shutdown", e.messages) }()
		}
	}
	wg.Wait()
}

func (c *Cache[C]) set(dest string, list []entry[C]) {
	if len(list) == 0 {
		delete(c.idle, dest)
	} else {
		c.idle[dest] = list
	}
}

// SetLimits changes IdleTimeout, MaxMessages and MaxIdle while the cache
// is in use (a reload); connections parked already are judged by the new
// values from then on.
func (c *Cache[C]) SetLimits(idleTimeout time.Duration, maxMessages, maxIdle int) {
	c.mu.Lock()
	c.opts.IdleTimeout, c.opts.MaxMessages, c.opts.MaxIdle = idleTimeout, maxMessages, maxIdle
	c.mu.Unlock()
}

func (c *Cache[C]) close(conn C, reason string, messages int) {
	_ = conn.Close()
	c.opts.OnClose(reason, messages)
}

func (c *Cache[C]) janitor(period time.Duration) {
	defer close(c.done)
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
			c.expire()
		}
	}
}

func (c *Cache[C]) expire() {
	now := c.opts.Now()
	var expired []entry[C]
	c.mu.Lock()
	for dest, list := range c.idle {
		keep := list[:0]
		for _, e := range list {
			if now.Sub(e.since) >= c.opts.IdleTimeout {
				expired = append(expired, e)
			} else {
				keep = append(keep, e)
			}
		}
		c.set(dest, keep)
	}
	c.mu.Unlock()
	for _, e := range expired {
		c.close(e.conn, "idle_timeout", e.messages)
	}
}
