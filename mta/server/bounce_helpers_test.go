package server

import (
	"strings"
	"time"

	"github.com/mtaproject/mta/bench"
)

// bounceIP is where the world's sender domain, example.org, receives the
// notices (a sink at the world's port).
const bounceIP = "127.0.0.250"

// bounces makes example.org (the sender's domain in these tests) reachable
// at a sink and returns it: every notice the server makes arrives there.
func (w *world) bounces() *bench.Sink {
	w.t.Helper()
	if s := w.sinks[bounceIP]; s != nil {
		return s
	}
	w.dns.SetA("example.org", bounceIP)
	return w.sink(bounceIP, bench.SinkConfig{})
}

// report is one notice as a test reads it: the message, and the report
// fields of each recipient by address (unfolded).
type report struct {
	data       string
	perMessage map[string]string
	rcpts      map[string]map[string]string
}

// bounceFor waits for the notice about message id and returns it.
func (w *world) bounceFor(id string, timeout time.Duration) *report {
	w.t.Helper()
	s := w.bounces()
	var found *report
	w.waitFor("the notice about "+id, timeout, func() bool {
		for _, m := range s.Messages() {
			if strings.Contains(string(m.Data), "\r\nX-Queue-ID: "+id+"\r\n") {
				found = parseReport(string(m.Data))
				return true
			}
		}
		return false
	})
	return found
}

// parseReport reads the message/delivery-status part of a notice.
func parseReport(data string) *report {
	r := &report{data: data, perMessage: map[string]string{}, rcpts: map[string]map[string]string{}}
	_, rest, ok := strings.Cut(data, "Content-Type: message/delivery-status\r\n\r\n")
	if !ok {
		_, rest, _ = strings.Cut(data, "Content-Type: message/global-delivery-status\r\n\r\n")
	}
	status, _, _ := strings.Cut(rest, "\r\n--")
	for i, block := range strings.Split(strings.TrimSpace(status), "\r\n\r\n") {
		fields := map[string]string{}
		for _, line := range strings.Split(strings.ReplaceAll(block, "\r\n ", " "), "\r\n") {
			if k, v, ok := strings.Cut(line, ": "); ok {
				fields[k] = v
			}
		}
		if i == 0 {
			r.perMessage = fields
			continue
		}
		_, addr, _ := strings.Cut(fields["Final-Recipient"], "; ")
		r.rcpts[addr] = fields
	}
	return r
}
