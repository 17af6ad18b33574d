package mta

import (
	"context"
	"testing"
	"time"
)

func TestBudget(t *testing.T) {
	b := NewBudget(100)
	if !b.TryAcquire(60) || b.TryAcquire(50) || !b.TryAcquire(40) || b.Used() != 100 {
		t.Fatalf("used %d", b.Used())
	}
	b.Release(100)
	// Larger than the whole budget: granted when nothing else is held.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := b.Acquire(ctx, 500); err != nil || b.Used() != 500 {
		t.Fatalf("oversized acquire: %v, used %d", err, b.Used())
	}
	// A waiter gets its bytes once they are released.
	done := make(chan error, 1)
	go func() { done <- b.Acquire(ctx, 30) }()
	time.Sleep(20 * time.Millisecond)
	b.Release(500)
	if err := <-done; err != nil || b.Used() != 30 {
		t.Fatalf("waiting acquire: %v, used %d", err, b.Used())
	}
	short, cancel2 := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel2()
	if err := b.Acquire(short, 90); err == nil {
		t.Fatal("acquire past the budget did not wait")
	}
	var none *Budget
	if !none.TryAcquire(1<<40) || none.Acquire(ctx, 1) != nil || none.Used() != 0 {
		t.Fatal("nil budget is not unlimited")
	}
}
