package main

import (
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mtaproject/mta/bench"
	"github.com/mtaproject/mta/mta/auth"
)

// TestReturnPathProcessing: injected mail with VERP return paths goes out
// with bounces+<queue-id>=<domain>@<bounce domain>; a DSN that comes back
// later to one and an ARF complaint to a fixed address are matched to
// their recipients, become async_bounce and complaint events with the
// metadata given at injection, put the addresses on the tenant's
// suppression list, and are kept in the bounce mailbox, read over POP3.
func TestReturnPathProcessing(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	sink := startSink(t, bench.SinkConfig{Keep: true})
	recv := &hookReceiver{secret: "whsec-0123456789abcdef", events: map[string]map[string]any{}}
	srv := httptest.NewServer(recv)
	defer srv.Close()
	dir := t.TempDir()
	secretFile := filepath.Join(dir, "hook.secret")
	os.WriteFile(secretFile, []byte(recv.secret+"\n"), 0o600)
	hash, _ := auth.Hash("pw")
	users := filepath.Join(dir, "users")
	os.WriteFile(users, []byte("bounces:"+hash+"::@b.shop.example\n"), 0o600)
	p, token := startInjecting(t, sink, "local_domains: [b.shop.example]\nauth: {users_file: "+users+"}\nbounces: {domain: b.shop.example}\n"+
		"webhooks: [{name: hook, tenant: shop, url: \""+srv.URL+"\", secret_file: "+secretFile+"}]\n")

	code, body := postJSON(t, "http://"+p.API+"/api/v1/messages", token, map[string]any{
		"message": map[string]any{"from": "noreply@shop.example", "subject": "s", "text": "t"}, "verp": true,
		"recipients": []map[string]any{
			{"email": "ann@example.org", "metadata": map[string]string{"user": "ann"}},
			{"email": "bob@example.net", "metadata": map[string]string{"user": "bob"}},
		},
	})
	if code != 200 {
		t.Fatalf("inject: %d %s", code, body)
	}
	var res struct{ Recipients []struct{ Email, ID string } }
	json.Unmarshal(body, &res)
	annID, bobID := res.Recipients[0].ID, res.Recipients[1].ID
	waitMessages(t, sink, 2, 10*time.Second)
	verp := map[string]string{}
	for _, m := range sink.Messages() {
		verp[m.To[0]] = m.From
	}
	if !regexp.MustCompile(`^bounces\+`+annID+`-[0-9a-f]{8}=example\.org@b\.shop\.example$`).MatchString(verp["ann@example.org"]) ||
		!regexp.MustCompile(`^bounces\+`+bobID+`-[0-9a-f]{8}=example\.net@b\.shop\.example$`).MatchString(verp["bob@example.net"]) {
		t.Fatalf("return paths %v (IDs %s %s)", verp, annID, bobID)
	}

	send := func(to, msg string) {
		t.Helper()
		c, err := smtp.Dial(p.SMTP)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.SendMail("", []string{to}, strings.NewReader(strings.ReplaceAll(msg, "\n", "\r\n"))); err != nil {
			t.Fatalf("sending to %s: %v", to, err)
		}
	}
	send(verp["ann@example.org"], fmt.Sprintf(`From: MAILER-DAEMON@mx.example.org
To: %s
Subject: Delivery Status Notification (Failure)
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

The account ann@example.org does not exist.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org

Final-Recipient: rfc822; ann@example.org
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 The account does not exist

--B--
`, verp["ann@example.org"]))
	send("fbl@b.shop.example", fmt.Sprintf(`From: fbl@provider.example
To: fbl@b.shop.example
Subject: complaint
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="F"

--F
Content-Type: text/plain

A user marked this message as spam.

--F
Content-Type: message/feedback-report

Feedback-Type: abuse
Version: 1
Original-Mail-From: <%s>
Original-Rcpt-To: <bob@example.net>

--F
Content-Type: text/rfc822-headers

From: noreply@shop.example
Subject: s

--F--
`, verp["bob@example.net"]))
	// A forged bounce: bob's queue ID with a made-up token.
	send("bounces+"+bobID+"-deadbeef=example.net@b.shop.example", "From: x@example.org\nSubject: Undeliverable\n\nUser unknown: bob@example.net\n")

	kinds := func() map[string]map[string]any {
		evs, _, _ := recv.snapshot()
		out := map[string]map[string]any{}
		for _, e := range evs {
			if k := e["event"].(string); k == "async_bounce" || k == "complaint" {
				out[k] = e
			}
		}
		return out
	}
	deadline := time.Now().Add(15 * time.Second)
	for len(kinds()) < 2 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	got := kinds()
	b, c := got["async_bounce"], got["complaint"]
	if b == nil || b["id"] != annID || b["recipient"] != "ann@example.org" || b["enhanced"] != "5.1.1" || b["metadata"].(map[string]any)["user"] != "ann" {
		t.Errorf("async bounce event: %v", b)
	}
	if c == nil || c["id"] != bobID || c["recipient"] != "bob@example.net" || c["reply"] != "abuse" || c["metadata"].(map[string]any)["user"] != "bob" {
		t.Errorf("complaint event: %v", c)
	}
	out := mtaCmd(t, true, "suppress", "ls", "--tenant", "shop", "--admin=http://"+p.HTTP)
	if !regexp.MustCompile(`ann@example\.org +bounce`).MatchString(out) || !regexp.MustCompile(`bob@example\.net +complaint`).MatchString(out) {
		t.Errorf("suppression list (ann by the bounce, bob by the complaint, not the forgery):\n%s", out)
	}
	_, metrics := httpGet(t, "http://"+p.HTTP+"/metrics")
	for _, want := range []string{`mta_return_path_reports_total{result="bounce"} 1`, `mta_return_path_reports_total{result="complaint"} 1`, `mta_return_path_reports_total{result="unmatched"} 1`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("no %s in\n%s", want, grepLines(metrics, "mta_return_path"))
		}
	}
	// The reports are kept in the bounce mailbox.
	deadline = time.Now().Add(10 * time.Second)
	var stat []string
	for time.Now().Before(deadline) {
		stat = pop3Session(t, p.POP3, "bounces", "pw", "STAT")
		if strings.HasPrefix(stat[1], "+OK 3 ") {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !strings.HasPrefix(stat[1], "+OK 3 ") {
		t.Errorf("bounce mailbox: %v, want the 3 reports", stat)
	}
}

// TestReturnPathTrustsOnlyBounces: mail at the bounce domain that is not
// a bounce of ours about the address we sent to suppresses nobody: a
// "not-spam" feedback report, an out-of-office reply whose text reads like
// a bounce, a DSN from a sender (bounces come from <>), a DSN about a
// failed forward (another Final-Recipient), a DSN to several return paths
// at once. And a real bounce that comes when the bounce mailbox is full
// is still read: nothing refuses a report.
func TestReturnPathTrustsOnlyBounces(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	sink := startSink(t, bench.SinkConfig{Keep: true})
	dir := t.TempDir()
	hash, _ := auth.Hash("pw")
	users := filepath.Join(dir, "users")
	os.WriteFile(users, []byte("bounces:"+hash+"::@b.shop.example\n"), 0o600)
	p, token := startInjecting(t, sink, "local_domains: [b.shop.example]\nauth: {users_file: "+users+"}\nbounces: {domain: b.shop.example}\nmailboxes: {quota: 3KiB}\n")
	names := []string{"carol", "dave", "erin", "fred", "gina", "hank"}
	var rcpts []map[string]any
	for _, n := range names {
		rcpts = append(rcpts, map[string]any{"email": n + "@example.org"})
	}
	if code, body := postJSON(t, "http://"+p.API+"/api/v1/messages", token, map[string]any{
		"message": map[string]any{"from": "noreply@shop.example", "subject": "s", "text": "t"}, "verp": true, "recipients": rcpts,
	}); code != 200 {
		t.Fatalf("inject: %d %s", code, body)
	}
	waitMessages(t, sink, len(names), 10*time.Second)
	verp := map[string]string{}
	for _, m := range sink.Messages() {
		verp[strings.TrimSuffix(m.To[0], "@example.org")] = m.From
	}
	send := func(from string, to []string, msg string) {
		t.Helper()
		c, err := smtp.Dial(p.SMTP)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.SendMail(from, to, strings.NewReader(strings.ReplaceAll(msg, "\n", "\r\n"))); err != nil {
			t.Fatalf("sending to %v: %v", to, err)
		}
	}
	dsn := func(to, final string) string {
		return fmt.Sprintf("From: MAILER-DAEMON@mx.example.org\nTo: %s\nSubject: failure\nMIME-Version: 1.0\n"+
			"Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\n\n--B\nContent-Type: text/plain\n\nFailed.\n"+
			"%s\n--B\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example.org\n\n"+
			"Original-Recipient: rfc822;%s\nFinal-Recipient: rfc822; %s\nAction: failed\nStatus: 5.1.1\nDiagnostic-Code: smtp; 550 5.1.1 no such user\n\n--B--\n",
			to, strings.Repeat("padding line of a long report\n", 40), strings.Split(strings.Split(final, ".forwarded")[0], "@")[0]+"@example.org", final)
	}
	send("fbl@provider.example", []string{"fbl@b.shop.example"}, fmt.Sprintf("From: fbl@provider.example\nTo: fbl@b.shop.example\nSubject: not spam\n"+
		"MIME-Version: 1.0\nContent-Type: multipart/report; report-type=feedback-report; boundary=\"F\"\n\n--F\nContent-Type: text/plain\n\nx\n\n"+
		"--F\nContent-Type: message/feedback-report\n\nFeedback-Type: not-spam\nVersion: 1\nOriginal-Mail-From: <%s>\nOriginal-Rcpt-To: <carol@example.org>\n\n--F--\n", verp["carol"]))
	send("", []string{verp["dave"]}, "From: dave@example.org\nTo: "+verp["dave"]+"\nAuto-Submitted: auto-generated\nX-Autoreply: yes\nSubject: Out of office\n\n"+
		"I am away. The old queue does not exist any more: dave@example.org\n")
	send("random@attacker.test", []string{verp["erin"]}, dsn(verp["erin"], "erin@example.org"))
	send("", []string{verp["fred"]}, dsn(verp["fred"], "fred.forwarded@elsewhere.test"))
	send("", []string{verp["gina"], "bounces+0123456789ABCDEF-deadbeef=example.org@b.shop.example"}, dsn(verp["gina"], "gina@example.org"))
	// By now the mailbox is over its 3 KiB: hank's real bounce is read all the same.
	send("", []string{verp["hank"]}, dsn(verp["hank"], "hank@example.org"))

	deadline := time.Now().Add(10 * time.Second)
	var out string
	for time.Now().Before(deadline) {
		if out = mtaCmd(t, true, "suppress", "ls", "--tenant", "shop", "--admin=http://"+p.HTTP); strings.Contains(out, "hank@") {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !regexp.MustCompile(`hank@example\.org +bounce`).MatchString(out) {
		t.Errorf("hank's bounce, with the bounce mailbox full, was not read:\n%s", out)
	}
	for _, n := range names[:5] {
		if strings.Contains(out, n+"@") {
			t.Errorf("%s suppressed by mail that is no bounce of ours about them:\n%s", n, out)
		}
	}
}
