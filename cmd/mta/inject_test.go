package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/mail"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mtaproject/mta/bench"
)

// startInjecting starts the server with the injection API for tenant
// "shop" (token returned) and every domain routed to sink.
func startInjecting(t *testing.T, sink *bench.Sink, extra string) (*bench.Process, string) {
	t.Helper()
	data := t.TempDir()
	token := "shop-token-0123456789abcdef"
	tokenFile := filepath.Join(data, "shop.token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := "dns: {servers: [\"127.0.0.1:1\"]}\nroutes: {\"*\": {hosts: [\"[" + strings.Replace(sink.Addr(), ":", "]:", 1) + "\"], tls: none}}\n" +
		"api: {tenants: [{name: shop, token_file: " + tokenFile + ", from_domains: [shop.example]}]}\n" + extra
	p := startMTA(t, data, cfg)
	if p.API == "" {
		t.Fatalf("no api address in the start line:\n%s", p.Log())
	}
	return p, token
}

func postJSON(t *testing.T, url, token string, body any) (int, []byte) {
	t.Helper()
	b, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodPost, url, bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out
}

// TestInjectThousandRecipients: one request of 1,000 recipients, each
// with its own substitutions, over the real HTTP listener: the reply names
// 1,000 queue IDs, and each receiver gets its own rendered message, once.
func TestInjectThousandRecipients(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	sink := startSink(t, bench.SinkConfig{Keep: true})
	p, token := startInjecting(t, sink, "")
	const n = 1000
	rcpts := make([]map[string]any, n)
	for i := range rcpts {
		rcpts[i] = map[string]any{"email": fmt.Sprintf("user%04d@example.org", i), "name": fmt.Sprintf("User %d", i),
			"substitutions": map[string]any{"code": fmt.Sprintf("C%04d", i)}}
	}
	code, body := postJSON(t, "http://"+p.API+"/api/v1/messages", token, map[string]any{
		"message": map[string]any{
			"from":    "Shop <noreply@shop.example>",
			"subject": "Your code is {{.code}}",
			"text":    "Hello {{.name}}, your code is {{.code}} ({{.shop}}).",
			"html":    "<p>Hello {{.name}}, your code is <b>{{.code}}</b>.</p>",
		},
		"substitutions": map[string]any{"shop": "Shop & Co"},
		"recipients":    rcpts,
	})
	if code != http.StatusOK {
		t.Fatalf("%d %s", code, body)
	}
	var res struct {
		Accepted   int
		Recipients []struct{ Email, ID string }
	}
	if err := json.Unmarshal(body, &res); err != nil || res.Accepted != n {
		t.Fatalf("reply %.300s: %v", body, err)
	}
	ids := map[string]string{}
	for _, r := range res.Recipients {
		if r.ID == "" || ids[r.ID] != "" {
			t.Fatalf("recipient %s: queue ID %q (missing or repeated)", r.Email, r.ID)
		}
		ids[r.ID] = r.Email
	}
	waitMessages(t, sink, n, 60*time.Second)
	time.Sleep(200 * time.Millisecond)
	got := sink.Messages()
	if len(got) != n {
		t.Fatalf("the sink got %d messages for %d recipients", len(got), n)
	}
	seen := map[string]bool{}
	for _, m := range got {
		if len(m.To) != 1 || m.From != "noreply@shop.example" {
			t.Fatalf("envelope %s -> %v", m.From, m.To)
		}
		to := m.To[0]
		if seen[to] {
			t.Fatalf("%s got two messages", to)
		}
		seen[to] = true
		var i int
		fmt.Sscanf(to, "user%04d@", &i)
		want := fmt.Sprintf("C%04d", i)
		msg, err := mail.ReadMessage(bytes.NewReader(m.Data))
		if err != nil {
			t.Fatalf("%s: %v", to, err)
		}
		if s := msg.Header.Get("Subject"); s != "Your code is "+want {
			t.Fatalf("%s: subject %q", to, s)
		}
		if h := msg.Header.Get("To"); h != fmt.Sprintf("\"User %d\" <%s>", i, to) {
			t.Fatalf("%s: To: %q", to, h)
		}
		_, params, _ := mime.ParseMediaType(msg.Header.Get("Content-Type"))
		mr := multipart.NewReader(msg.Body, params["boundary"])
		text, err := mr.NextPart()
		if err != nil {
			t.Fatalf("%s: %v", to, err)
		}
		tb, _ := io.ReadAll(text)
		if string(tb) != fmt.Sprintf("Hello User %d, your code is %s (Shop & Co).", i, want) {
			t.Fatalf("%s: text %q", to, tb)
		}
		html, err := mr.NextPart()
		if err != nil {
			t.Fatalf("%s: %v", to, err)
		}
		hb, _ := io.ReadAll(html)
		if !strings.Contains(string(hb), "<b>"+want+"</b>") {
			t.Fatalf("%s: html %q", to, hb)
		}
	}
	if !logHas(p, `"msg":"messages injected","tenant":"shop"`) {
		t.Errorf("no injection line in the log")
	}
}

// TestInjectRefusesUnknownLocalRecipients: a recipient of a local domain
// without a mailbox is refused in the API's reply, as at RCPT over SMTP,
// instead of being accepted and bounced to the tenant; postmaster and a
// user's address are taken.
func TestInjectRefusesUnknownLocalRecipients(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	sink := startSink(t, bench.SinkConfig{Keep: true})
	users := filepath.Join(t.TempDir(), "users")
	if err := os.WriteFile(users, []byte("alice:$2a$10$abcdefghijklmnopqrstuu5Yr7b3CkHf0tq4nIh3r3y3n2z0v6eGi::alice@local.test\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p, token := startInjecting(t, sink, "local_domains: [local.test]\nauth: {users_file: "+users+"}\n")
	code, body := postJSON(t, "http://"+p.API+"/api/v1/messages", token, map[string]any{
		"message":    map[string]any{"from": "noreply@shop.example", "subject": "s", "text": "t"},
		"recipients": []map[string]any{{"email": "nobody@local.test"}, {"email": "alice@local.test"}, {"email": "postmaster@local.test"}},
	})
	var res struct {
		Accepted   int
		Recipients []struct {
			Email string
			ID    string
			Error *struct{ Code int }
		}
	}
	if err := json.Unmarshal(body, &res); err != nil || code/100 == 5 {
		t.Fatalf("inject: %d %s", code, body)
	}
	if res.Accepted != 2 || len(res.Recipients) != 3 || res.Recipients[0].Error == nil || res.Recipients[0].Error.Code != 550 ||
		res.Recipients[1].ID == "" || res.Recipients[2].ID == "" {
		t.Fatalf("reply %s", body)
	}
}
