package server

import (
	_ "embed"
	"encoding/json"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/mtaproject/mta/mta/admin"
	"github.com/mtaproject/mta/scheduler"
)

// statusPage is the operator's live page (GET /status): plain HTML and a
// little JavaScript, embedded, no build step. It holds no data; it reads
// GET /api/v1/status with the admin token from its URL fragment.
//
//go:embed status.html
var statusPage []byte

// activity remembers what the status page shows that the queue does not:
// totals since start, the most frequent deferral reasons, the latest
// permanent failures.
type activity struct {
	mu                                    sync.Mutex
	received, delivered, deferred, failed int64
	reasons                               map[string]int // deferral reasons, at most maxReasons distinct
	failures                              []failure      // the latest, newest last
}

type failure struct {
	Time      time.Time `json:"time"`
	ID        string    `json:"id"`
	Recipient string    `json:"recipient"`
	Reply     string    `json:"reply"`
}

const (
	maxReasons  = 200
	maxFailures = 20
)

func (a *activity) reception() {
	a.mu.Lock()
	a.received++
	a.mu.Unlock()
}

func (a *activity) outcome(e scheduler.OutcomeEvent) {
	reply := e.Reason
	if e.Reply != nil {
		reply = e.Reply.Error()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	switch e.Outcome {
	case "delivered":
		a.delivered++
	case "deferred":
		a.deferred++
		if len(reply) > 120 {
			reply = reply[:120]
		}
		if _, ok := a.reasons[reply]; !ok && len(a.reasons) >= maxReasons {
			clear(a.reasons) // start counting afresh: the page shows recent reasons, bounded
		}
		a.reasons[reply]++
	case "failed", "expired":
		a.failed++
		id := ""
		if e.Message != nil {
			id = e.Message.ID
		}
		a.failures = append(a.failures, failure{Time: time.Now(), ID: id, Recipient: e.Recipient, Reply: reply})
		if len(a.failures) > maxFailures {
			a.failures = a.failures[1:]
		}
	}
}

// status is the JSON of GET /api/v1/status.
type status struct {
	Time         time.Time           `json:"time"`
	Hostname     string              `json:"hostname"`
	Received     int64               `json:"received"`
	Delivered    int64               `json:"delivered"`
	Deferred     int64               `json:"deferred"`
	Failed       int64               `json:"failed"`
	Queue        map[string]int      `json:"queue"` // by state
	Shape        admin.Shape         `json:"shape"`
	Reasons      []reasonCount       `json:"deferral_reasons"`
	Destinations []admin.Destination `json:"destinations"`
	Failures     []failure           `json:"recent_failures"`
	SpoolFree    int64               `json:"spool_free_bytes"`
	SpoolBytes   int64               `json:"spool_disk_bytes"`
	Messages     int64               `json:"spool_messages"`
}

type reasonCount struct {
	Reply string `json:"reply"`
	Count int    `json:"count"`
}

// statusJSON answers GET /api/v1/status.
func (s *Server) statusJSON(w http.ResponseWriter, r *http.Request) {
	st := status{Time: time.Now(), Hostname: s.cfg.Hostname, Messages: s.spool.Count()}
	a := s.activity
	a.mu.Lock()
	st.Received, st.Delivered, st.Deferred, st.Failed = a.received, a.delivered, a.deferred, a.failed
	for reply, n := range a.reasons {
		st.Reasons = append(st.Reasons, reasonCount{reply, n})
	}
	st.Failures = append([]failure(nil), a.failures...)
	a.mu.Unlock()
	sort.Slice(st.Reasons, func(i, j int) bool { return st.Reasons[i].Count > st.Reasons[j].Count })
	if len(st.Reasons) > 10 {
		st.Reasons = st.Reasons[:10]
	}
	store := adminStore{Spool: s.spool, sched: s.sched}
	st.Shape, st.Queue = admin.Overview(s.spool, 10)
	st.Destinations = store.Destinations()
	if len(st.Destinations) > 10 {
		st.Destinations = st.Destinations[:10]
	}
	st.SpoolFree, st.SpoolBytes = s.spool.FreeBytes(), s.spool.DiskBytes()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	json.NewEncoder(w).Encode(st)
}
