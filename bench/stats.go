package bench

import (
	"fmt"
	"math"
	"slices"
	"time"
)

// Durations is a sample of measured durations, e.g. per-message latencies.
// The methods never modify the receiver; they work on a sorted copy.
type Durations []time.Duration

// Percentile returns the p-th percentile (p in 0..100) by the nearest-rank
// method: the smallest sample such that at least p percent of the samples are
// less than or equal to it. p <= 0 gives the minimum, p >= 100 the maximum.
// An empty sample gives 0.
func (d Durations) Percentile(p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	return percentileSorted(d.sorted(), p)
}

// Median is Percentile(50); for an even number of samples it is the lower of
// the two middle values, never an average.
func (d Durations) Median() time.Duration { return d.Percentile(50) }

// Mean returns the arithmetic mean, or 0 for an empty sample.
func (d Durations) Mean() time.Duration {
	if len(d) == 0 {
		return 0
	}
	var sum float64 // float: a sum of many long durations may overflow int64
	for _, x := range d {
		sum += float64(x)
	}
	return time.Duration(math.Round(sum / float64(len(d))))
}

// Summary is the usual digest of a latency sample.
type Summary struct {
	N    int
	P50  time.Duration
	P90  time.Duration
	P99  time.Duration
	Max  time.Duration
	Mean time.Duration
}

// Summary returns p50/p90/p99/max (nearest rank, as Percentile) and the mean,
// sorting the sample once. An empty sample gives the zero Summary.
func (d Durations) Summary() Summary {
	if len(d) == 0 {
		return Summary{}
	}
	s := d.sorted()
	return Summary{
		N:    len(s),
		P50:  percentileSorted(s, 50),
		P90:  percentileSorted(s, 90),
		P99:  percentileSorted(s, 99),
		Max:  s[len(s)-1],
		Mean: d.Mean(),
	}
}

// String renders the summary on one line, e.g. for benchmark logs.
func (s Summary) String() string {
	return fmt.Sprintf("n=%d p50=%v p90=%v p99=%v max=%v mean=%v",
		s.N, s.P50, s.P90, s.P99, s.Max, s.Mean)
}

func (d Durations) sorted() []time.Duration {
	s := slices.Clone([]time.Duration(d))
	slices.Sort(s)
	return s
}

// percentileSorted is nearest-rank on an already sorted, non-empty slice.
func percentileSorted(s []time.Duration, p float64) time.Duration {
	n := len(s)
	if p <= 0 || math.IsNaN(p) {
		return s[0]
	}
	if p >= 100 {
		return s[n-1]
	}
	// rank = ceil(p/100 * n), computed as p*n/100 so that exact cases
	// (p=90, n=10) stay exact; the epsilon absorbs representation error of
	// fractional p such as 99.9.
	rank := int(math.Ceil(p*float64(n)/100 - 1e-9))
	rank = min(max(rank, 1), n)
	return s[rank-1]
}

// MedianBy is the median of f over runs: each figure of a scenario's
// summary is its own median, not the median run's.
func MedianBy[T any](runs []T, f func(T) float64) float64 {
	xs := make([]float64, len(runs))
	for i, r := range runs {
		xs[i] = f(r)
	}
	return MedianFloat(xs)
}

// MedianFloat returns the median of xs: the middle value of a sorted copy, or
// the mean of the two middle values when len(xs) is even. It returns 0 for an
// empty slice. Intended for summarising repeated runs (e.g. rates).
func MedianFloat(xs []float64) float64 {
	n := len(xs)
	if n == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}
