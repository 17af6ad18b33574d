package main

import (
	"context"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/mtaproject/mta/bench"
)

var receivedID = regexp.MustCompile(` id ([0-9A-Z]{16})`)

// TestCrashDuringDeliveryDeliversEverything kills `mta serve` with SIGKILL
// while deliveries are in flight, restarts it on the same directory, and
// checks that every acknowledged message reaches the receiver at least
// once. It reports the duplicates: messages the receiver accepted whose
// completion was not yet recorded when the process died.
func TestCrashDuringDeliveryDeliversEverything(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	dns, err := bench.StartDNSStub()
	if err != nil {
		t.Fatal(err)
	}
	defer dns.Close()
	dns.SetWildcard("crash.test", bench.MX{Pref: 10, Host: "mx.crash.test"})
	dns.SetA("mx.crash.test", "127.0.0.1")
	sink, err := bench.StartSink(bench.SinkConfig{Faults: bench.Faults{Latency: time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	var mu sync.Mutex
	received := map[string]int{}
	sink.OnMessage(func(m bench.SinkMessage) {
		if sm := receivedID.FindSubmatch(m.Data); sm != nil {
			mu.Lock()
			received[string(sm[1])]++
			mu.Unlock()
		}
	})
	_, port, _ := net.SplitHostPort(sink.Addr())
	p0, _ := strconv.Atoi(port)
	cfg := fmt.Sprintf("dns: {servers: [%q], timeout: 1s, ipv6: false}\ndelivery: {port: %d, tls: none, lease: 2s, min_backoff: 1s, max_backoff: 2s}\n", dns.Addr(), p0)
	dataDir := t.TempDir()
	p := startMTA(t, dataDir, cfg)

	const total = 3000
	acked := map[string]bool{}
	killed := false
	res, _ := bench.RunLoad(context.Background(), bench.LoadConfig{
		Addr: p.SMTP, Sessions: 20, Messages: total, Pipelining: true, Seed: 5,
		// Some large enough for body files: their removal must not run
		// ahead of the records that are done with them.
		SizeDist: []bench.SizeWeight{{Size: 1024, Weight: 3}, {Size: 40_000, Weight: 1}},
		Domains:  []string{"a.crash.test", "b.crash.test", "c.crash.test"},
		Timeout:  3 * time.Second,
		OnAccepted: func(id string, _ []byte) {
			acked[id] = true
			mu.Lock()
			n := len(received)
			mu.Unlock()
			if !killed && n >= 500 {
				killed = true
				p.Kill()
			}
		},
	})
	if !killed {
		t.Fatalf("the sink received too few messages before the load ended (%d accepted)", res.Accepted)
	}
	mu.Lock()
	atKill := len(received)
	mu.Unlock()
	t.Logf("killed with %d acknowledged, %d received", len(acked), atKill)

	p2 := startMTA(t, dataDir, cfg)
	deadline := time.Now().Add(60 * time.Second)
	for {
		mu.Lock()
		missing := 0
		for id := range acked {
			if received[id] == 0 {
				missing++
			}
		}
		mu.Unlock()
		if missing == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d acknowledged messages never delivered after the restart", missing, len(acked))
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Let the spool settle, then count duplicates.
	for time.Now().Before(deadline) {
		if n, err := p2.Metric("mta_spool_messages"); err == nil && n == 0 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	mu.Lock()
	dups := 0
	for _, n := range received {
		dups += n - 1
	}
	mu.Unlock()
	t.Logf("all %d acknowledged messages delivered; %d duplicates after the crash", len(acked), dups)
	fmt.Printf("crash during delivery: %d acknowledged, all delivered at least once, %d duplicates\n", len(acked), dups)
	// A duplicate needs a delivery in flight at the kill: at most the
	// connections open then (20 per destination, 3 destinations).
	if dups > 60 {
		t.Fatalf("%d duplicates: more than the deliveries that can be in flight", dups)
	}
}
