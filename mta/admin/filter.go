package admin

import (
	"errors"
	"fmt"
	"net/url"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/mtaproject/mta/spool"
)

// Filter selects queued messages for listings and bulk actions. The zero
// Filter selects every message.
type Filter struct {
	Domain    string        // a queued recipient's domain
	Sender    string        // the envelope sender: an address, "@domain", or "<>" for the null sender
	State     string        // queued (not tried yet), deferred (tried or postponed), held
	OlderThan time.Duration // received longer ago than this
	// Reply matches a queued recipient's last reply: a pattern of the
	// enhanced code ("4.7.*", "5.1.1"), or else text it contains
	// (case-insensitive).
	Reply string
}

// Empty reports whether f selects everything.
func (f Filter) Empty() bool { return f == Filter{} }

// Query renders f as URL query parameters.
func (f Filter) Query(q url.Values) {
	set := func(k, v string) {
		if v != "" {
			q.Set(k, v)
		}
	}
	set("domain", f.Domain)
	set("sender", f.Sender)
	set("state", f.State)
	if f.OlderThan > 0 {
		q.Set("older_than", f.OlderThan.String())
	}
	set("reply", f.Reply)
}

// ParseFilter reads a Filter from URL query parameters.
func ParseFilter(q url.Values) (Filter, error) {
	f := Filter{Domain: strings.ToLower(q.Get("domain")), Sender: strings.ToLower(q.Get("sender")), State: q.Get("state"), Reply: q.Get("reply")}
	switch f.State {
	case "", "queued", "deferred", "held":
	default:
		return f, fmt.Errorf("state: want queued, deferred or held, not %q", f.State)
	}
	if v := q.Get("older_than"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			return f, fmt.Errorf("older_than: not a duration (such as 30m or 24h): %q", v)
		}
		f.OlderThan = d
	}
	if _, err := path.Match(f.Reply, ""); err != nil {
		return f, errors.New("reply: malformed pattern")
	}
	return f, nil
}

// State returns the queue state of m (see spool.Message.State).
func State(m *spool.Message) string { return m.State() }

// Match reports whether f selects m at time now.
func (f Filter) Match(m *spool.Message, now time.Time) bool {
	if f.State != "" && State(m) != f.State {
		return false
	}
	if f.OlderThan > 0 && now.Sub(m.Received) < f.OlderThan {
		return false
	}
	if f.Sender != "" {
		from := strings.ToLower(m.From)
		switch {
		case f.Sender == "<>":
			if from != "" {
				return false
			}
		case strings.HasPrefix(f.Sender, "@"):
			if !strings.HasSuffix(from, f.Sender) {
				return false
			}
		case from != f.Sender:
			return false
		}
	}
	if f.Domain == "" && f.Reply == "" {
		return true
	}
	for _, r := range m.Recipients {
		if r.Status != spool.Queued {
			continue
		}
		if f.Domain != "" && r.Domain != f.Domain {
			continue
		}
		if f.Reply != "" && !replyMatches(f.Reply, r.LastReply) {
			continue
		}
		return true
	}
	return false
}

// replyMatches matches a pattern against the enhanced code of a reply
// ("451 4.7.1 text" → "4.7.1"), or looks for it in the text.
func replyMatches(pattern, reply string) bool {
	fields := strings.Fields(reply)
	if len(fields) > 1 {
		if ok, _ := path.Match(pattern, fields[1]); ok {
			return true
		}
	}
	return !strings.ContainsAny(pattern, "*?[") && strings.Contains(strings.ToLower(reply), strings.ToLower(pattern))
}

// Shape is the queue by destination domain and age, as Postfix's qshape
// shows it: for each domain, how many queued recipients wait in each age
// bucket.
type Shape struct {
	Buckets []string   `json:"buckets"` // upper bounds of the age buckets, the last open
	Total   ShapeRow   `json:"total"`
	Domains []ShapeRow `json:"domains"` // the Top largest, largest first
	Others  *ShapeRow  `json:"others,omitempty"`
}

// ShapeRow is one domain's line of a Shape.
type ShapeRow struct {
	Domain string `json:"domain"`
	Total  int    `json:"total"`
	Counts []int  `json:"counts"`
}

