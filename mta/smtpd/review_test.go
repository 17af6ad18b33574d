package smtpd

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"
)

// A client may not hold a session for ever with commands that do nothing:
// past junkCommandLimit, each NOOP, RSET, VRFY or HELP counts as an error
// (Postfix's smtpd_junk_command_limit), and the error limit ends it.
func TestJunkCommandsEndTheSession(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	verbs := []string{"NOOP", "RSET", "VRFY x", "HELP"}
	var all strings.Builder
	for i := 0; i < junkCommandLimit+maxErrors+10; i++ {
		all.WriteString(verbs[i%len(verbs)] + "\r\n")
	}
	w.send(all.String())
	for i := 0; i < junkCommandLimit+maxErrors; i++ {
		if r := w.reply(); !strings.HasPrefix(r, "2") {
			t.Fatalf("junk command %d → %q", i+1, r)
		}
	}
	w.expect("421 4.7.0 ")
	w.expectClosed()

	// The count starts again after each message taken: a client that
	// probes a reused connection with RSET before each message (ours
	// does) is never cut off.
	w = dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	for round := 0; round < 3; round++ {
		var batch strings.Builder
		for i := 0; i < junkCommandLimit; i++ {
			batch.WriteString("RSET\r\n")
		}
		w.send(batch.String())
		for i := 0; i < junkCommandLimit; i++ {
			w.expect("250")
		}
		w.cmdExpect("MAIL FROM:<a@example.org>", "250")
		w.cmdExpect("RCPT TO:<b@remote.test>", "250")
		w.cmdExpect("DATA", "354")
		queuedID(t, w.cmd("Subject: x\r\n\r\nx\r\n."))
	}
}

// Recipients past the limit get 452 (the client sends them in another
// transaction), but a client that keeps sending them beyond an overshoot
// as large as Postfix's is disconnected.
func TestRecipientOvershootEndsTheSession(t *testing.T) {
	ts := startServer(t, nil) // at most 5 recipients
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	var all strings.Builder
	n := 5 + recipientOvershootLimit + maxErrors + 10
	for i := 0; i < n; i++ {
		fmt.Fprintf(&all, "RCPT TO:<r%d@remote.test>\r\n", i)
	}
	w.send(all.String())
	for i := 0; i < 5; i++ {
		w.expect("250")
	}
	for i := 0; i < recipientOvershootLimit+maxErrors; i++ {
		if r := w.reply(); !strings.HasPrefix(r, "452 4.5.3 ") {
			t.Fatalf("recipient %d past the limit → %q", i+1, r)
		}
	}
	w.expect("421 4.7.0 ")
	w.expectClosed()
}

