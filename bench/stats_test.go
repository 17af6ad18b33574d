package bench

import (
	"math"
	"testing"
	"time"
)

func ms(xs ...int) Durations {
	d := make(Durations, len(xs))
	for i, x := range xs {
		d[i] = time.Duration(x) * time.Millisecond
	}
	return d
}

func TestPercentile(t *testing.T) {
	one10 := ms(10, 9, 8, 7, 6, 5, 4, 3, 2, 1) // 1..10 ms, unsorted
	hundred := make(Durations, 100)
	for i := range hundred {
		hundred[99-i] = time.Duration(i+1) * time.Millisecond // 1..100 ms, reversed
	}
	tests := []struct {
		name string
		d    Durations
		p    float64
		want time.Duration
	}{
		{"empty", nil, 50, 0},
		{"empty p0", Durations{}, 0, 0},
		{"single p0", ms(7), 0, 7 * time.Millisecond},
		{"single p50", ms(7), 50, 7 * time.Millisecond},
		{"single p100", ms(7), 100, 7 * time.Millisecond},
		{"10 p0", one10, 0, 1 * time.Millisecond},
		{"10 p10", one10, 10, 1 * time.Millisecond},
		{"10 p11", one10, 11, 2 * time.Millisecond},
		{"10 p50", one10, 50, 5 * time.Millisecond},
		{"10 p51", one10, 51, 6 * time.Millisecond},
		{"10 p90", one10, 90, 9 * time.Millisecond},
		{"10 p90.5", one10, 90.5, 10 * time.Millisecond},
		{"10 p99", one10, 99, 10 * time.Millisecond},
		{"10 p100", one10, 100, 10 * time.Millisecond},
		{"10 p>100", one10, 150, 10 * time.Millisecond},
		{"10 p<0", one10, -5, 1 * time.Millisecond},
		{"100 p1", hundred, 1, 1 * time.Millisecond},
		{"100 p50", hundred, 50, 50 * time.Millisecond},
		{"100 p99", hundred, 99, 99 * time.Millisecond},
		{"100 p99.9", hundred, 99.9, 100 * time.Millisecond},
		{"100 p33.3", hundred, 33.3, 34 * time.Millisecond},
		{"even p50 is lower middle", ms(1, 2, 3, 4), 50, 2 * time.Millisecond},
		{"duplicates", ms(5, 5, 5, 1), 50, 5 * time.Millisecond},
		// Wikipedia's nearest-rank example: 15 20 35 40 50.
		{"wiki p5", ms(15, 20, 35, 40, 50), 5, 15 * time.Millisecond},
		{"wiki p30", ms(15, 20, 35, 40, 50), 30, 20 * time.Millisecond},
		{"wiki p40", ms(15, 20, 35, 40, 50), 40, 20 * time.Millisecond},
		{"wiki p50", ms(15, 20, 35, 40, 50), 50, 35 * time.Millisecond},
	}
	for _, tt := range tests {
		if got := tt.d.Percentile(tt.p); got != tt.want {
			t.Errorf("%s: Percentile(%v) = %v, want %v", tt.name, tt.p, got, tt.want)
		}
	}
}

func TestPercentileDoesNotModify(t *testing.T) {
	d := ms(3, 1, 2)
	_ = d.Percentile(50)
	_ = d.Summary()
	if d[0] != 3*time.Millisecond || d[1] != 1*time.Millisecond || d[2] != 2*time.Millisecond {
		t.Fatalf("receiver modified: %v", d)
	}
}

func TestMedianMean(t *testing.T) {
	tests := []struct {
		d            Durations
		median, mean time.Duration
	}{
		{nil, 0, 0},
		{ms(4), 4 * time.Millisecond, 4 * time.Millisecond},
		{ms(1, 2, 3, 4), 2 * time.Millisecond, 2500 * time.Microsecond},
		{ms(9, 1, 5), 5 * time.Millisecond, 5 * time.Millisecond},
		{Durations{1, 2}, 1, 2}, // 1.5ns rounds half away from zero
	}
	for _, tt := range tests {
		if got := tt.d.Median(); got != tt.median {
			t.Errorf("%v.Median() = %v, want %v", tt.d, got, tt.median)
		}
		if got := tt.d.Mean(); got != tt.mean {
			t.Errorf("%v.Mean() = %v, want %v", tt.d, got, tt.mean)
		}
	}
}

func TestSummary(t *testing.T) {
	if got := (Durations{}).Summary(); got != (Summary{}) {
		t.Errorf("empty Summary = %+v", got)
	}
	d := make(Durations, 0, 1000)
	for i := 1000; i >= 1; i-- {
		d = append(d, time.Duration(i)*time.Microsecond)
	}
	want := Summary{
		N:    1000,
		P50:  500 * time.Microsecond,
		P90:  900 * time.Microsecond,
		P99:  990 * time.Microsecond,
		Max:  1000 * time.Microsecond,
		Mean: 500500 * time.Nanosecond,
	}
	got := d.Summary()
	if got != want {
		t.Errorf("Summary = %+v, want %+v", got, want)
	}
	if got.P50 != d.Percentile(50) || got.P90 != d.Percentile(90) || got.P99 != d.Percentile(99) {
		t.Errorf("Summary disagrees with Percentile")
	}
	if s := got.String(); s != "n=1000 p50=500µs p90=900µs p99=990µs max=1ms mean=500.5µs" {
		t.Errorf("String = %q", s)
	}
}

func TestMedianFloat(t *testing.T) {
	tests := []struct {
		xs   []float64
		want float64
	}{
		{nil, 0},
		{[]float64{3}, 3},
		{[]float64{3, 1}, 2},
		{[]float64{5, 1, 3}, 3},
		{[]float64{4, 1, 3, 2}, 2.5},
		{[]float64{-1, -3, 10, 2, 2}, 2},
	}
	for _, tt := range tests {
		in := append([]float64(nil), tt.xs...)
		if got := MedianFloat(tt.xs); got != tt.want {
			t.Errorf("MedianFloat(%v) = %v, want %v", tt.xs, got, tt.want)
		}
		for i := range in {
			if in[i] != tt.xs[i] && !(math.IsNaN(in[i]) && math.IsNaN(tt.xs[i])) {
				t.Errorf("MedianFloat modified its input: %v", tt.xs)
			}
		}
	}
}
