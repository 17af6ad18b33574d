package server

import (
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mtaproject/mta/bench"
	"github.com/mtaproject/mta/internal/pytest"
)

const receipt = "From: app@example.org\r\nTo: someone@remote.test\r\nSubject: Your receipt\r\n" +
	"Message-ID: <receipt-42@example.org>\r\n\r\nThank you for your order.\r\n"

// TestBounceOfOneRecipientOfTwo: a receiver refuses one recipient of two
// with 550 5.1.1; the sender gets exactly one notice, for that recipient,
// which Python's email package and flufl.bounce read field by field.
func TestBounceOfOneRecipientOfTwo(t *testing.T) {
	py := pytest.Python(t, "email", "flufl.bounce")
	w := newWorld(t, "", "")
	bounces := w.bounces()
	w.dns.SetA("remote.test", "127.0.0.1")
	refusal := "550 5.1.1 <unknown@remote.test>: Recipient address rejected: User unknown in virtual mailbox table"
	s := w.sink("127.0.0.1", bench.SinkConfig{RcptReplies: map[string]string{"unknown@remote.test": refusal}})
	id := w.sendDSN("app@example.org", &smtp.MailOptions{Return: smtp.DSNReturnFull, EnvelopeID: "order-42"}, []rcpt{
		{addr: "someone@remote.test"},
		{addr: "unknown@remote.test", opts: &smtp.RcptOptions{OriginalRecipientType: smtp.DSNAddressTypeRFC822, OriginalRecipient: "Unknown@Remote.test"}},
	}, receipt)
	rep := w.bounceFor(id, 15*time.Second)
	time.Sleep(300 * time.Millisecond) // a second notice would arrive now
	if got := bounces.Messages(); len(got) != 1 || got[0].From != "" || len(got[0].To) != 1 || got[0].To[0] != "app@example.org" {
		t.Fatalf("notices at the sender's server: %+v", got)
	}
	if n := len(s.Messages()); n != 1 {
		t.Errorf("the receiver got %d messages, want 1", n)
	}
	w.waitFor("the spool to empty", 5*time.Second, func() bool { return w.srv.Spool().Count() == 0 })

	d := pytest.ReadDSN(t, py, []byte(rep.data))
	if !d.LinesOK || d.BareLF {
		t.Errorf("lines: ok %v, bare LF %v", d.LinesOK, d.BareLF)
	}
	for k, want := range map[string]string{
		"From": "Mail Delivery System <MAILER-DAEMON@mta.test>", "To": "app@example.org",
		"Subject": "Undelivered Mail Returned to Sender", "Auto-Submitted": "auto-replied",
		"In-Reply-To": "<receipt-42@example.org>", "References": "<receipt-42@example.org>",
	} {
		if d.Headers[k] != want {
			t.Errorf("header %s: %q, want %q", k, d.Headers[k], want)
		}
	}
	if d.Headers["Date"] == "" || !strings.HasSuffix(d.Headers["Message-ID"], "@mta.test>") {
		t.Errorf("Date %q, Message-ID %q", d.Headers["Date"], d.Headers["Message-ID"])
	}
	if d.ContentType != "multipart/report" || d.ReportType != "delivery-status" || len(d.Parts) != 3 ||
		d.Parts[0].Type != "text/plain" || d.Parts[1].Type != "message/delivery-status" || d.Parts[2].Type != "message/rfc822" {
		t.Fatalf("structure: %s %s %+v", d.ContentType, d.ReportType, d.Parts)
	}
	if text := strings.Join(strings.Fields(d.Parts[0].Text), " "); !strings.Contains(text, "<unknown@remote.test>: host remote.test said: "+refusal) {
		t.Errorf("the text part does not quote the refusal:\n%s", d.Parts[0].Text)
	}
	if d.Parts[2].Subject != "Your receipt" {
		t.Errorf("returned message: %+v", d.Parts[2])
	}
	if d.PerMessage["Reporting-MTA"] != "dns; mta.test" || d.PerMessage["Original-Envelope-Id"] != "order-42" || d.PerMessage["Arrival-Date"] == "" {
		t.Errorf("per-message fields: %v", d.PerMessage)
	}
	if len(d.Recipients) != 1 {
		t.Fatalf("recipients in the report: %v", d.Recipients)
	}
	r := d.Recipients[0]
	for k, want := range map[string]string{
		"Final-Recipient": "rfc822; unknown@remote.test", "Original-Recipient": "rfc822; Unknown@Remote.test",
		"Action": "failed", "Status": "5.1.1", "Remote-MTA": "dns; remote.test", "Diagnostic-Code": "smtp; " + refusal,
	} {
		if r[k] != want {
			t.Errorf("%s: %q, want %q", k, r[k], want)
		}
	}
	if r["Last-Attempt-Date"] == "" {
		t.Error("no Last-Attempt-Date")
	}
	if !strings.EqualFold(strings.Join(d.FluflPermanent, ","), "unknown@remote.test") {
		t.Errorf("flufl.bounce found %v", d.FluflPermanent)
	}
}

