package main

import (
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mtaproject/mta/bench"
)

// TestTransactionalLaneEndToEnd: 20,000 bulk messages injected for one
// slow destination (two connections, 5 ms a reply), then one password
// reset injected as transactional: it reaches the receiver within a
// second, while the bulk backlog is still there.
func TestTransactionalLaneEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	sink := startSink(t, bench.SinkConfig{Faults: bench.Faults{Latency: 5 * time.Millisecond}})
	var bulk atomic.Int64
	arrived := make(chan time.Time, 1)
	sink.OnMessage(func(m bench.SinkMessage) {
		if len(m.To) == 1 && m.To[0] == "reset@dest.example" {
			arrived <- time.Now()
			return
		}
		bulk.Add(1)
	})
	p, token := startInjecting(t, sink, "delivery: {max_connections_per_destination: 2, initial_connections_per_destination: 2}\n")
	api := "http://" + p.API + "/api/v1/messages"
	const backlog = 20000
	for r := 0; r < backlog/10000; r++ {
		rcpts := make([]map[string]any, 10000)
		for i := range rcpts {
			rcpts[i] = map[string]any{"email": fmt.Sprintf("bulk%d-%d@dest.example", r, i)}
		}
		if code, body := postJSON(t, api, token, map[string]any{
			"message": map[string]any{"from": "news@shop.example", "subject": "News", "text": "Bulk."}, "recipients": rcpts,
		}); code != 200 {
			t.Fatalf("bulk: %d %.200s", code, body)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for bulk.Load() < 50 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	sent := time.Now()
	if code, body := postJSON(t, api, token, map[string]any{
		"message":  map[string]any{"from": "security@shop.example", "subject": "Your password reset", "text": "Code 123456"},
		"priority": "transactional", "recipients": []map[string]any{{"email": "reset@dest.example"}},
	}); code != 200 || !strings.Contains(string(body), `"accepted":1`) {
		t.Fatalf("transactional: %d %s", code, body)
	}
	select {
	case at := <-arrived:
		took, left := at.Sub(sent), backlog-bulk.Load()
		t.Logf("the transactional message arrived after %v, %d bulk messages still queued", took.Round(time.Millisecond), left)
		if took > time.Second {
			t.Errorf("the transactional message took %v behind the bulk backlog", took)
		}
		if left < backlog/2 {
			t.Errorf("only %d bulk messages left: no backlog to jump", left)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("the transactional message did not arrive within 20 s (%d bulk delivered)", bulk.Load())
	}
}
