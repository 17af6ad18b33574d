package main

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/mtaproject/mta/bench"
	"github.com/mtaproject/mta/spool"
)

// TestCrashLosesNoAcknowledgedMessage starts `mta serve`, sends from many
// concurrent sessions, kills the process with SIGKILL in the middle,
// restarts it on the same directory, and checks that every message that
// got a 250 is in the queue, byte for byte. Half the messages are large
// enough for body files (spool.body_file_threshold), half stay in Pebble.
func TestCrashLosesNoAcknowledgedMessage(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	dataDir := t.TempDir()
	p := startMTA(t, dataDir, "")

	var mu sync.Mutex
	acked := map[string][]byte{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	killAfter := 1500
	killed := make(chan struct{})
	var once sync.Once
	loadDone := make(chan bench.LoadResult, 1)
	go func() {
		res, _ := bench.RunLoad(ctx, bench.LoadConfig{
			Addr:                 p.SMTP,
			Sessions:             50,
			Messages:             1_000_000, // far more than will be sent before the kill
			SizeDist:             []bench.SizeWeight{{Size: 2048, Weight: 1}, {Size: 60_000, Weight: 1}},
			RecipientsPerMessage: 2,
			Domains:              []string{"one.test", "two.test", "three.test"},
			Pipelining:           true,
			Timeout:              5 * time.Second,
			Seed:                 7,
			OnAccepted: func(id string, msg []byte) {
				mu.Lock()
				acked[id] = bytes.Clone(msg)
				n := len(acked)
				mu.Unlock()
				if n >= killAfter {
					once.Do(func() {
						_ = p.Cmd.Process.Signal(syscall.SIGKILL)
						close(killed)
					})
				}
			},
		})
		loadDone <- res
	}()
	select {
	case <-killed:
	case <-time.After(60 * time.Second):
		t.Fatal("never reached the kill point")
	}
	waitExit(t, p, 10*time.Second)
	cancel()
	res := <-loadDone
	mu.Lock()
	ackedCopy := make(map[string][]byte, len(acked))
	for id, b := range acked {
		ackedCopy[id] = b
	}
	mu.Unlock()
	t.Logf("killed with %d messages acknowledged (%d load errors after the kill)", len(ackedCopy), res.Errors)

	// Restart on the same directory: it must recover and serve.
	p2 := startMTA(t, dataDir, "")
	if !strings.Contains(p2.Log(), `"msg":"spool recovered"`) {
		t.Fatalf("no recovery log line:\n%s", p2.Log())
	}
	if err := p2.Stop(30 * time.Second); err != nil {
		t.Fatal(err)
	}

	// Inspect the spool as the restarted server left it.
	sp, err := spool.Open(dataDir+"/spool", spool.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	if got := sp.Count(); got < int64(len(ackedCopy)) {
		t.Fatalf("spool holds %d messages, %d were acknowledged", got, len(ackedCopy))
	}
	missing, differ, large := 0, 0, 0
	for id, want := range ackedCopy {
		if id == "" {
			t.Fatal("a 250 reply without a queue ID")
		}
		body, err := sp.Body(id)
		if err != nil {
			missing++
			if missing < 5 {
				t.Errorf("acknowledged message %s: %v", id, err)
			}
			continue
		}
		if !bytes.HasSuffix(body, want) || !bytes.HasPrefix(body, []byte("Received: from ")) {
			differ++
			if differ < 5 {
				t.Errorf("message %s differs: stored %d bytes, sent %d", id, len(body), len(want))
			}
			continue
		}
		m, err := sp.Get(id)
		if err != nil || len(m.Recipients) != 2 {
			t.Errorf("message %s record: %+v, %v", id, m, err)
		}
		if len(body) > 32<<10 {
			large++
		}
		// With two recipients our Received: header has two lines (no "for").
		if hdr := body[:len(body)-len(want)]; bytes.Count(hdr, []byte("\r\n")) != 2 {
			t.Errorf("message %s: stored bytes are not our Received: header + the message: %q", id, hdr)
		}
	}
	if missing+differ > 0 {
		t.Fatalf("%d acknowledged messages missing, %d differ, of %d", missing, differ, len(ackedCopy))
	}
	if large == 0 || large == len(ackedCopy) {
		t.Fatalf("%d of %d messages large: both kinds of storage must be tried", large, len(ackedCopy))
	}
	fmt.Printf("crash test: %d acknowledged messages all present byte for byte after SIGKILL and restart (spool holds %d)\n", len(ackedCopy), sp.Count())
}
