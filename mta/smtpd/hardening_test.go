package smtpd

import (
	"crypto/tls"
	"fmt"
	"io"
	"net/netip"
	"runtime"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/mtaproject/mta/mta"
	"time"
)

// untrusted makes loopback an outsider, so that the edge applies the
// policies meant for the open Internet.
func untrusted(o *Options) { o.Trusted = func(netip.Addr) bool { return false } }

// expectClosed checks that the server closes the connection after the
// replies already read: nothing more arrives, and the read ends in EOF.
func (w *wire) expectClosed() {
	w.t.Helper()
	_ = w.conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	rest, err := io.ReadAll(w.r)
	if err != nil {
		w.t.Fatalf("connection not closed by the server: %v (read %q)", err, rest)
	}
	if len(rest) != 0 {
		w.t.Fatalf("after the last reply the server sent %q", rest)
	}
}

func login(w *wire) {
	w.t.Helper()
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("AUTH PLAIN "+plainIR("alice", "s3cret"), "235 ")
}

// A timeout in the middle of the message data must end the session: the
// rest of the message is not read as commands (which would let the body
// of an authenticated session submit a forged message).
func TestDataTimeoutClosesTheConnection(t *testing.T) {
	forged := "MAIL FROM:<ceo@local.test>\r\nRCPT TO:<victim@local.test>\r\nDATA\r\n"
	for _, tc := range []struct {
		name  string
		start func(w *wire)
	}{
		{"DATA", func(w *wire) {
			w.cmdExpect("DATA", "354")
			w.send("Subject: first part\r\n\r\n")
		}},
		{"BDAT", func(w *wire) {
			w.send("BDAT 4000 LAST\r\nSubject: first part\r\n\r\n")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := startServer(t, func(o *Options) { untrusted(o); o.DataTimeout = 300 * time.Millisecond })
			w := dial(t, ts.addr)
			login(w)
			w.cmdExpect("MAIL FROM:<alice@example.org>", "250")
			w.cmdExpect("RCPT TO:<bob@remote.test>", "250")
			tc.start(w)
			time.Sleep(600 * time.Millisecond)
			got := w.reply()
			if !strings.HasPrefix(got, "421 4.4.2 ") || strings.Contains(got, "i/o") {
				t.Fatalf("timeout in %s → %q, want 421 4.4.2 without internal text", tc.name, got)
			}
			// Whatever the client sends now must not be executed.
			_, _ = w.conn.Write([]byte(forged + "Subject: forged\r\n\r\nx\r\n.\r\n"))
			w.expectClosed()
			if n := ts.spool.Count(); n != 0 {
				t.Fatalf("%d messages stored after a data timeout", n)
			}
		})
	}
}

// SEC Consult's endings: <CR><LF>.<CR><LF> ends the data wherever it is,
// also right after a bare CR.
func TestEndOfDataAfterABareCR(t *testing.T) {
	ts := startServer(t, untrusted)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	w.cmdExpect("RCPT TO:<b@local.test>", "250")
	w.cmdExpect("DATA", "354")
	w.send("Subject: x\r\n\r\nbad ending\r\r\n.\r\nNOOP\r\n")
	if got := w.reply(); !strings.HasPrefix(got, "550 5.6.0 ") {
		t.Fatalf("\\r\\r\\n.\\r\\n from an untrusted client → %q, want the end of data and 550 5.6.0", got)
	}
	if got := w.reply(); got != noopReply {
		t.Fatalf("the command after the end of data → %q", got)
	}
	if ts.spool.Count() != 0 {
		t.Fatal("message with a bare CR stored")
	}
}

