package dsn

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/mtaproject/mta/internal/pytest"
	"github.com/mtaproject/mta/mta"
)

var (
	arrival = time.Date(2026, 11, 28, 9, 0, 0, 0, time.UTC)
	now     = time.Date(2026, 12, 1, 9, 30, 0, 0, time.UTC)
)

const original = "Received: from client.test ([127.0.0.1])\r\n\tby mta.test with ESMTP id 06H3ABC; Sat, 28 Nov 2026 09:00:00 +0000\r\n" +
	"From: app@example.org\r\nTo: a@remote.test, b@remote.test\r\nSubject: Your receipt\r\n" +
	"Message-ID:\r\n <receipt-42@example.org>\r\n\r\nThank you for your order.\r\n"

func failedReport() *Report {
	return &Report{
		Hostname: "mta.test", ID: "06H3DSN00000001", OriginalID: "06H3ABC00000001",
		Sender: "app@example.org", EnvID: "order 42", Arrival: arrival, Date: now,
		Original: []byte(original), MaxReturned: 100 << 10,
		Recipients: []Recipient{{
			Address: "a@remote.test", ORcptType: "rfc822", ORcpt: "A@remote.test", Action: Failed,
			Reply: "550 5.1.1 <a@remote.test>: Recipient address rejected: User unknown", RemoteMTA: "mx.remote.test",
			Diagnostic: "550 5.1.1 <a@remote.test>: Recipient address rejected: User unknown", LastAttempt: now,
		}},
	}
}

// TestFailureReadByPython: Python's email package and flufl.bounce, two
// independent readers, find every field of a failure notice.
func TestFailureReadByPython(t *testing.T) {
	py := pytest.Python(t, "email", "flufl.bounce")
	msg, eight := Build(failedReport())
	if eight {
		t.Error("an ASCII report is said to be 8-bit")
	}
	d := pytest.ReadDSN(t, py, msg)
	if !d.LinesOK || d.BareLF {
		t.Errorf("line lengths ok %v, bare LF %v", d.LinesOK, d.BareLF)
	}
	for k, want := range map[string]string{
		"From": "Mail Delivery System <MAILER-DAEMON@mta.test>", "To": "app@example.org",
		"Subject": "Undelivered Mail Returned to Sender", "Auto-Submitted": "auto-replied",
		"Message-ID": "<06H3DSN00000001@mta.test>", "In-Reply-To": "<receipt-42@example.org>",
		"References": "<receipt-42@example.org>", "Date": "Tue, 01 Dec 2026 09:30:00 +0000",
	} {
		if got := d.Headers[k]; got != want {
			t.Errorf("%s: %q, want %q", k, got, want)
		}
	}
	if d.ContentType != "multipart/report" || d.ReportType != "delivery-status" {
		t.Errorf("content type %s report-type %s", d.ContentType, d.ReportType)
	}
	if len(d.Parts) != 3 || d.Parts[0].Type != "text/plain" || d.Parts[1].Type != "message/delivery-status" || d.Parts[2].Type != "message/rfc822" {
		t.Fatalf("parts %+v", d.Parts)
	}
	if !strings.Contains(strings.Join(strings.Fields(d.Parts[0].Text), " "), "<a@remote.test>: host mx.remote.test said: 550 5.1.1 <a@remote.test>: Recipient address rejected: User unknown") {
		t.Errorf("text part does not name the recipient and quote the reply:\n%s", d.Parts[0].Text)
	}
	if d.Parts[2].Subject != "Your receipt" {
		t.Errorf("returned message subject %q", d.Parts[2].Subject)
	}
	for k, want := range map[string]string{"Reporting-MTA": "dns; mta.test", "Original-Envelope-Id": "order 42",
		"Arrival-Date": "Sat, 28 Nov 2026 09:00:00 +0000"} {
		if got := d.PerMessage[k]; got != want {
			t.Errorf("per-message %s: %q, want %q", k, got, want)
		}
	}
	if len(d.Recipients) != 1 {
		t.Fatalf("recipients %+v", d.Recipients)
	}
	for k, want := range map[string]string{"Final-Recipient": "rfc822; a@remote.test", "Original-Recipient": "rfc822; A@remote.test",
		"Action": "failed", "Status": "5.1.1", "Remote-MTA": "dns; mx.remote.test",
		"Diagnostic-Code":   "smtp; 550 5.1.1 <a@remote.test>: Recipient address rejected: User unknown",
		"Last-Attempt-Date": "Tue, 01 Dec 2026 09:30:00 +0000"} {
		if got := d.Recipients[0][k]; got != want {
			t.Errorf("recipient %s: %q, want %q", k, got, want)
		}
	}
	// flufl.bounce reports the Original-Recipient when there is one.
	if !strings.EqualFold(strings.Join(d.FluflPermanent, ","), "a@remote.test") {
		t.Errorf("flufl.bounce scan_message found %q, want a@remote.test", d.FluflPermanent)
	}
}