// TestExpiryAfter4xxBounces: a receiver that keeps answering 451 makes the
// recipient expire after delivery.max_lifetime; the bounce quotes the last
// remote reply.
func TestExpiryAfter4xxBounces(t *testing.T) {
	w := newWorld(t, ", max_lifetime: 3s", "")
	w.bounces()
	w.dns.SetA("busy.test", "127.0.0.1")
	w.sink("127.0.0.1", bench.SinkConfig{Faults: bench.Faults{RcptTempFail: 1}})
	id := w.send("app@example.org", []string{"x@busy.test"}, receipt)
	rep := w.bounceFor(id, 20*time.Second)
	f := rep.rcpts["x@busy.test"]
	if f["Action"] != "failed" || f["Status"] != "5.4.7" || f["Remote-MTA"] != "dns; busy.test" || !strings.HasPrefix(f["Diagnostic-Code"], "smtp; 4") {
		t.Fatalf("expiry fields %v", f)
	}
	if !strings.Contains(rep.data, "Delivery time expired after 3s") {
		t.Errorf("text does not say the message expired:\n%s", rep.data)
	}
}

// TestNotifyVariants: NEVER gets nothing; SUCCESS gets "relayed" from a
// next hop without DSN and nothing from one with DSN (it reports itself);
// FAILURE,DELAY gets one delay warning and then the bounce.
func TestNotifyVariants(t *testing.T) {
	w := newWorld(t, ", max_lifetime: 5s", "dsn: {delay_warning: 1s}\n")
	bounces := w.bounces()
	w.dns.SetA("nodsn.test", "127.0.0.2")
	w.dns.SetA("dsn.test", "127.0.0.3")
	w.dns.SetA("slow.test", "127.0.0.4")
	w.sink("127.0.0.2", bench.SinkConfig{NoDSN: true, RcptReplies: map[string]string{"never@nodsn.test": "550 5.1.1 no such user"}})
	w.sink("127.0.0.3", bench.SinkConfig{})
	w.sink("127.0.0.4", bench.SinkConfig{Faults: bench.Faults{RcptTempFail: 1}})
	notify := func(n ...smtp.DSNNotify) *smtp.RcptOptions { return &smtp.RcptOptions{Notify: n} }
	never := w.sendDSN("app@example.org", nil, []rcpt{{"never@nodsn.test", notify(smtp.DSNNotifyNever)}}, receipt)
	relayed := w.sendDSN("app@example.org", nil, []rcpt{{"ok@nodsn.test", notify(smtp.DSNNotifySuccess)}}, receipt)
	passedOn := w.sendDSN("app@example.org", nil, []rcpt{{"ok@dsn.test", notify(smtp.DSNNotifySuccess)}}, receipt)
	delayed := w.sendDSN("app@example.org", nil, []rcpt{{"late@slow.test", notify(smtp.DSNNotifyFailure, smtp.DSNNotifyDelayed)}}, receipt)

	rep := w.bounceFor(relayed, 10*time.Second)
	if f := rep.rcpts["ok@nodsn.test"]; f["Action"] != "relayed" || f["Status"] != "2.0.0" || !strings.Contains(rep.data, "Subject: Successful Mail Delivery Report") {
		t.Errorf("relayed notice: %v", f)
	}
	w.waitFor("every message to finish", 20*time.Second, func() bool { return w.srv.Spool().Count() == 0 })
	time.Sleep(300 * time.Millisecond)
	byOriginal := map[string][]string{}
	for _, m := range bounces.Messages() {
		r := parseReport(string(m.Data))
		for _, f := range r.rcpts {
			byOriginal[r.perMessage["X-Queue-ID"]] = append(byOriginal[r.perMessage["X-Queue-ID"]], f["Action"])
		}
	}
	if got := byOriginal[never]; len(got) != 0 {
		t.Errorf("NOTIFY=NEVER got notices %v", got)
	}
	if got := byOriginal[passedOn]; len(got) != 0 {
		t.Errorf("NOTIFY=SUCCESS to a server with DSN got notices %v (that server reports the delivery)", got)
	}
	if got := strings.Join(byOriginal[delayed], ","); got != "delayed,failed" {
		t.Errorf("NOTIFY=FAILURE,DELAY got %q, want one delay warning and then the bounce", got)
	}
	for _, m := range bounces.Messages() {
		r := parseReport(string(m.Data))
		if f, ok := r.rcpts["late@slow.test"]; ok && f["Action"] == "delayed" {
			if f["Will-Retry-Until"] == "" || f["Status"][0] != '4' || !strings.Contains(r.data, "Subject: Delayed Mail (still being retried)") {
				t.Errorf("delay notice: %v", f)
			}
		}
	}
}