// The checks on the client's stream hold whatever the client says before:
// a STARTTLS line inside BDAT data, a STARTTLS that was refused, or DATA
// with trailing spaces.
func TestStreamChecksCannotBeSwitchedOff(t *testing.T) {
	// ".\rX" at a line start: a bare CR that go-smtp's dot handling hid.
	const hidden = "Subject: x\r\n\r\n.\rMAIL FROM:<x@y>\r\n.\r\n"
	check := func(t *testing.T, w *wire, data string) {
		t.Helper()
		w.cmdExpect("MAIL FROM:<a@example.org>", "250")
		w.cmdExpect("RCPT TO:<b@local.test>", "250")
		w.cmdExpect(data, "354")
		w.send(hidden)
		if got := w.reply(); !strings.HasPrefix(got, "550 5.6.0 ") {
			t.Fatalf("CR after a leading dot → %q, want 550 5.6.0", got)
		}
	}
	t.Run("STARTTLS inside BDAT", func(t *testing.T) {
		ts := startServer(t, untrusted)
		w := dial(t, ts.addr)
		w.cmdExpect("EHLO client.test", "250")
		w.cmdExpect("MAIL FROM:<a@example.org>", "250")
		w.cmdExpect("RCPT TO:<b@local.test>", "250")
		body := "Subject: s\r\n\r\nSTARTTLS\r\n"
		w.send(fmt.Sprintf("BDAT %d LAST\r\n%s", len(body), body))
		queuedID(t, w.reply())
		check(t, w, "DATA")
	})
	t.Run("refused STARTTLS", func(t *testing.T) {
		ts := startServer(t, func(o *Options) { untrusted(o); o.TLS = nil })
		w := dial(t, ts.addr)
		w.cmdExpect("EHLO client.test", "250")
		w.cmdExpect("STARTTLS", "502 ")
		check(t, w, "DATA")
	})
	t.Run("DATA with trailing spaces", func(t *testing.T) {
		ts := startServer(t, untrusted)
		w := dial(t, ts.addr)
		w.cmdExpect("EHLO client.test", "250")
		check(t, w, "DATA   ")
	})
	t.Run("early data after DATA with trailing spaces", func(t *testing.T) {
		ts := startServer(t, untrusted)
		w := dial(t, ts.addr)
		w.cmdExpect("EHLO client.test", "250")
		w.cmdExpect("MAIL FROM:<a@example.org>", "250")
		w.cmdExpect("RCPT TO:<b@local.test>", "250")
		w.send("DATA  \r\nSubject: early\r\n\r\nx\r\n.\r\n")
		if got := w.reply(); !strings.HasPrefix(got, "554 5.5.0 ") {
			t.Fatalf("content before the 354 → %q, want 554 5.5.0", got)
		}
		if ts.spool.Count() != 0 {
			t.Fatal("early content stored")
		}
	})
}

func TestFailedAuthClosesTheConnection(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	for i := 0; i < 2; i++ {
		w.cmdExpect("AUTH PLAIN "+plainIR("alice", "wrong"), "535 5.7.8 ")
	}
	w.cmdExpect("AUTH PLAIN "+plainIR("alice", "wrong"), "535 5.7.8 ")
	w.expect("421 4.7.0 ")
	w.expectClosed()
}

func TestQuitAfterSTARTTLS(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("STARTTLS", "220 ")
	tc := tls.Client(w.conn, &tls.Config{InsecureSkipVerify: true})
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	tw := &wire{t: t, conn: tc, r: newReader(tc)}
	tw.cmdExpect("EHLO client.test", "250")
	tw.cmdExpect("QUIT", "221 2.0.0 ")
	_ = tc.SetReadDeadline(time.Now().Add(3 * time.Second))
	rest, err := io.ReadAll(tw.r)
	if err != nil || len(rest) != 0 {
		t.Fatalf("after 221: read %q, %v; want a clean TLS close (close_notify)", rest, err)
	}
}

func TestShutdownTellsIdleClients(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	go ts.srv.Shutdown(t.Context())
	if got := w.reply(); !strings.HasPrefix(got, "421 4.3.2 ") {
		t.Fatalf("idle client at shutdown → %q, want 421 4.3.2", got)
	}
	w.expectClosed()
}

