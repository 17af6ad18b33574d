package bounceparse

import (
	"errors"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/mtaproject/mta/mta/dsn"
)

func crlf(s string) []byte { return []byte(strings.ReplaceAll(s, "\n", "\r\n")) }

// TestOurOwnDSN: a notice made by mta/dsn reads back with its recipient,
// action, status and the original's Message-ID.
func TestOurOwnDSN(t *testing.T) {
	orig := crlf("From: noreply@shop.example\nTo: gone@example.org\nMessage-ID: <ABC@mx.test>\nSubject: hi\n\nbody\n")
	data, _ := dsn.Build(&dsn.Report{Hostname: "mx.remote", ID: "N1", OriginalID: "ABC", Sender: "bounces+ABC=example.org@b.shop.example",
		Arrival: time.Now(), Date: time.Now(), Original: orig, MaxReturned: 1 << 20,
		Recipients: []dsn.Recipient{{Address: "gone@example.org", Action: dsn.Failed, Reply: "550 5.1.1 no such user",
			RemoteMTA: "mx.example.org", Diagnostic: "550 5.1.1 no such user"}}})
	rep, err := Parse(data, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Kind != Bounce || !rep.Standard || len(rep.Recipients) != 1 {
		t.Fatalf("%+v", rep)
	}
	r := rep.Recipients[0]
	if r.Address != "gone@example.org" || r.Action != "failed" || r.Status != "5.1.1" || !strings.Contains(r.Diagnostic, "no such user") {
		t.Errorf("recipient %+v", r)
	}
	if rep.Original.Get("Message-Id") != "<ABC@mx.test>" {
		t.Errorf("original header %v", rep.Original)
	}
}

// TestForeignDSNAndARF: a DSN as other servers write it (two recipients,
// folded diagnostic), an RFC 5965 feedback report, a non-standard bounce
// recognised by a rule, and ordinary mail that is no report.
func TestForeignDSNAndARF(t *testing.T) {
	foreign := crlf(`From: MAILER-DAEMON@mx.example.org
To: bounces+0123456789ABCDEF=example.org@b.shop.example
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

I'm sorry to have to inform you...

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org
Arrival-Date: Wed, 2 Dec 2026 10:00:00 +0000

Final-Recipient: rfc822; ann@example.org
Original-Recipient: rfc822;Ann@example.org
Action: failed
Status: 5.2.1 (mailbox disabled)
Diagnostic-Code: smtp; 550-5.2.1 The email account that you tried to reach is
 disabled.

Final-Recipient: rfc822; bob@example.org
Action: delayed
Status: 4.2.2

--B
Content-Type: text/rfc822-headers

Return-Path: <bounces+0123456789ABCDEF=example.org@b.shop.example>
Message-ID: <0123456789ABCDEF@mx.test>
From: noreply@shop.example

--B--
`)
	rep, err := Parse(foreign, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Recipients) != 2 || rep.Recipients[0].Status != "5.2.1" || rep.Recipients[0].Address != "ann@example.org" ||
		!strings.Contains(rep.Recipients[0].Diagnostic, "disabled.") || rep.Recipients[1].Action != "delayed" {
		t.Errorf("foreign DSN: %+v", rep.Recipients)
	}
	if !strings.Contains(rep.Original.Get("Return-Path"), "bounces+0123456789ABCDEF=") {
		t.Errorf("original Return-Path: %v", rep.Original)
	}

	arf := crlf(`From: feedback@provider.example
To: fbl@b.shop.example
Subject: FW: Your order
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="F"

--F
Content-Type: text/plain

This is an email abuse report.

--F
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: SomeGenerator/1.0
Version: 1
Original-Mail-From: <bounces+0123456789ABCDEF=example.org@b.shop.example>
Original-Rcpt-To: <ann@example.org>

--F
Content-Type: message/rfc822

From: noreply@shop.example
To: ann@example.org
Message-ID: <0123456789ABCDEF@mx.test>
Subject: Your order

body
--F--
`)
	rep, err = Parse(arf, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Kind != Complaint || rep.FeedbackType != "abuse" || len(rep.Recipients) != 1 || rep.Recipients[0].Address != "ann@example.org" ||
		rep.Original.Get("Message-Id") != "<0123456789ABCDEF@mx.test>" || rep.OriginalMailFrom != "bounces+0123456789ABCDEF=example.org@b.shop.example" {
		t.Errorf("ARF: %+v", rep)
	}

	plain := crlf("From: postmaster@old.example\nTo: bounces+X=example.org@b.shop.example\nSubject: failure notice\n\nSorry, I couldn't deliver to <carl@example.org>:\nUser unknown in virtual mailbox table\n")
	rep, err = Parse(plain, nil)
	if err != nil || rep.Standard || rep.Recipients[0].Status != "5.1.1" || rep.Recipients[0].Address != "carl@example.org" {
		t.Errorf("non-standard: %+v, %v", rep, err)
	}

	rules, err := ParseRules(strings.NewReader("# local wording\n5.7.1 blocked by policy\n"))
	if err != nil || len(rules) != 1 {
		t.Fatalf("rules %v, %v", rules, err)
	}
	if rep, err := Parse(crlf("From: x@y.example\nSubject: s\n\nMessage to dan@example.org blocked by policy.\n"), rules); err != nil || rep.Recipients[0].Status != "5.7.1" {
		t.Errorf("a rule from a file: %+v, %v", rep, err)
	}
	if _, err := ParseRules(strings.NewReader("5.1 bad\n")); err == nil {
		t.Error("a bad rule line was taken")
	}
	vacation := crlf("From: ann@example.org\nAuto-Submitted: auto-replied\nSubject: Out of office\n\nThe project account ann@example.org does not exist any more; I am away.\n")
	if _, err := Parse(vacation, nil); !errors.Is(err, ErrNotAReport) {
		t.Errorf("an auto-reply read as a bounce: %v", err)
	}
	b64 := crlf("From: postmaster@old.example\nSubject: failure\nMIME-Version: 1.0\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\n" +
		"VXNlciB1bmtub3duOiBlZEBleGFtcGxlLm9yZwo=\n")
	if rep, err := Parse(b64, nil); err != nil || rep.Recipients[0].Address != "ed@example.org" || rep.Recipients[0].Status != "5.1.1" {
		t.Errorf("a base64 bounce: %+v, %v", rep, err)
	}
	if _, err := Parse(crlf("From: friend@example.org\nSubject: lunch?\n\nSee you at noon.\n"), nil); !errors.Is(err, ErrNotAReport) {
		t.Errorf("ordinary mail: %v", err)
	}
}

// TestFoldedFieldsAreCapped: a report whose Diagnostic-Code is folded over
// a hundred thousand lines is read with the value capped, not grown line
// by line into megabytes (which cost time in proportion to its square).
func TestFoldedFieldsAreCapped(t *testing.T) {
	var b strings.Builder
	b.WriteString("From: MAILER-DAEMON@mx.example.org\r\nMIME-Version: 1.0\r\n" +
		"Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n" +
		"--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.org\r\n\r\n" +
		"Final-Recipient: rfc822; ann@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 no\r\n")
	for range 100000 {
		b.WriteString(" é-more words\r\n")
	}
	b.WriteString("\r\n--B--\r\n")
	rep, err := Parse([]byte(b.String()), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Recipients) != 1 || rep.Recipients[0].Address != "ann@example.org" {
		t.Fatalf("recipients %+v", rep.Recipients)
	}
	if d := rep.Recipients[0].Diagnostic; len(d) > maxFieldValue || !strings.HasPrefix(d, "550 no é-more") || !utf8.ValidString(d) {
		t.Errorf("Diagnostic of %d bytes, starting %q", len(d), d[:min(len(d), 30)])
	}
}
