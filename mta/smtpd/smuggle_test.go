package smtpd

import (
	"bytes"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// smugglingEndings are the malformed end-of-data sequences of the public
// smtpsmug checker (hannob/smtpsmug), plus a NUL after the dot. None of them
// may end the data.
var smugglingEndings = map[string]string{
	"lflf":       "\n.\n",
	"crcr":       "\r.\r",
	"crlf":       "\r.\n",
	"lfcr":       "\n.\r",
	"lfcrlf":     "\n.\r\n",
	"crlflf":     "\r\n.\n",
	"crcrlf":     "\r.\r\n",
	"crlfcr":     "\r\n.\r",
	"nullbefore": "\r\n\x00.\r\n",
	"nullafter":  "\r\n.\x00\r\n",
}

// smuggled is what an attacker puts after the malformed ending: a second
// transaction, which a vulnerable server runs as commands.
const smuggled = "MAIL FROM:<admin@local.test>\r\nRCPT TO:<victim@local.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nowned\r\n"

const noopReply = "250 2.0.0 Ok"

// startSmuggling sends a message that ends in a malformed end-of-data
// sequence followed by a smuggled second transaction, and checks, as
// smtpsmug does, that the server is still reading data: no reply comes.
func startSmuggling(t *testing.T, w *wire, ending string) {
	t.Helper()
	w.cmdExpect("EHLO attacker.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	w.cmdExpect("RCPT TO:<b@local.test>", "250")
	w.cmdExpect("DATA", "354")
	w.send("From: a@example.org\r\nTo: b@local.test\r\nSubject: Hello World\r\n\r\nThis is a test mail with a bad ending." + ending + smuggled)
	_ = w.conn.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if line, err := w.r.ReadString('\n'); err == nil {
		t.Fatalf("server replied %q to a malformed end of data", line)
	}
}

func TestSmugglingEndingsAreRefused(t *testing.T) {
	ts := startServer(t, func(o *Options) { o.Trusted = func(netip.Addr) bool { return false } })
	t.Run("each", func(t *testing.T) {
		for name, ending := range smugglingEndings {
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				w := dial(t, ts.addr)
				startSmuggling(t, w, ending)
				got := w.cmd("This is after a bad mail ending.\r\n.")
				if !strings.HasPrefix(got, "550 5.6.0 ") {
					t.Fatalf("proper end after %q → %q, want 550 5.6.0", ending, got)
				}
				// The smuggled commands were data: the next reply is NOOP's.
				if got := w.cmd("NOOP"); got != noopReply {
					t.Fatalf("after the message: %q", got)
				}
			})
		}
	})
	if n := ts.spool.Count(); n != 0 {
		t.Fatalf("%d messages stored from smuggling attempts", n)
	}
}

func TestSmugglingEndingsAreNormalizedForTrustedClients(t *testing.T) {
	ts := startServer(t, nil) // loopback is trusted: normalize
	for name, ending := range smugglingEndings {
		if strings.Contains(ending, "\x00") {
			continue // NUL is refused whatever the policy
		}
		t.Run(name, func(t *testing.T) {
			before := ts.spool.Count()
			w := dial(t, ts.addr)
			startSmuggling(t, w, ending)
			id := queuedID(t, w.cmd("This is after a bad mail ending.\r\n."))
			if ts.spool.Count() != before+1 {
				t.Fatalf("%d messages stored, want exactly one", ts.spool.Count()-before)
			}
			m, body := storedMessage(t, ts.spool, id)
			if len(m.Recipients) != 1 || m.Recipients[0].Address != "b@local.test" {
				t.Fatalf("recipients %+v", m.Recipients)
			}
			if !strings.Contains(body, "owned") || !strings.HasSuffix(body, "This is after a bad mail ending.\r\n") {
				t.Fatalf("smuggled text did not stay inside the one message: %q", body)
			}
			if hasBareLineEnding([]byte(body)) {
				t.Fatalf("stored body has bare line endings: %q", body)
			}
			if got := w.cmd("NOOP"); got != noopReply {
				t.Fatalf("after the message: %q", got)
			}
		})
	}
}