func TestMessageOfExactlyTheMaximumSize(t *testing.T) {
	ts := startServer(t, nil) // max 64 KiB
	msg := func(size int) string {
		head := "Subject: size\r\n\r\n"
		line := strings.Repeat("x", 98) + "\r\n"
		var b strings.Builder
		b.WriteString(head)
		for b.Len()+len(line) <= size {
			b.WriteString(line)
		}
		pad := size - b.Len()
		if pad > 0 {
			b.WriteString(strings.Repeat("y", pad-2) + "\r\n")
		}
		return b.String()
	}
	max := int(ts.srv.opts.MaxMessageSize)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect(fmt.Sprintf("MAIL FROM:<a@example.org> SIZE=%d", max), "250")
	w.cmdExpect("RCPT TO:<b@local.test>", "250")
	w.cmdExpect("DATA", "354")
	m := msg(max)
	if len(m) != max {
		t.Fatalf("built %d bytes", len(m))
	}
	id := queuedID(t, w.cmd(m+"."))
	if _, body := storedMessage(t, ts.spool, id); len(body) != max {
		t.Fatalf("stored %d bytes, want %d", len(body), max)
	}
	w.cmdExpect(fmt.Sprintf("MAIL FROM:<a@example.org> SIZE=%d", max+1), "552 5.3.4 ")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	w.cmdExpect("RCPT TO:<b@local.test>", "250")
	w.cmdExpect("DATA", "354")
	w.cmdExpect(msg(max+1)+".", "552 5.3.4 ")
}

func TestPostmasterWithoutDomain(t *testing.T) {
	ts := startServer(t, untrusted)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	w.cmdExpect("RCPT TO:<Postmaster>", "250 ")
	w.cmdExpect("DATA", "354")
	id := queuedID(t, w.cmd("Subject: hello postmaster\r\n\r\nx\r\n."))
	m, _ := storedMessage(t, ts.spool, id)
	if got := m.Recipients[0].Address; got != "postmaster@local.test" {
		t.Fatalf("<Postmaster> stored as %q, want the postmaster of the first local domain", got)
	}
}

func TestSequenceErrorsAndUnknownParameters(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("MAIL FROM:<a@example.org>", "503 5.5.1 ") // before EHLO
	w.cmdExpect("HELO", "501 5.5.4 Syntax: HELO hostname") // the command the client used
	w.cmdExpect("EHLO", "501 5.5.4 Syntax: EHLO hostname")
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("RCPT TO:<b@local.test>", "503 5.5.1 ") // before MAIL
	w.cmdExpect("DATA", "503 5.5.1 ")                   // before MAIL
	w.cmdExpect("BDAT 0 LAST", "503 5.5.1 ")
	w.cmdExpect("MAIL FROM:<a@example.org> FOO=BAR", "555 5.5.4 ")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	w.cmdExpect("DATA", "503 5.5.1 ") // before RCPT
	w.cmdExpect("RCPT TO:<b@local.test> XYZZY", "555 5.5.4 ")
	w.cmdExpect("RCPT TO:<b@local.test>", "250")
	w.cmdExpect("AUTH PLAIN "+plainIR("alice", "s3cret"), "503 5.5.1 ") // inside a transaction
	w.cmdExpect("RSET", "250")
	w.cmdExpect("NOOP", "250")
}

