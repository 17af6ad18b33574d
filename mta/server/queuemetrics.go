package server

import (
	"context"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mtaproject/mta/scheduler"
	"github.com/mtaproject/mta/spool"
)

// topDestinations is how many destinations get series of their own: the
// busiest, so that the label set stays bounded however many domains the
// queue holds.
const topDestinations = 10

// queueAges are the age buckets of mta_queue_messages_by_age.
var queueAges = []struct {
	label string
	upTo  time.Duration
}{{"5m", 5 * time.Minute}, {"1h", time.Hour}, {"4h", 4 * time.Hour}, {"1d", 24 * time.Hour}, {"5d", 5 * 24 * time.Hour}, {"older", 1<<63 - 1}}

// queueCollector exports the queue by state and age (counted by a scan
// every scanEvery, which a large queue makes too slow for every scrape)
// and the busiest destinations (from the scheduler, at each scrape).
type queueCollector struct {
	sp    *spool.Spool
	sched *scheduler.Scheduler

	mu      sync.Mutex
	byState map[string]int
	byAge   map[string]int
}

var (
	queueByState = prometheus.NewDesc("mta_queue_messages", "Messages in the queue by state (queued: not tried yet, deferred, held), as of the last count (every 30 s).", []string{"state"}, nil)
	queueByAge   = prometheus.NewDesc("mta_queue_messages_by_age", "Messages in the queue by age bucket (up to 5m, 1h, 4h, 1d, 5d, older), as of the last count.", []string{"age"}, nil)
	destQueued   = prometheus.NewDesc("mta_destination_queued", "Work waiting in memory for a connection, for the busiest destinations.", []string{"destination"}, nil)
	destConns    = prometheus.NewDesc("mta_destination_connections", "Connections delivering now, for the busiest destinations.", []string{"destination"}, nil)
	destBackoff  = prometheus.NewDesc("mta_destination_backed_off", "1 while the destination is backed off after connection failures, for the busiest destinations.", []string{"destination"}, nil)
)

func newQueueCollector(sp *spool.Spool, sched *scheduler.Scheduler) *queueCollector {
	c := &queueCollector{sp: sp, sched: sched, byState: map[string]int{}, byAge: map[string]int{}}
	for _, s := range []string{"queued", "deferred", "held"} {
		c.byState[s] = 0
	}
	for _, a := range queueAges {
		c.byAge[a.label] = 0
	}
	return c
}

// run counts the queue at once and then every interval until ctx ends.
func (c *queueCollector) run(ctx context.Context, interval time.Duration) {
	c.count(ctx)
	every(ctx, interval, func() { c.count(ctx) })
}

// count scans the queue (at most a million messages); it gives up when
// ctx ends, so that a stop does not wait for a long scan.
func (c *queueCollector) count(ctx context.Context) {
	byState := map[string]int{"queued": 0, "deferred": 0, "held": 0}
	byAge := map[string]int{}
	for _, a := range queueAges {
		byAge[a.label] = 0
	}
	now := time.Now()
	_, err := c.sp.Census(ctx, 1_000_000, func(state string, received time.Time) {
		byState[state]++
		age := now.Sub(received)
		for _, a := range queueAges {
			if age <= a.upTo {
				byAge[a.label]++
				break
			}
		}
	})
	if err != nil {
		return
	}
	c.mu.Lock()
	c.byState, c.byAge = byState, byAge
	c.mu.Unlock()
}

func (c *queueCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{queueByState, queueByAge, destQueued, destConns, destBackoff} {
		ch <- d
	}
}

func (c *queueCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v int, label string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(v), label)
	}
	c.mu.Lock()
	for s, n := range c.byState {
		gauge(queueByState, n, s)
	}
	for a, n := range c.byAge {
		gauge(queueByAge, n, a)
	}
	c.mu.Unlock()
	dests := c.sched.Destinations()
	if len(dests) > topDestinations {
		dests = dests[:topDestinations]
	}
	for _, d := range dests {
		gauge(destQueued, d.Queued, d.Key)
		gauge(destConns, d.Connections, d.Key)
		b := 0
		if d.BackedOff {
			b = 1
		}
		gauge(destBackoff, b, d.Key)
	}
}
