package scheduler

import (
	"math/rand/v2"
	"time"
)

// backoff returns the delay before the next attempt after the attempt-th
// failure (1 for the first): min·2^(attempt-1), capped at max, then
// jittered by ±20 % and kept within [min, max], so that deferred work
// does not all come due at the same moment.
func backoff(attempt int, min, max time.Duration, rnd *rand.Rand) time.Duration {
	if attempt < 1 {
		attempt = 1
	}
	d := min
	for i := 1; i < attempt && d < max; i++ {
		d *= 2
	}
	if d > max {
		d = max
	}
	j := time.Duration(float64(d) * (0.8 + 0.4*rnd.Float64()))
	if j < min {
		j = min
	}
	if j > max {
		j = max
	}
	return j
}