func TestAddressesAreCheckedAtRCPT(t *testing.T) {
	ts := startServer(t, func(o *Options) { o.MaxRecipients = 100 }) // trusted: may relay anywhere
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	for _, bad := range []string{
		"<a b@remote.test>",        // space outside quotes
		"<a@remote..test>",         // empty label
		"<a@-remote.test>",         // label starts with a hyphen
		"<a@rem ote.test>",         // space in the domain
		"<a@[192.0.2.1]>",          // address literal: no route for it
		"<a@remote.test",           // no closing bracket
		"<\"unclosed@remote.test>", // unbalanced quote
		"<a\x01b@remote.test>",     // control character
		"<" + strings.Repeat("x", 250) + "@remote.test>", // path over 256
		"<@remote.test>",   // empty local part
		"<a@>",             // empty domain
		"<a.@remote.test>", // dot at the end of a dot-string
	} {
		if got := w.cmd("RCPT TO:" + bad); !strings.HasPrefix(got, "5") {
			t.Errorf("RCPT TO:%q → %q, want a 5xx refusal", bad, got)
		}
	}
	if got := w.cmd("RCPT TO:<jürgen@remote.test>"); !strings.HasPrefix(got, "553 5.6.7 ") {
		t.Errorf("non-ASCII address without SMTPUTF8 → %q, want 553 5.6.7", got)
	}
	w.cmdExpect(`RCPT TO:<"john doe"@remote.test>`, "250")
	w.cmdExpect(`RCPT TO:<"a\"b"@remote.test>`, "250")
	w.cmdExpect("RCPT TO:<@relay.test:c@remote.test>", "250") // source route: ignored
	w.cmdExpect("DATA", "354")
	id := queuedID(t, w.cmd("Subject: quotes\r\n\r\nx\r\n."))
	m, _ := storedMessage(t, ts.spool, id)
	var got []string
	for _, r := range m.Recipients {
		got = append(got, r.Address)
	}
	if want := []string{`"john doe"@remote.test`, `"a\"b"@remote.test`, "c@remote.test"}; strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("recipients stored as %q, want %q", got, want)
	}
}

func TestClientAddressBlockedAfterRepeatedAuthFailures(t *testing.T) {
	failures := NewAuthFailures(4, time.Hour)
	ts := startServer(t, func(o *Options) { o.AuthFailures = failures })
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("AUTH PLAIN "+plainIR("alice", "wrong1"), "535 ")
	w.cmdExpect("AUTH PLAIN "+plainIR("alice", "wrong2"), "535 ")
	w.cmdExpect("AUTH PLAIN "+plainIR("alice", "wrong3"), "535 ")
	w.expect("421 4.7.0 ")
	w.expectClosed()
	w = dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("AUTH PLAIN "+plainIR("alice", "wrong4"), "535 ") // the fourth: now blocked
	// The right password from a blocked address is not even checked.
	w.cmdExpect("AUTH PLAIN "+plainIR("alice", "s3cret"), "454 4.7.0 ")
	w.cmdExpect("NOOP", "250") // mail to local domains still works
	if got := failures.Blocked(); got != 1 {
		t.Fatalf("%d addresses blocked, want 1", got)
	}
	if got := testutil.ToFloat64(ts.metrics.auth.WithLabelValues("blocked")); got != 1 {
		t.Fatalf("blocked attempts metric = %v", got)
	}
	if got := testutil.ToFloat64(ts.metrics.authBlocks); got != 1 {
		t.Fatalf("blocks metric = %v", got)
	}
	// The block ends with the window.
	failures.now = func() time.Time { return time.Now().Add(2 * time.Hour) }
	w = dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("AUTH PLAIN "+plainIR("alice", "s3cret"), "235 ")
}

func TestAuthFailuresAreCountedPerIPv6Network(t *testing.T) {
	a := NewAuthFailures(2, time.Minute)
	one, two := netip.MustParseAddr("2001:db8:1:2::1"), netip.MustParseAddr("2001:db8:1:2:ffff::9")
	other := netip.MustParseAddr("2001:db8:1:3::1")
	a.fail(one)
	if !a.fail(two) || !a.blocked(one) || a.blocked(other) {
		t.Fatal("failures of one /64 are not counted together")
	}
}

