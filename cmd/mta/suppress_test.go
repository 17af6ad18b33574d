package main

import (
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mtaproject/mta/bench"
)

// TestSuppressionList: a hard bounce puts the address on its tenant's
// list, and the next injection to it is refused (HTTP per recipient, SMTP
// at RCPT with 550 5.7.1) while other recipients and other tenants' mail
// go on; operators add and remove entries with the CLI, and a tenant lists
// its own over the API.
func TestSuppressionList(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	sink := startSink(t, bench.SinkConfig{Keep: true})
	p, token := startInjecting(t, sink, "")
	admin := "--admin=http://" + p.HTTP
	api := "http://" + p.API + "/api/v1/messages"
	inject := func(to ...string) []map[string]any {
		t.Helper()
		rcpts := []map[string]any{}
		for _, a := range to {
			rcpts = append(rcpts, map[string]any{"email": a})
		}
		code, body := postJSON(t, api, token, map[string]any{
			"message":    map[string]any{"from": "noreply@shop.example", "subject": "s", "text": "t"},
			"recipients": rcpts,
		})
		var res struct{ Recipients []map[string]any }
		if err := json.Unmarshal(body, &res); err != nil || code/100 == 5 {
			t.Fatalf("inject: %d %s", code, body)
		}
		return res.Recipients
	}
	refusedText := func(r map[string]any) string {
		e, _ := r["error"].(map[string]any)
		if e == nil {
			return ""
		}
		b, _ := json.Marshal(e)
		return string(b)
	}
	waitSuppressed := func(tenant, addr string) {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for {
			out := mtaCmd(t, true, "suppress", "ls", admin, "--tenant", tenant)
			if strings.Contains(out, addr) {
				if !strings.Contains(out, "bounce") || !strings.Contains(out, "550 5.1.1") {
					t.Errorf("suppress ls:\n%s", out)
				}
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s never suppressed for %s:\n%s\n%s", addr, tenant, out, p.Log())
			}
			time.Sleep(100 * time.Millisecond)
		}
	}

	// Hard bounces, one injected and one over SMTP.
	sink.SetFaults(bench.Faults{RcptPermFail: 1})
	if r := inject("gone@example.org"); refusedText(r[0]) != "" {
		t.Fatalf("first injection refused: %v", r)
	}
	sendSMTP := func(to string) error {
		c, err := smtp.Dial(p.SMTP)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.SendMail("app@example.org", []string{to}, strings.NewReader("Subject: s\r\n\r\nx\r\n"))
	}
	if err := sendSMTP("left@example.org"); err != nil {
		t.Fatal(err)
	}
	waitSuppressed("shop", "gone@example.org")
	waitSuppressed("default", "left@example.org")
	sink.SetFaults(bench.Faults{})

	r := inject("gone@example.org", "GONE@example.org", "fine@example.org")
	for i, want := range []string{`"code":550,"enhanced":"5.7.1"`, `"code":550,"enhanced":"5.7.1"`, ""} {
		if got := refusedText(r[i]); want == "" && got != "" || !strings.Contains(got, want) {
			t.Errorf("recipient %d: %s, want %q", i, got, want)
		}
	}
	if !strings.Contains(refusedText(r[0]), "suppression list") {
		t.Errorf("the refusal does not say why: %s", refusedText(r[0]))
	}
	var se *smtp.SMTPError
	if err := sendSMTP("left@example.org"); !errors.As(err, &se) || se.Code != 550 || se.EnhancedCode != (smtp.EnhancedCode{5, 7, 1}) {
		t.Errorf("SMTP to a suppressed address: %v, want 550 5.7.1", err)
	}
	if err := sendSMTP("gone@example.org"); err != nil {
		t.Errorf("SMTP mail is not the shop tenant's: %v", err)
	}

	// Operators add and remove.
	mtaCmd(t, true, "suppress", "add", "asked@example.org", "--tenant", "shop", "--reason", "asked by phone", admin)
	if r := inject("asked@example.org"); !strings.Contains(refusedText(r[0]), "5.7.1") {
		t.Errorf("after suppress add: %v", r)
	}
	if out := mtaCmd(t, true, "suppress", "rm", "asked@example.org", "--tenant", "shop", admin); !strings.Contains(out, "no longer suppressed") {
		t.Errorf("suppress rm: %q", out)
	}
	if r := inject("asked@example.org"); refusedText(r[0]) != "" {
		t.Errorf("after suppress rm: %v", r)
	}
	if out := mtaCmd(t, false, "suppress", "rm", "asked@example.org", "--tenant", "shop", admin); !strings.Contains(out, "not on the suppression list") {
		t.Errorf("removing twice: %q", out)
	}

	// A tenant sees its own list only.
	req, _ := http.NewRequest(http.MethodGet, "http://"+p.API+"/api/v1/suppressions", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var page struct {
		Suppressions []struct{ Tenant, Address, Source string }
	}
	json.NewDecoder(resp.Body).Decode(&page)
	resp.Body.Close()
	if len(page.Suppressions) != 1 || page.Suppressions[0].Address != "gone@example.org" || page.Suppressions[0].Tenant != "shop" {
		t.Errorf("the tenant's list: %+v", page)
	}
	req, _ = http.NewRequest(http.MethodGet, "http://"+p.API+"/api/v1/suppressions", nil)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 401 {
		t.Errorf("without a token: %v %v", resp.StatusCode, err)
	}
}
