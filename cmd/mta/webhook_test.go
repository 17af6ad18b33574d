package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mtaproject/mta/bench"
	"github.com/mtaproject/mta/mta/webhook"
)

// hookReceiver is a webhook endpoint that checks signatures, can be
// down (503), and keeps every event by its ID.
type hookReceiver struct {
	secret string
	down   atomic.Bool
	mu     sync.Mutex
	events map[string]map[string]any
	dups   int
	bad    int
	posts  int
}

func (h *hookReceiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	h.mu.Lock()
	defer h.mu.Unlock()
	h.posts++
	if h.down.Load() {
		http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
		return
	}
	sig := r.Header.Get(webhook.SignatureHeader)
	var ts int64
	fmt.Sscanf(sig, "t=%d,", &ts)
	if sig == "" || webhook.Sign(h.secret, time.Unix(ts, 0), body) != sig {
		h.bad++
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	var batch []map[string]any
	if err := json.Unmarshal(body, &batch); err != nil {
		h.bad++
		http.Error(w, "bad JSON", http.StatusBadRequest)
		return
	}
	for _, e := range batch {
		id, _ := e["event_id"].(string)
		if _, seen := h.events[id]; seen {
			h.dups++
		}
		h.events[id] = e
	}
}

func (h *hookReceiver) snapshot() (map[string]map[string]any, int, int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make(map[string]map[string]any, len(h.events))
	for k, v := range h.events {
		out[k] = v
	}
	return out, h.dups, h.bad
}

// TestWebhookEvents: a tenant's webhook receives every event of its mail
// once, with the metadata given at injection and a valid signature, also
// the events that happened while it was down; it gets no other tenant's
// events, and the accounting log holds the same ones.
func TestWebhookEvents(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	sink := startSink(t, bench.SinkConfig{Keep: true, RcptReplies: map[string]string{"gone@example.org": "550 5.1.1 no such user"}})
	recv := &hookReceiver{secret: "whsec-0123456789abcdef", events: map[string]map[string]any{}}
	recv.down.Store(true)
	srv := httptest.NewServer(recv)
	defer srv.Close()
	dir := t.TempDir()
	secretFile := filepath.Join(dir, "hook.secret")
	os.WriteFile(secretFile, []byte(recv.secret+"\n"), 0o600)
	acctFile := filepath.Join(dir, "accounting.log")
	p, token := startInjecting(t, sink, "webhooks: [{name: shop-events, tenant: shop, url: \""+srv.URL+"/hook\", secret_file: "+secretFile+"}]\n"+
		"log: {accounting: {file: "+acctFile+"}}\n")

	const n = 20
	rcpts := []map[string]any{}
	for i := 0; i < n; i++ {
		rcpts = append(rcpts, map[string]any{"email": fmt.Sprintf("u%02d@example.org", i), "metadata": map[string]string{"user_id": fmt.Sprint(i)}})
	}
	rcpts = append(rcpts, map[string]any{"email": "gone@example.org", "metadata": map[string]string{"user_id": "gone"}})
	if code, body := postJSON(t, "http://"+p.API+"/api/v1/messages", token, map[string]any{
		"message": map[string]any{"from": "noreply@shop.example", "subject": "s", "text": "t"}, "recipients": rcpts,
		"metadata": map[string]string{"campaign": "welcome"},
	}); code != 200 {
		t.Fatalf("inject: %d %s", code, body)
	}
	// Mail of another tenant (SMTP, the default one) must not reach the hook.
	mtaSend(t, p.SMTP, "app@example.org", "other@example.org")

	waitMessages(t, sink, n+1, 15*time.Second)
	time.Sleep(1500 * time.Millisecond) // the hook is down: events wait on disk, retried with backoff
	if evs, _, _ := recv.snapshot(); len(evs) != 0 {
		t.Fatalf("%d events accepted while the hook was down", len(evs))
	}
	recv.down.Store(false)

	// Per shop recipient: reception and delivery; the bounced one: reception,
	// permanent failure; its bounce notice: one bounce event, and its own
	// delivery, which belongs to the tenant of the message it is about.
	want := 2*(n+1) + 2
	var evs map[string]map[string]any
	var dups, bad int
	deadline := time.Now().Add(60 * time.Second)
	for {
		evs, dups, bad = recv.snapshot()
		if len(evs) >= want || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	evs, dups, bad = recv.snapshot()
	if len(evs) != want || dups != 0 || bad != 0 {
		t.Fatalf("%d events (want %d), %d repeated, %d badly signed", len(evs), want, dups, bad)
	}
	kinds := map[string]int{}
	for id, e := range evs {
		kinds[e["event"].(string)]++
		if e["tenant"] != "shop" || !strings.HasPrefix(id, "shop-events-") {
			t.Errorf("event %s: %v", id, e)
		}
		md, _ := e["metadata"].(map[string]any)
		if md["campaign"] != "welcome" {
			t.Errorf("event %s lacks the request's metadata: %v", id, e)
		}
		if r, _ := e["recipient"].(string); strings.HasPrefix(r, "u") {
			var i int
			fmt.Sscanf(r, "u%02d@", &i)
			if md["user_id"] != fmt.Sprint(i) {
				t.Errorf("event %s: recipient %s with user_id %v", id, r, md["user_id"])
			}
		}
	}
	if kinds["reception"] != n+1 || kinds["delivery"] != n+1 || kinds["permanent_failure"] != 1 || kinds["bounce"] != 1 {
		t.Errorf("events by kind: %v", kinds)
	}
	// The accounting log has the same shop events.
	data, _ := os.ReadFile(acctFile)
	shop := 0
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		if strings.Contains(line, `"tenant":"shop"`) {
			shop++
		}
	}
	if shop != want {
		t.Errorf("the accounting log has %d shop events, the hook %d", shop, len(evs))
	}
	if _, metrics := httpGet(t, "http://"+p.HTTP+"/metrics"); !strings.Contains(metrics, `mta_webhook_events_delivered_total{webhook="shop-events"} `+fmt.Sprint(want)) ||
		!strings.Contains(metrics, `mta_webhook_posts_total{result="failed",webhook="shop-events"}`) {
		t.Errorf("webhook metrics:\n%s", grepLines(metrics, "mta_webhook"))
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// mtaSend sends one small message over SMTP.
func mtaSend(t *testing.T, addr, from, to string) {
	t.Helper()
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SendMail(from, []string{to}, strings.NewReader("Subject: s\r\n\r\nx\r\n")); err != nil {
		t.Fatal(err)
	}
}
