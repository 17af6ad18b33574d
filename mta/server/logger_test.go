package server

import (
	"bytes"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta/config"
)

// countingOutput is a log destination that counts its write calls.
type countingOutput struct {
	mu     sync.Mutex
	writes int
	buf    bytes.Buffer
}

func (o *countingOutput) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.writes++
	return o.buf.Write(p)
}

func (o *countingOutput) Sync() error { return nil }

func (o *countingOutput) state() (writes int, text string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.writes, o.buf.String()
}

func testLogConfig(flush time.Duration) config.Log {
	c := config.Default().Log
	c.FlushInterval = config.Duration(flush)
	return c
}

// Lines logged together share write calls, and none is lost: a sync (as
// at shutdown) writes what waits.
func TestLogLinesShareWrites(t *testing.T) {
	out := &countingOutput{}
	log, _, err := newLogger(testLogConfig(time.Hour), out)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2000 {
		log.Info("queued", zap.Int("n", i))
	}
	if writes, _ := out.state(); writes > 5 {
		t.Errorf("2000 lines took %d writes before the sync, want a few", writes)
	}
	_ = log.Sync()
	writes, text := out.state()
	if n := strings.Count(text, `"msg":"queued"`); n != 2000 {
		t.Fatalf("%d lines written after the sync, want 2000", n)
	}
	if writes > 10 {
		t.Errorf("2000 lines took %d writes, want a few", writes)
	}
}

// A buffered line is written by the flush interval, without a sync.
func TestLogLinesWaitAtMostTheFlushInterval(t *testing.T) {
	out := &countingOutput{}
	log, _, err := newLogger(testLogConfig(50*time.Millisecond), out)
	if err != nil {
		t.Fatal(err)
	}
	log.Info("queued")
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, text := out.state(); strings.Contains(text, "queued") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the line was not written within 5 s with a 50 ms flush interval")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A warning is written at once, after the lines logged before it, also
// from a logger derived with fields.
func TestLogWarningsAreWrittenAtOnce(t *testing.T) {
	out := &countingOutput{}
	log, _, err := newLogger(testLogConfig(time.Hour), out)
	if err != nil {
		t.Fatal(err)
	}
	log.Info("first")
	log.With(zap.Int("session", 1)).Warn("second")
	_, text := out.state()
	i, j := strings.Index(text, `"msg":"first"`), strings.Index(text, `"msg":"second"`)
	if i < 0 || j < i || !strings.Contains(text, `"session":1`) {
		t.Fatalf("log after a warning:\n%s", text)
	}
	log.Debug("not at info level")
	_ = log.Sync()
	if _, text := out.state(); strings.Contains(text, "not at info level") {
		t.Error("a debug line was written at level info")
	}
}

// With log.flush_interval 0 every line is written as it is logged.
func TestLogUnbufferedWritesEachLine(t *testing.T) {
	out := &countingOutput{}
	log, _, err := newLogger(testLogConfig(0), out)
	if err != nil {
		t.Fatal(err)
	}
	log.Info("one")
	log.Info("two")
	if writes, text := out.state(); writes != 2 || !strings.Contains(text, "two") {
		t.Fatalf("%d writes, log %q; want each line written at once", writes, text)
	}
}
