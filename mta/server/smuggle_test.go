package server

import (
	"bufio"
	"bytes"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/mtaproject/mta/bench"
)

// TestSmugglingSequencesAtTheNextHop sends every end-of-data trick of the
// public scanners (hannob/smtpsmug, SEC Consult's), each followed by a
// pipelined forged transaction, through `mta` to a receiver, and checks
// what reached that next hop: never the forged transaction as a message
// of its own, and never a bare CR or LF that a laxer server could take as
// the end of the data.
func TestSmugglingSequencesAtTheNextHop(t *testing.T) {
	w := newWorld(t, "", "")
	w.dns.SetA("remote.test", "127.0.0.2")
	next := w.sink("127.0.0.2", bench.SinkConfig{})
	endings := []struct {
		name, seq string
		ends      bool // contains <CRLF>.<CRLF>: the first message ends there
		refused   bool // NUL: refused whatever the policy
	}{
		{"lflf", "\n.\n", false, false},
		{"crcr", "\r.\r", false, false},
		{"crlf", "\r.\n", false, false},
		{"lfcr", "\n.\r", false, false},
		{"lfcrlf", "\n.\r\n", false, false},
		{"crlflf", "\r\n.\n", false, false},
		{"crcrlf", "\r.\r\n", false, false},
		{"crlfcr", "\r\n.\r", false, false},
		{"nullbefore", "\r\n\x00.\r\n", false, true},
		{"nullafter", "\r\n.\x00\r\n", false, true},
		{"crlf-dot-crcrlf", "\r\n.\r\r\n", false, false},
		{"crcrlf-dot-crcrlf", "\r\r\n.\r\r\n", false, false},
		{"crcrlf-dot-crlf", "\r\r\n.\r\n", true, false},
		{"lf-dot-crcrlf", "\n.\r\r\n", false, false},
	}
	for _, e := range endings {
		victim, forged := "victim-"+e.name+"@remote.test", "forged-"+e.name+"@remote.test"
		c, err := net.Dial("tcp", w.srv.Addr("smtp"))
		if err != nil {
			t.Fatal(err)
		}
		r := bufio.NewReader(c)
		say := func(line, want string) {
			t.Helper()
			if line != "" {
				c.Write([]byte(line + "\r\n"))
			}
			for {
				_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
				got, err := r.ReadString('\n')
				if err != nil {
					t.Fatalf("%s: %q: %v", e.name, line, err)
				}
				if len(got) < 4 || got[3] != '-' {
					if !strings.HasPrefix(got, want) {
						t.Fatalf("%s: %q → %q, want %s", e.name, line, got, want)
					}
					return
				}
			}
		}
		say("", "220")
		say("EHLO client.test", "250")
		say("MAIL FROM:<app@example.org>", "250")
		say("RCPT TO:<"+victim+">", "250")
		say("DATA", "354")
		c.Write([]byte("Subject: " + e.name + "\r\n\r\nbody" + e.seq +
			"MAIL FROM:<ceo@remote.test>\r\nRCPT TO:<" + forged + ">\r\nDATA\r\n" +
			"Subject: forged\r\n\r\nowned\r\n.\r\n"))
		// The reply to the message, then whatever else comes back until
		// the server closes or goes quiet.
		var replies bytes.Buffer
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if first, err := r.ReadString('\n'); err == nil {
			replies.WriteString(first)
		}
		_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		_, _ = replies.ReadFrom(r)
		c.Close()
		want := 1
		if e.refused {
			want = 0
		}
		w.waitFor(e.name+" delivered", 15*time.Second, func() bool { return w.srv.Spool().Count() == 0 })
		got := 0
		for _, m := range next.Messages() {
			for _, to := range m.To {
				if to == forged {
					t.Errorf("%s: the forged transaction reached the next hop as a message", e.name)
				}
				if to != victim {
					continue
				}
				got++
				if bytes.ContainsAny(bytes.ReplaceAll(m.Data, []byte("\r\n"), nil), "\r\n\x00") {
					t.Errorf("%s: the relayed message has a bare CR, LF or NUL: %q", e.name, m.Data)
				}
				if smuggledInside := bytes.Contains(m.Data, []byte("owned")); smuggledInside == e.ends {
					t.Errorf("%s: relayed %q; the data should end at the first <CRLF>.<CRLF> and only there", e.name, m.Data)
				}
			}
		}
		if got != want {
			t.Errorf("%s: %d messages for the victim at the next hop, want %d (replies %q)", e.name, got, want, replies.String())
		}
	}
}
