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

var (
	reportedID = regexp.MustCompile(`\r\nX-Queue-ID: ([0-9A-Z]{16})\r\n`)
	noticeID   = regexp.MustCompile(`^(?:[^\r]*\r\n)*?Message-ID: <([^>]+)>\r\n`)
)

// TestCrashDuringFailuresBouncesEachOnce kills `mta serve` with SIGKILL
// while a receiver refuses every recipient and bounces are being made and
// delivered, restarts it, and checks that every acknowledged message was
// bounced exactly once: one notice per message (the same notice may be
// delivered twice, as any delivery in flight at a crash may be), none
// lost, none made twice.
func TestCrashDuringFailuresBouncesEachOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	dns, err := bench.StartDNSStub()
	if err != nil {
		t.Fatal(err)
	}
	defer dns.Close()
	// The refusing receiver and the sender's server share one port on two
	// loopback addresses.
	refuser := startSink(t, bench.SinkConfig{Faults: bench.Faults{RcptPermFail: 1}})
	_, port, _ := net.SplitHostPort(refuser.Addr())
	senders, err := bench.StartSink(bench.SinkConfig{Addr: "127.0.0.2:" + port})
	if err != nil {
		t.Skipf("cannot listen on 127.0.0.2: %v", err)
	}
	defer senders.Close()
	dns.SetWildcard("refuse.test", bench.MX{Pref: 10, Host: "mx.refuse.test"})
	dns.SetA("mx.refuse.test", "127.0.0.1")
	dns.SetA("sender.test", "127.0.0.2")

	var mu sync.Mutex
	notices := map[string]map[string]int{} // original queue ID → notice Message-ID → deliveries
	senders.OnMessage(func(m bench.SinkMessage) {
		orig, id := reportedID.FindSubmatch(m.Data), noticeID.FindSubmatch(m.Data)
		if orig == nil || id == nil {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if notices[string(orig[1])] == nil {
			notices[string(orig[1])] = map[string]int{}
		}
		notices[string(orig[1])][string(id[1])]++
	})
	p0, _ := strconv.Atoi(port)
	cfg := fmt.Sprintf("dns: {servers: [%q], timeout: 1s, ipv6: false}\ndelivery: {port: %d, tls: none, lease: 2s, min_backoff: 1s, max_backoff: 2s}\nsuppression: {enabled: false}\n", dns.Addr(), p0) // the same addresses fail again and again
	dataDir := t.TempDir()
	p := startMTA(t, dataDir, cfg)

	const total = 1500
	acked := map[string]bool{}
	killed := false
	bounced := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(notices)
	}
	bench.RunLoad(context.Background(), bench.LoadConfig{
		Addr: p.SMTP, Sessions: 10, Messages: total, Size: 1024, Pipelining: true, Seed: 9,
		From: "app@sender.test", Domains: []string{"a.refuse.test", "b.refuse.test"},
		Timeout: 3 * time.Second,
		OnAccepted: func(id string, _ []byte) {
			acked[id] = true
			if !killed && bounced() >= 300 {
				killed = true
				p.Kill()
			}
		},
	})
	if !killed {
		t.Fatalf("too few bounces before the load ended (%d acknowledged, %d bounced)", len(acked), bounced())
	}
	t.Logf("killed with %d acknowledged, %d bounced", len(acked), bounced())

	p2 := startMTA(t, dataDir, cfg)
	deadline := time.Now().Add(90 * time.Second)
	for bounced() < len(acked) || !spoolEmpty(p2) {
		if time.Now().After(deadline) {
			t.Fatalf("after the restart: %d of %d acknowledged messages bounced", bounced(), len(acked))
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	redelivered := 0
	for id := range acked {
		got := notices[id]
		if len(got) != 1 {
			t.Errorf("message %s: %d different notices, want exactly 1: %v", id, len(got), got)
		}
		for _, n := range got {
			redelivered += n - 1
		}
	}
	// A message stored just before the kill may have had its 250 lost
	// with the connection: it is bounced too, and once.
	for id, got := range notices {
		if !acked[id] && len(got) != 1 {
			t.Errorf("message %s (acknowledgement lost in the kill): %d different notices: %v", id, len(got), got)
		}
	}
	t.Logf("every one of %d messages bounced once; %d notices delivered twice (in flight at the kill)", len(acked), redelivered)
}

// spoolEmpty reports whether p's spool holds no message.
func spoolEmpty(p *bench.Process) bool {
	n, err := p.Metric("mta_spool_messages")
	return err == nil && n == 0
}