func TestSubmissionGetsMissingHeaders(t *testing.T) {
	ts := startServer(t, func(o *Options) { o.AddMissingHeaders = true })
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<app@example.org>", "250")
	w.cmdExpect("RCPT TO:<b@remote.test>", "250")
	w.cmdExpect("DATA", "354")
	id := queuedID(t, w.cmd("Subject: no date, no id\r\n\r\nbody\r\n."))
	raw, _ := ts.spool.Body(id)
	if !strings.Contains(string(raw), "\r\nMessage-ID: <"+id+"@mx.test>\r\n") || !strings.Contains(string(raw), "\r\nDate: ") {
		t.Fatalf("missing headers not added: %q", raw)
	}
	// Headers already there are left alone, and not doubled.
	w.cmdExpect("MAIL FROM:<app@example.org>", "250")
	w.cmdExpect("RCPT TO:<b@remote.test>", "250")
	w.cmdExpect("DATA", "354")
	id = queuedID(t, w.cmd("Message-Id: <own@app>\r\nDATE : Tue, 1 Dec 2026 10:00:00 +0000\r\n\r\nbody\r\n."))
	raw, _ = ts.spool.Body(id)
	if strings.Count(strings.ToLower(string(raw)), "message-id") != 1 || strings.Count(strings.ToLower(string(raw)), "\ndate") != 1 {
		t.Fatalf("headers doubled: %q", raw)
	}
	// Mail from the open Internet is not changed.
	out := startServer(t, func(o *Options) { untrusted(o); o.AddMissingHeaders = true })
	w = dial(t, out.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<someone@example.org>", "250")
	w.cmdExpect("RCPT TO:<b@local.test>", "250")
	w.cmdExpect("DATA", "354")
	id = queuedID(t, w.cmd("Subject: inbound\r\n\r\nbody\r\n."))
	if _, body := storedMessage(t, out.spool, id); body != "Subject: inbound\r\n\r\nbody\r\n" {
		t.Fatalf("inbound message changed: %q", body)
	}
}

func TestAuthenticatedSenderMustBeOwned(t *testing.T) {
	ts := startServer(t, func(o *Options) { o.Auth = fixedAuth{"restricted": "pw"} })
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("AUTH PLAIN "+plainIR("restricted", "pw"), "235 ")
	w.cmdExpect("MAIL FROM:<ceo@bank.test>", "553 5.7.1 ")
	w.cmdExpect("MAIL FROM:<noreply@restricted.test>", "250")
}

// TestDataArrivingByteByByte: where the end of data and the dot-stuffing
// are found does not depend on how the stream is cut into reads.
func TestDataArrivingByteByByte(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	w.cmdExpect("RCPT TO:<b@remote.test>", "250")
	w.cmdExpect("DATA", "354")
	data := "Subject: slow\r\n\r\n..stuffed\r\n.\r\r\nline\r\n\r\n.\r\n"
	for i := 0; i < len(data); i++ {
		w.send(data[i : i+1])
		time.Sleep(2 * time.Millisecond)
	}
	id := queuedID(t, w.reply())
	if _, body := storedMessage(t, ts.spool, id); body != "Subject: slow\r\n\r\n.stuffed\r\n\r\n\r\nline\r\n\r\n" {
		t.Fatalf("stored %q", body)
	}
}

// Open-relay probes (nmap smtp-open-relay and the like) dress a remote
// address up as a local one.
func TestSenderSpecifiedRoutingIsNotRelayed(t *testing.T) {
	ts := startServer(t, untrusted)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO probe.test", "250")
	w.cmdExpect("MAIL FROM:<antispam@probe.test>", "250")
	for _, rcpt := range []string{
		"<relaytest%nmap.scanme.org@local.test>",
		"<nmap.scanme.org!relaytest@local.test>",
		`<"relaytest@nmap.scanme.org"@local.test>`,
		"<@local.test:relaytest@nmap.scanme.org>",
		"<relaytest@nmap.scanme.org>",
		`<"relaytest@nmap.scanme.org">`,
		"<relaytest@[127.0.0.1]>",
	} {
		if got := w.cmd("RCPT TO:" + rcpt); !strings.HasPrefix(got, "5") {
			t.Errorf("RCPT TO:%s from an outsider → %q", rcpt, got)
		}
	}
	w.cmdExpect("RCPT TO:<user@local.test>", "250")
}

func TestMailLoopsAreRefusedByHopCount(t *testing.T) {
	ts := startServer(t, func(o *Options) { o.MaxHops = 5 })
	send := func(hops int) string {
		w := dial(t, ts.addr)
		w.cmdExpect("EHLO client.test", "250")
		w.cmdExpect("MAIL FROM:<a@example.org>", "250")
		w.cmdExpect("RCPT TO:<b@remote.test>", "250")
		w.cmdExpect("DATA", "354")
		var b strings.Builder
		for i := 0; i < hops; i++ {
			fmt.Fprintf(&b, "Received: from hop%d.test\r\n\tby hop%d.test; Tue, 1 Dec 2026 10:00:00 +0000\r\n", i, i+1)
		}
		b.WriteString("Subject: loop\r\nX-Received: not a hop\r\n\r\nReceived: in the body, not a hop\r\n")
		return w.cmd(b.String() + ".")
	}
	queuedID(t, send(4))
	if got := send(5); got != "554 5.4.6 Too many hops" {
		t.Fatalf("a message with 5 Received: fields and a limit of 5 → %q", got)
	}
}

// A BDAT command claims its chunk's size before sending it: memory must
// follow the bytes that arrive, not the claim.
func TestBDATClaimsDoNotReserveMemory(t *testing.T) {
	ts := startServer(t, func(o *Options) { o.MaxMessageSize = 8 << 20; o.DataTimeout = 30 * time.Second })
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := 0; i < 10; i++ {
		w := dial(t, ts.addr)
		w.cmdExpect("EHLO client.test", "250")
		w.cmdExpect("MAIL FROM:<a@example.org>", "250")
		w.cmdExpect("RCPT TO:<b@local.test>", "250")
		w.send("BDAT 8000000\r\nonly a little")
	}
	time.Sleep(300 * time.Millisecond)
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	if grew := int64(after.HeapInuse) - int64(before.HeapInuse); grew > 20<<20 {
		t.Fatalf("ten BDAT claims of 8 MB with a few bytes each grew the heap by %d MB", grew>>20)
	}
}

// Lines are also ended by a bare LF, which normalisation makes CRLF: a
// message with LF line endings is not one long line.
func TestLFOnlyMessagesAreNotOneLongLine(t *testing.T) {
	body := "Subject: lf\n\n" + strings.Repeat("a short line of text\n", 500)
	send := func(ts *testServer, data string) string {
		w := dial(t, ts.addr)
		w.cmdExpect("EHLO client.test", "250")
		w.cmdExpect("MAIL FROM:<a@example.org>", "250")
		w.cmdExpect("RCPT TO:<b@local.test>", "250")
		w.cmdExpect("DATA", "354")
		return w.cmd(data + "\r\n.")
	}
	trusted := startServer(t, nil)
	queuedID(t, send(trusted, body))
	outsider := startServer(t, untrusted)
	if got := send(outsider, body); !strings.HasPrefix(got, "550 5.6.0 ") {
		t.Fatalf("LF line endings from an outsider → %q, want 550 5.6.0", got)
	}
	if got := send(trusted, "Subject: long\r\n\r\n"+strings.Repeat("x", 2000)+"\r\n"); !strings.HasPrefix(got, "554 5.6.0 ") {
		t.Fatalf("a line over the limit → %q", got)
	}
}

// Each wait has its own timeout: the data timeout does not stretch the
// command timeout after a message, nor the other way round.
func TestTimeoutsDoNotBleedIntoEachOther(t *testing.T) {
	t.Run("idle after a message", func(t *testing.T) {
		ts := startServer(t, func(o *Options) { o.CommandTimeout = 300 * time.Millisecond; o.DataTimeout = 5 * time.Second })
		w := dial(t, ts.addr)
		w.cmdExpect("EHLO client.test", "250")
		w.cmdExpect("MAIL FROM:<a@example.org>", "250")
		w.cmdExpect("RCPT TO:<b@local.test>", "250")
		w.cmdExpect("DATA", "354")
		queuedID(t, w.cmd("Subject: x\r\n\r\nx\r\n."))
		start := time.Now()
		w.expect("421 4.4.2 ")
		if took := time.Since(start); took > 2*time.Second {
			t.Fatalf("idle timeout of 300ms took %v after a message", took)
		}
	})
	t.Run("stalled in data", func(t *testing.T) {
		ts := startServer(t, func(o *Options) { o.CommandTimeout = 5 * time.Second; o.DataTimeout = 300 * time.Millisecond })
		w := dial(t, ts.addr)
		w.cmdExpect("EHLO client.test", "250")
		w.cmdExpect("MAIL FROM:<a@example.org>", "250")
		w.cmdExpect("RCPT TO:<b@local.test>", "250")
		w.cmdExpect("DATA", "354")
		start := time.Now()
		w.expect("421 4.4.2 ")
		if took := time.Since(start); took > 2*time.Second {
			t.Fatalf("data timeout of 300ms took %v", took)
		}
	})
}

// Content pipelined behind a DATA that is refused would be read as
// commands: the client is disconnected as for any early content.
func TestEarlyContentAfterARefusedDATA(t *testing.T) {
	ts := startServer(t, untrusted)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	w.cmdExpect("RCPT TO:<victim@elsewhere.test>", "554 5.7.1 ")
	w.send("DATA\r\nRCPT TO:<b@local.test>\r\nDATA\r\nSubject: x\r\n\r\nx\r\n.\r\n")
	w.expect("554 5.5.0 ") // one reply: why it is disconnected
	w.expectClosed()
	if ts.spool.Count() != 0 {
		t.Fatal("stored")
	}
}

// TestMemoryBudget: message data held by all sessions is bounded; a
// message that finds no room is read to its end and refused with 451
// 4.3.2, and goes through once room is back. Its reception and its copy
// into the spool's batch both count.
func TestMemoryBudget(t *testing.T) {
	budget := mta.NewBudget(2 << 20)
	ts := startServer(t, func(o *Options) { o.Memory = budget; o.MaxMessageSize = 900 << 10; o.MaxLineLength = 1 << 20 })
	big := "Subject: big\r\n\r\n" + strings.Repeat(strings.Repeat("z", 998)+"\r\n", 700) // about 700 KB
	open := func() *wire {
		w := dial(t, ts.addr)
		w.cmdExpect("EHLO client.test", "250")
		w.cmdExpect("MAIL FROM:<a@example.org>", "250")
		w.cmdExpect("RCPT TO:<b@local.test>", "250")
		return w
	}
	// Other messages in flight hold most of the budget.
	others := int64(1600 << 10)
	if !budget.TryAcquire(others) {
		t.Fatal("budget")
	}
	w := open()
	w.cmdExpect("DATA", "354")
	if got := w.cmd(big + "."); got != "451 4.3.2 Too much mail in progress; try again later" {
		t.Fatalf("a large message past the budget → %q", got)
	}
	w.cmdExpect("RSET", "250") // the session is in step
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	w.cmdExpect("RCPT TO:<b@local.test>", "250")
	w.send(fmt.Sprintf("BDAT %d LAST\r\n%s", len(big), big))
	if got := w.reply(); !strings.HasPrefix(got, "451 4.3.2 ") {
		t.Fatalf("BDAT past the budget → %q", got)
	}
	if used := budget.Used(); used != others {
		t.Fatalf("refused messages left %d bytes held", used-others)
	}
	budget.Release(others)
	// While a message is received, its bytes are held; afterwards none.
	w = open()
	w.cmdExpect("DATA", "354")
	w.send(big)
	time.Sleep(200 * time.Millisecond)
	if used := budget.Used(); used < 600<<10 {
		t.Fatalf("budget used %d while a 700 KB message is being received", used)
	}
	queuedID(t, w.cmd("."))
	if used := budget.Used(); used != 0 {
		t.Fatalf("budget still holds %d after the message ended", used)
	}
}