// A HELO name with 8-bit bytes is not copied raw into our Received:
// header, which must stay ASCII for a message without SMTPUTF8 (RFC 5321
// §2.4, RFC 6532): an internationalized domain name goes in as its
// A-labels, other bytes as "_".
func TestEightBitHELONameStaysOutOfTheHeader(t *testing.T) {
	ts := startServer(t, nil)
	for _, tc := range []struct{ helo, want string }{
		{"\xc3\xa9t\xc3\xa9.example", "Received: from xn--t-9fab.example ("},
		{"caf\xe9.example", "Received: from caf_.example ("},
	} {
		w := dial(t, ts.addr)
		if r := w.cmd("EHLO " + tc.helo); !strings.HasPrefix(r, "250") || !isASCII(r) {
			t.Fatalf("EHLO %q → %q", tc.helo, r)
		}
		w.cmdExpect("MAIL FROM:<a@example.org>", "250")
		w.cmdExpect("RCPT TO:<b@remote.test>", "250")
		w.cmdExpect("DATA", "354")
		id := queuedID(t, w.cmd("Subject: x\r\n\r\nx\r\n."))
		b, err := ts.spool.Body(id)
		if err != nil {
			t.Fatal(err)
		}
		header, _, _ := strings.Cut(string(b), "\r\n")
		if !strings.HasPrefix(header, tc.want) || !isASCII(header) {
			t.Errorf("EHLO %q: our header begins %q, want %q", tc.helo, header, tc.want)
		}
	}
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

// The command timeout is never shorter than configured, however the
// client's commands fall against the deadline's coarse updates.
func TestCommandTimeoutIsNeverShort(t *testing.T) {
	const timeout = 2 * time.Second
	ts := startServer(t, func(o *Options) { o.CommandTimeout = timeout })
	w := dial(t, ts.addr)
	time.Sleep(timeout / 15) // within the first tenth
	start := time.Now()
	w.cmdExpect("NOOP", "250")
	w.expect("421 4.4.2 ")
	if took := time.Since(start); took < timeout {
		t.Fatalf("idle after NOOP: closed after %v, the timeout is %v", took, timeout)
	}
}

// A client that is in the middle of a transaction when the shutdown
// grace runs out is told 421 before its connection closes (RFC 5321 §3.8).
func TestShutdownTellsClientsInATransaction(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	go ts.srv.Shutdown(ctx)
	w.expect("421 4.3.2 ")
	w.expectClosed()
}

// STARTTLS inside a transaction is refused, as Postfix does: it would
// silently drop the transaction.
func TestSTARTTLSInsideATransaction(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	w.cmdExpect("STARTTLS", "503 5.5.1 ")
	w.cmdExpect("RCPT TO:<b@remote.test>", "250") // the transaction goes on
}

// Once a BDAT chunk took the message over the size limit, every further
// chunk is refused too, not acknowledged as if the message could still
// be taken.
func TestBDATChunksAfterAnOversizedOne(t *testing.T) {
	ts := startServer(t, nil) // 64 KiB at most
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	w.cmdExpect("RCPT TO:<b@remote.test>", "250")
	big := 70 << 10
	w.send(fmt.Sprintf("BDAT %d\r\n%s", big, strings.Repeat("x", big)))
	w.expect("552 5.3.4 ")
	w.send("BDAT 10\r\n0123456789")
	w.expect("552 5.3.4 ")
	w.send("BDAT 3 LAST\r\nabc")
	w.expect("552 5.3.4 ")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250") // a new transaction may begin
	if ts.spool.Count() != 0 {
		t.Fatal("stored")
	}
}

// SIZE= takes digits only (RFC 1870 §6); a size too large to represent is
// still a size over the limit.
func TestSIZEParameterSyntax(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org> SIZE=+10", "501 5.5.4 ")
	w.cmdExpect("MAIL FROM:<a@example.org> SIZE=99999999999999999999", "552 5.3.4 ")
	w.cmdExpect("MAIL FROM:<a@example.org> SIZE=100", "250")
}

// A quoted local part that needs no quotes is the bare mailbox (RFC 5322
// §3.2.4), so "alice"@ finds alice's mailbox and goes on unquoted; one
// that needs them keeps them.
func TestNeedlessQuotesAreDropped(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect(`MAIL FROM:<"a.b"@example.org>`, "250")
	w.cmdExpect(`RCPT TO:<"alice"@local.test>`, "250")
	w.cmdExpect(`RCPT TO:<"a b"@local.test>`, "250")
	w.cmdExpect(`RCPT TO:<"a..b"@local.test>`, "250")
	w.cmdExpect("DATA", "354")
	id := queuedID(t, w.cmd("Subject: x\r\n\r\nx\r\n."))
	m, _ := storedMessage(t, ts.spool, id)
	var got []string
	for _, r := range m.Recipients {
		got = append(got, r.Address)
	}
	if m.From != "a.b@example.org" || strings.Join(got, " ") != `alice@local.test "a b"@local.test "a..b"@local.test` {
		t.Fatalf("stored from %q, recipients %q", m.From, got)
	}
}

// A recipient named twice in a transaction gets the message once.
func TestDuplicateRecipientsAreKeptOnce(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	for _, rc := range []string{"<b@remote.test>", "<c@remote.test>", "<b@Remote.Test>", "<b@remote.test>", "<B@remote.test>", "<b@remote.test> NOTIFY=NEVER"} {
		w.cmdExpect("RCPT TO:"+rc, "250")
	}
	w.cmdExpect("DATA", "354")
	id := queuedID(t, w.cmd("Subject: x\r\n\r\nx\r\n."))
	m, _ := storedMessage(t, ts.spool, id)
	var got []string
	for _, r := range m.Recipients {
		got = append(got, fmt.Sprintf("%s/%d", r.Address, r.Notify))
	}
	// The local part is case-sensitive (RFC 5321 §2.4), the domain not;
	// other DSN parameters make another recipient.
	if strings.Join(got, " ") != "b@remote.test/0 c@remote.test/0 B@remote.test/0 b@remote.test/1" {
		t.Fatalf("stored recipients %v", got)
	}
}

// Repeating one recipient without end is junk: the session ends.
func TestRepeatedRecipientIsJunk(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	var all strings.Builder
	for i := 0; i < junkCommandLimit+maxErrors+10; i++ {
		all.WriteString("RCPT TO:<b@remote.test>\r\n")
	}
	w.send(all.String())
	for i := 0; i < junkCommandLimit+maxErrors+1; i++ {
		if r := w.reply(); !strings.HasPrefix(r, "250") {
			t.Fatalf("RCPT %d → %q", i+1, r)
		}
	}
	w.expect("421 4.7.0 ")
}

// Past the scan, the set: duplicates among many recipients too.
func TestDuplicatesAmongManyRecipients(t *testing.T) {
	ts := startServer(t, func(o *Options) { o.MaxRecipients = 100 })
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	var all strings.Builder
	for i := 0; i < 80; i++ {
		fmt.Fprintf(&all, "RCPT TO:<r%d@Remote.test>\r\n", i%40)
	}
	w.send(all.String())
	for i := 0; i < 80; i++ {
		w.expect("250")
	}
	w.cmdExpect("DATA", "354")
	id := queuedID(t, w.cmd("Subject: x\r\n\r\nx\r\n."))
	if m, _ := storedMessage(t, ts.spool, id); len(m.Recipients) != 40 {
		t.Fatalf("%d recipients stored, want 40", len(m.Recipients))
	}
}

// VRFY needs its argument and RSET takes none (RFC 5321 §4.1.1.5, 6).
func TestVRFYAndRSETSyntax(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("VRFY", "501 5.5.4 ")
	w.cmdExpect("VRFY someone", "252 ")
	w.cmdExpect("RSET now", "501 5.5.4 ")
	w.cmdExpect("RSET", "250 ")
}