// TestDelayAndReturnedPart: a delay notice has Will-Retry-Until and returns
// only the header; RET=HDRS and the size cap do too; SMTPUTF8 uses the
// global types; long replies are folded under 998 octets.
func TestDelayAndReturnedPart(t *testing.T) {
	py := pytest.Python(t, "email")
	r := failedReport()
	r.Recipients[0] = Recipient{Address: "a@remote.test", Action: Delayed, Reply: "connect to mx.remote.test[192.0.2.1]:25: connection refused",
		LastAttempt: now, WillRetryUntil: arrival.Add(5 * 24 * time.Hour)}
	msg, _ := Build(r)
	d := pytest.ReadDSN(t, py, msg)
	if d.Headers["Subject"] != "Delayed Mail (still being retried)" || d.Parts[2].Type != "text/rfc822-headers" {
		t.Errorf("delay: subject %q, returned part %s", d.Headers["Subject"], d.Parts[2].Type)
	}
	rc := d.Recipients[0]
	if rc["Action"] != "delayed" || rc["Status"] != "4.0.0" || rc["Will-Retry-Until"] != "Thu, 03 Dec 2026 09:00:00 +0000" || rc["Remote-MTA"] != "" {
		t.Errorf("delay fields %+v", rc)
	}
	if !strings.Contains(d.Parts[0].Text, "could not be delivered for 3 days") {
		t.Errorf("delay text:\n%s", d.Parts[0].Text)
	}

	r = failedReport()
	r.Ret = mta.ReturnHeaders
	if d := pytest.ReadDSN(t, py, first(Build(r))); d.Parts[2].Type != "text/rfc822-headers" || strings.Contains(d.Parts[2].Text, "Thank you") ||
		!strings.Contains(d.Parts[2].Text, "Subject: Your receipt") {
		t.Errorf("RET=HDRS: %+v", d.Parts[2])
	}
	r = failedReport()
	r.MaxReturned = len(original) - 1
	if d := pytest.ReadDSN(t, py, first(Build(r))); d.Parts[2].Type != "text/rfc822-headers" {
		t.Errorf("over the cap the whole message was returned: %s", d.Parts[2].Type)
	}

	r = failedReport()
	r.SMTPUTF8 = true
	r.Recipients[0].Address = "jörg@remote.test"
	long := "550 5.7.1 " + strings.Repeat("policy ", 300) + strings.Repeat("x", 1200)
	r.Recipients[0].Reply, r.Recipients[0].Diagnostic = long, long
	msg, eight := Build(r)
	if !eight {
		t.Error("a UTF-8 report is not said to be 8-bit")
	}
	d = pytest.ReadDSN(t, py, msg)
	if !d.LinesOK || d.Parts[1].Type != "message/global-delivery-status" || d.Parts[2].Type != "message/global" {
		t.Errorf("SMTPUTF8: lines ok %v, parts %s %s", d.LinesOK, d.Parts[1].Type, d.Parts[2].Type)
	}
	if d.ReportType != "global-delivery-status" { // RFC 6522 §3: the subtype of the second part
		t.Errorf("SMTPUTF8: report-type %s", d.ReportType)
	}
	if d.Recipients[0]["Final-Recipient"] != "utf-8; jörg@remote.test" {
		t.Errorf("global Final-Recipient %q", d.Recipients[0]["Final-Recipient"])
	}
	if got := strings.Join(strings.Fields(d.Recipients[0]["Diagnostic-Code"]), ""); got != strings.Join(strings.Fields("smtp; "+long), "") {
		t.Errorf("folded Diagnostic-Code does not unfold to the reply:\n%q", got)
	}
}

func first(b []byte, _ bool) []byte { return b }

func TestStatus(t *testing.T) {
	for _, tc := range []struct {
		a     Action
		reply string
		want  string
	}{
		{Failed, "550 5.1.1 user unknown", "5.1.1"},
		{Failed, "554 no enhanced code", "5.0.0"},
		{Failed, "550 5.4.7 Delivery time expired after 5d0h0m0s; last error: 451 4.3.0 busy", "5.4.7"},
		{Failed, "no route: mail for x loops back to myself", "5.0.0"},
		{Failed, "451 4.4.1 expired while deferred", "5.4.1"}, // the class follows the action
		{Delayed, "451 4.7.1 greylisted", "4.7.1"},
		{Delayed, "connect to mx[192.0.2.1]:25: connection refused", "4.0.0"},
		{Relayed, "250 2.0.0 Ok: queued as X", "2.0.0"},
		{Failed, "550 5.1.1000 bad", "5.0.0"},
	} {
		if got := Status(tc.a, tc.reply).String(); got != tc.want {
			t.Errorf("Status(%s, %q) = %s, want %s", tc.a, tc.reply, got, tc.want)
		}
	}
}

