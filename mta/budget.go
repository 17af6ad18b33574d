package mta

import (
	"context"
	"sync/atomic"
	"time"
)

// Budget bounds the bytes of message bodies held in memory at once, by
// the SMTP edge while it receives them and by delivery while it sends
// them: one setting caps what a thousand sessions of large messages can
// make the process hold. A nil *Budget is unlimited. Safe for concurrent
// use.
type Budget struct {
	limit int64
	used  atomic.Int64
}

// NewBudget returns a budget of limit bytes; limit <= 0 means unlimited
// (nil).
func NewBudget(limit int64) *Budget {
	if limit <= 0 {
		return nil
	}
	return &Budget{limit: limit}
}

// TryAcquire takes n bytes if they fit, and reports whether it did.
func (b *Budget) TryAcquire(n int64) bool {
	if b == nil || n <= 0 {
		return true
	}
	for {
		u := b.used.Load()
		if u+n > b.limit {
			return false
		}
		if b.used.CompareAndSwap(u, u+n) {
			return true
		}
	}
}

// Acquire takes n bytes, waiting for them to be released if need be, until
// ctx ends. A request larger than the whole budget is granted when nothing
// else is held, so that no single message waits forever.
func (b *Budget) Acquire(ctx context.Context, n int64) error {
	if b == nil || n <= 0 {
		return nil
	}
	wait := time.Millisecond
	for {
		if b.TryAcquire(n) || n > b.limit && b.used.CompareAndSwap(0, n) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		wait = min(2*wait, 50*time.Millisecond)
	}
}

// Release gives n bytes back.
func (b *Budget) Release(n int64) {
	if b != nil && n > 0 {
		b.used.Add(-n)
	}
}

// Used returns the bytes held now.
func (b *Budget) Used() int64 {
	if b == nil {
		return 0
	}
	return b.used.Load()
}

// Limit returns the budget's size; 0 for unlimited.
func (b *Budget) Limit() int64 {
	if b == nil {
		return 0
	}
	return b.limit
}