func TestNULIsRefusedForTrustedClientsToo(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	startSmuggling(t, w, smugglingEndings["nullbefore"])
	w.cmdExpect("x\r\n.", "550 5.6.0 Message contains NUL bytes")
}

// TestEarlyContentIsRefused is smtpsmug's "pipelining" case: content sent
// after DATA without waiting for the 354 (RFC 2920 §3.1).
func TestEarlyContentIsRefused(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	w.cmdExpect("RCPT TO:<b@local.test>", "250")
	w.cmdExpect("DATA", "354")
	w.send("Subject: one\r\n\r\nThis is mail 1/2\r\n.\r\n" +
		"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n" +
		"Subject: two\r\n\r\nThis is mail 2/2\r\n.\r\n")
	queuedID(t, w.reply())
	w.expect("250 ") // MAIL
	w.expect("250 ") // RCPT
	// DATA with content behind it: refused, and the connection closed
	// (Postfix's smtpd_forbid_unauth_pipelining).
	if got := w.reply(); got != "554 5.5.0 Error: SMTP protocol synchronization" {
		t.Fatalf("second message sent before 354 → %q", got)
	}
	w.expectClosed()
	if ts.spool.Count() != 1 {
		t.Fatalf("spool holds %d, want 1", ts.spool.Count())
	}
	w = dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	// Pipelining within the rules stays fine: MAIL, RCPT, DATA in one
	// write, content after the 354.
	w.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n")
	w.expect("250 ")
	w.expect("250 ")
	w.expect("354 ")
	queuedID(t, w.cmd("Subject: three\r\n\r\nok\r\n."))
}

func TestLineEndingChecks(t *testing.T) {
	for _, tc := range []struct {
		in   string
		bare bool
		norm string
	}{
		{"a\r\nb\r\n", false, "a\r\nb\r\n"},
		{"a\nb\r\n", true, "a\r\nb\r\n"},
		{"a\rb\r\n", true, "a\r\nb\r\n"},
		{"a\r\r\n", true, "a\r\n\r\n"},
		{"", false, ""},
	} {
		if got := hasBareLineEnding([]byte(tc.in)); got != tc.bare {
			t.Errorf("hasBareLineEnding(%q) = %v", tc.in, got)
		}
		if f := scanBody([]byte(tc.in), 1000); f.bare != tc.bare {
			t.Errorf("scanBody(%q).bare = %v", tc.in, f.bare)
		}
		var norm bytes.Buffer
		normalizeLineEndings(&norm, []byte(tc.in))
		if norm.String() != tc.norm {
			t.Errorf("normalizeLineEndings(%q) = %q, want %q", tc.in, norm.String(), tc.norm)
		}
	}
}

// TestBDATIsCheckedToo: CHUNKING (BDAT) has no 354 and no end-of-data
// marker, so its body is checked for bare line endings directly.
func TestBDATIsCheckedToo(t *testing.T) {
	ts := startServer(t, func(o *Options) { o.Trusted = func(netip.Addr) bool { return false } })
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	bdat := func(body string) string {
		w.send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@local.test>\r\n")
		w.expect("250 ")
		w.expect("250 ")
		w.send(fmt.Sprintf("BDAT %d LAST\r\n%s", len(body), body))
		return w.reply()
	}
	if got := bdat("Subject: bare\n\nsmuggled\n.\nMAIL FROM:<x@y>\n"); !strings.HasPrefix(got, "550 5.6.0") {
		t.Fatalf("BDAT with bare LF → %q", got)
	}
	queuedID(t, bdat("Subject: clean\r\n\r\nfine\r\n"))
	// A DATA message with a bare LF, then a clean BDAT: no stale verdict.
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	w.cmdExpect("RCPT TO:<b@local.test>", "250")
	w.cmdExpect("DATA", "354")
	w.cmdExpect("Subject: x\r\n\r\nbare\nline\r\n.", "550 5.6.0")
	queuedID(t, bdat("Subject: clean again\r\n\r\nfine\r\n"))
	if ts.spool.Count() != 2 {
		t.Fatalf("spool holds %d, want 2", ts.spool.Count())
	}
}