func TestWanted(t *testing.T) {
	for _, tc := range []struct {
		n      mta.Notify
		a      Action
		wanted bool
	}{
		{0, Failed, true}, {0, Delayed, false}, {0, Relayed, false},
		{mta.NotifyNever, Failed, false},
		{mta.NotifySuccess, Failed, false}, {mta.NotifySuccess, Relayed, true}, {mta.NotifySuccess, Delivered, true},
		{mta.NotifyFailure | mta.NotifyDelay, Delayed, true}, {mta.NotifyFailure | mta.NotifyDelay, Failed, true},
		{mta.NotifyDelay, Failed, false},
	} {
		if got := Wanted(tc.n, tc.a); got != tc.wanted {
			t.Errorf("Wanted(%s, %s) = %v", tc.n, tc.a, got)
		}
	}
}

// TestHostileFieldsStayInTheirPlace: CR and LF in what the network gave us
// cannot add fields or parts.
func TestHostileFieldsStayInTheirPlace(t *testing.T) {
	r := failedReport()
	r.EnvID = "x\r\nAction: delivered"
	r.Recipients[0].Diagnostic = "550 bad\r\n\r\n--06H3DSN00000001/mta.test--\r\nInjected: yes"
	r.Original = append([]byte(original), "--06H3DSN00000001/mta.test--\r\n"...)
	msg, _ := Build(r)
	if bytes.Contains(msg, []byte("\r\nAction: delivered")) || bytes.Contains(msg, []byte("\r\n\r\nInjected")) {
		t.Fatalf("a field broke out of its line:\n%s", msg)
	}
	// The boundary is none of the lines the sender or the remote wrote.
	py := pytest.Python(t, "email")
	d := pytest.ReadDSN(t, py, msg)
	if len(d.Parts) != 3 || len(d.Recipients) != 1 || d.Recipients[0]["Action"] != "failed" || d.PerMessage["Original-Envelope-Id"] != "x  Action: delivered" {
		t.Errorf("structure changed by hostile content: parts %d, recipients %+v, per message %+v", len(d.Parts), d.Recipients, d.PerMessage)
	}
}

func TestWrap(t *testing.T) {
	for _, s := range []string{"", "short", strings.Repeat("word ", 100), strings.Repeat("x", 3000), "a " + strings.Repeat("é", 700)} {
		lines := wrap(s, maxLine)
		for _, l := range lines {
			if len(l) > 990 {
				t.Errorf("line of %d octets", len(l))
			}
		}
		if got := strings.Join(lines, ""); strings.ReplaceAll(got, " ", "") != strings.ReplaceAll(s, " ", "") {
			t.Errorf("wrap lost text of %q", s[:min(len(s), 20)])
		}
	}
}

// TestStatusPartStaysASCII: without SMTPUTF8, a remote reply in UTF-8
// keeps its words in the text part but not in the US-ASCII report, which
// must survive a 7-bit conversion.
func TestStatusPartStaysASCII(t *testing.T) {
	r := failedReport()
	r.Recipients[0].Diagnostic = "550 5.1.1 Пользователь не найден"
	r.Recipients[0].Reply = r.Recipients[0].Diagnostic
	msg, eight := Build(r)
	if !eight {
		t.Error("a report with UTF-8 text is not said to be 8-bit")
	}
	s := string(msg)
	_, status, _ := strings.Cut(s, "Content-Type: message/delivery-status\r\n\r\n")
	status, _, _ = strings.Cut(status, "\r\n--")
	if !isASCII(status) || !strings.Contains(status, "Diagnostic-Code: smtp; 550 5.1.1 ???????????? ?? ??????") {
		t.Errorf("status part:\n%s", status)
	}
	if !strings.Contains(strings.Join(strings.Fields(s), " "), "Пользователь не найден") || !strings.Contains(s, "charset=utf-8") {
		t.Error("the text part lost the reply's words")
	}
	// A cap smaller than the first header field returns no header at all.
	r = failedReport()
	r.Ret, r.MaxReturned = mta.ReturnHeaders, 10
	if msg, _ := Build(r); !strings.Contains(string(msg), "Content-Type: text/rfc822-headers\r\n\r\n\r\n--") {
		t.Errorf("tiny cap: %s", msg)
	}
}