// TestReturnedContent: RET=HDRS returns the header, RET=FULL the message,
// and a message over dsn.max_returned_size only its header.
func TestReturnedContent(t *testing.T) {
	w := newWorld(t, "", "dsn: {max_returned_size: 2KiB}\nsuppression: {enabled: false}\n") // the same address bounces three times
	w.bounces()
	w.dns.SetA("remote.test", "127.0.0.1")
	w.sink("127.0.0.1", bench.SinkConfig{RcptReplies: map[string]string{"gone@remote.test": "550 5.1.1 gone"}})
	to := []rcpt{{addr: "gone@remote.test"}}
	big := receipt + strings.Repeat("A long receipt line.\r\n", 150)
	cases := map[string]struct {
		id, want string
	}{
		"hdrs":     {w.sendDSN("app@example.org", &smtp.MailOptions{Return: smtp.DSNReturnHeaders}, to, receipt), "text/rfc822-headers"},
		"full":     {w.sendDSN("app@example.org", &smtp.MailOptions{Return: smtp.DSNReturnFull}, to, receipt), "message/rfc822"},
		"none":     {w.sendDSN("app@example.org", nil, to, receipt), "message/rfc822"},
		"over cap": {w.sendDSN("app@example.org", &smtp.MailOptions{Return: smtp.DSNReturnFull}, to, big), "text/rfc822-headers"},
	}
	for name, c := range cases {
		rep := w.bounceFor(c.id, 15*time.Second)
		if !strings.Contains(rep.data, "Content-Type: "+c.want+"\r\n") {
			t.Errorf("%s: returned part is not %s", name, c.want)
		}
		if body := strings.Contains(rep.data, "Thank you for your order."); body != (c.want == "message/rfc822") {
			t.Errorf("%s: body returned %v", name, body)
		}
		if !strings.Contains(rep.data, "Subject: Your receipt") {
			t.Errorf("%s: the original header is missing", name)
		}
	}
}

// TestNoticesNeverLoop: mail from the null sender gets no notice; a notice
// that cannot be delivered is dropped, or sent once to dsn.postmaster, and
// the queue empties.
func TestNoticesNeverLoop(t *testing.T) {
	for _, postmaster := range []bool{false, true} {
		extra := ""
		if postmaster {
			extra = "dsn: {postmaster: postmaster@example.org}\n"
		}
		w := newWorld(t, "", extra)
		bounces := w.bounces()
		w.dns.SetA("remote.test", "127.0.0.1")
		w.sink("127.0.0.1", bench.SinkConfig{RcptReplies: map[string]string{"gone@remote.test": "550 5.1.1 gone"}})
		w.send("", []string{"gone@remote.test"}, receipt)
		fromNowhere := w.send("app@nowhere.test", []string{"gone@remote.test"}, receipt) // NXDOMAIN: its bounce fails
		w.waitFor("the queue to empty", 15*time.Second, func() bool { return w.srv.Spool().Count() == 0 })
		time.Sleep(500 * time.Millisecond)
		got := bounces.Messages()
		if !postmaster {
			if len(got) != 0 {
				t.Errorf("without dsn.postmaster, %d notices arrived, want none", len(got))
			}
			continue
		}
		if len(got) != 1 || got[0].To[0] != "postmaster@example.org" || got[0].From != "" {
			t.Fatalf("with dsn.postmaster: %d notices %+v, want one to the postmaster", len(got), got)
		}
		r := parseReport(string(got[0].Data))
		if f := r.rcpts["app@nowhere.test"]; f["Action"] != "failed" || f["Status"] != "5.1.2" {
			t.Errorf("the double bounce reports %v", r.rcpts)
		}
		if q := r.perMessage["X-Queue-ID"]; q == "" || q == fromNowhere {
			t.Errorf("the double bounce should report on the failed notice, not the original")
		}
		if w.srv.Spool().Count() != 0 {
			t.Errorf("spool not empty")
		}
	}
}

// TestDelayWarningWhileBackedOff: mail for a destination that refuses
// connections waits mostly postponed, without attempts of its own; each
// message that asked for NOTIFY=DELAY is still warned exactly once, then
// bounced at expiry.
func TestDelayWarningWhileBackedOff(t *testing.T) {
	w := newWorld(t, ", max_lifetime: 6s", "dsn: {delay_warning: 2s}\n")
	bounces := w.bounces()
	w.dns.SetA("dead.test", "127.0.0.5") // nobody listens there
	opts := &smtp.RcptOptions{Notify: []smtp.DSNNotify{smtp.DSNNotifyFailure, smtp.DSNNotifyDelayed}}
	var ids []string
	for i := 0; i < 4; i++ {
		ids = append(ids, w.sendDSN("app@example.org", nil, []rcpt{{"x@dead.test", opts}}, receipt))
	}
	w.waitFor("every message to expire", 25*time.Second, func() bool { return w.srv.Spool().Count() == 0 })
	time.Sleep(300 * time.Millisecond)
	actions := map[string][]string{}
	for _, m := range bounces.Messages() {
		r := parseReport(string(m.Data))
		actions[r.perMessage["X-Queue-ID"]] = append(actions[r.perMessage["X-Queue-ID"]], r.rcpts["x@dead.test"]["Action"])
	}
	for _, id := range ids {
		if got := strings.Join(actions[id], ","); got != "delayed,failed" {
			t.Errorf("%s: notices %q, want one delay warning, then the bounce", id, got)
		}
	}
}