// shapeBuckets are qshape's: minutes, doubling.
var shapeBuckets = []time.Duration{5 * time.Minute, 10 * time.Minute, 20 * time.Minute, 40 * time.Minute,
	80 * time.Minute, 160 * time.Minute, 320 * time.Minute, 640 * time.Minute, 1280 * time.Minute}

// shaper accumulates a Shape.
type shaper struct {
	now     time.Time
	rows    map[string]*ShapeRow
	total   ShapeRow
	buckets int
}

func newShaper(now time.Time) *shaper {
	n := len(shapeBuckets) + 1
	return &shaper{now: now, rows: map[string]*ShapeRow{}, total: ShapeRow{Domain: "TOTAL", Counts: make([]int, n)}, buckets: n}
}

func (s *shaper) add(m *spool.Message) {
	age := s.now.Sub(m.Received)
	b := len(shapeBuckets)
	for i, limit := range shapeBuckets {
		if age < limit {
			b = i
			break
		}
	}
	for _, r := range m.Recipients {
		if r.Status != spool.Queued {
			continue
		}
		row := s.rows[r.Domain]
		if row == nil {
			row = &ShapeRow{Domain: r.Domain, Counts: make([]int, s.buckets)}
			s.rows[r.Domain] = row
		}
		row.Counts[b]++
		row.Total++
		s.total.Counts[b]++
		s.total.Total++
	}
}

func (s *shaper) shape(top int) Shape {
	out := Shape{Total: s.total}
	for _, b := range shapeBuckets {
		out.Buckets = append(out.Buckets, fmt.Sprintf("%dm", int(b.Minutes())))
	}
	out.Buckets = append(out.Buckets, fmt.Sprintf("%dm+", int(shapeBuckets[len(shapeBuckets)-1].Minutes())))
	rows := make([]ShapeRow, 0, len(s.rows))
	for _, r := range s.rows {
		rows = append(rows, *r)
	}
	sort.Slice(rows, func(i, j int) bool {
		if rows[i].Total != rows[j].Total {
			return rows[i].Total > rows[j].Total
		}
		return rows[i].Domain < rows[j].Domain
	})
	if len(rows) > top {
		others := ShapeRow{Domain: "(others)", Counts: make([]int, s.buckets)}
		for _, r := range rows[top:] {
			others.Total += r.Total
			for i, c := range r.Counts {
				others.Counts[i] += c
			}
		}
		out.Others = &others
		rows = rows[:top]
	}
	out.Domains = rows
	return out
}

// Lister lists the queue in ID order, as the spool does.
type Lister interface {
	List(after string, limit int) ([]*spool.Message, error)
}

// Overview returns the shape of the whole queue (the top largest
// destinations named) and its messages by state, from one scan.
func Overview(l Lister, top int) (Shape, map[string]int) {
	states := map[string]int{"queued": 0, "deferred": 0, "held": 0}
	sh, _ := shapeOf(&capped{l: l, left: overviewCap}, Filter{}, top, func(m *spool.Message) { states[State(m)]++ })
	return sh, states
}

// overviewCap bounds the messages one Overview reads: the status page asks
// every two seconds, and a queue of millions would make that a full scan.
const overviewCap = 100_000

// capped is a Lister that stops after left messages.
type capped struct {
	l    Lister
	left int
}

func (c *capped) List(after string, limit int) ([]*spool.Message, error) {
	if c.left <= 0 {
		return nil, nil
	}
	msgs, err := c.l.List(after, min(limit, c.left))
	c.left -= len(msgs)
	return msgs, err
}

func shapeOf(l Lister, f Filter, top int, each func(*spool.Message)) (Shape, error) {
	now := time.Now()
	sh := newShaper(now)
	for after := ""; ; {
		msgs, err := l.List(after, 1000)
		if err != nil {
			return Shape{}, err
		}
		for _, m := range msgs {
			after = m.ID
			if f.Match(m, now) {
				sh.add(m)
				if each != nil {
					each(m)
				}
			}
		}
		if len(msgs) < 1000 {
			break
		}
	}
	return sh.shape(top), nil
}
