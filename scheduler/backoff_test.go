package scheduler

import (
	"math/rand/v2"
	"testing"
	"time"
)

func TestBackoffDoublesWithinBoundsWithJitter(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	min, max := 5*time.Minute, 4000*time.Second
	for attempt, base := range map[int]time.Duration{1: 5 * time.Minute, 2: 10 * time.Minute, 3: 20 * time.Minute, 4: 40 * time.Minute, 5: 4000 * time.Second, 50: 4000 * time.Second} {
		seen := map[time.Duration]bool{}
		for i := 0; i < 200; i++ {
			d := backoff(attempt, min, max, rnd)
			if d < min || d > max {
				t.Fatalf("attempt %d: %v outside [%v, %v]", attempt, d, min, max)
			}
			lo, hi := time.Duration(float64(base)*0.8), time.Duration(float64(base)*1.2)
			if d < lo && d != min || d > hi {
				t.Fatalf("attempt %d: %v not within ±20%% of %v", attempt, d, base)
			}
			seen[d] = true
		}
		if len(seen) < 10 {
			t.Fatalf("attempt %d: no jitter (%d distinct delays)", attempt, len(seen))
		}
	}
	if d := backoff(0, time.Second, time.Second, rnd); d != time.Second {
		t.Fatalf("min == max: %v", d)
	}
}
