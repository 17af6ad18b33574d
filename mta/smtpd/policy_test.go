package smtpd

import (
	"github.com/mtaproject/mta/mta"
	"net"
	"strings"
	"testing"
)

// TestSetPolicyAppliesToNewSessions: a reload's new limits hold for
// sessions that connect afterwards; a session already open keeps what its
// EHLO advertised. Lowered connection limits refuse the next connection
// and leave the open ones alone.
func TestSetPolicyAppliesToNewSessions(t *testing.T) {
	ts := startServer(t, nil)
	before := dial(t, ts.addr)
	if ehlo := before.cmdExpect("EHLO client.test", "250"); !strings.Contains(ehlo, "SIZE 65536") {
		t.Fatalf("EHLO before the change: %q", ehlo)
	}
	pol := ts.srv.policy.Load()
	lowered := *pol
	lowered.MaxMessageSize = 1000
	lowered.MaxRecipients = 1
	ts.srv.SetPolicy(lowered)

	after := dial(t, ts.addr)
	if ehlo := after.cmdExpect("EHLO client.test", "250"); !strings.Contains(ehlo, "SIZE 1000\n") {
		t.Fatalf("EHLO after the change: %q", ehlo)
	}
	after.cmdExpect("MAIL FROM:<a@example.org> SIZE=2000", "552 5.3.4")
	after.cmdExpect("MAIL FROM:<a@example.org>", "250")
	after.cmdExpect("RCPT TO:<one@remote.test>", "250")
	after.cmdExpect("RCPT TO:<two@remote.test>", "452 4.5.3")

	// The session opened before keeps its limits to its end.
	before.cmdExpect("MAIL FROM:<a@example.org> SIZE=2000", "250")
	before.cmdExpect("RCPT TO:<one@remote.test>", "250")
	before.cmdExpect("RCPT TO:<two@remote.test>", "250")

	ts.srv.opts.Limits.SetMax(2, 2)
	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	over := &wire{t: t, conn: c, r: newReader(c)}
	over.expect("421 4.3.2 Too many connections")
	c.Close()
	before.cmdExpect("NOOP", "250")
	after.cmdExpect("NOOP", "250")
}

// TestMTPriority: MT-PRIORITY above 0 (RFC 6710) from a trusted client
// puts the message in the transactional lane; 0 and below leave it bulk;
// a value outside -9..9 is a syntax error.
func TestMTPriority(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	for _, c := range []struct {
		param string
		want  mta.Priority
	}{{"MT-PRIORITY=5", mta.PriorityTransactional}, {"MT-PRIORITY=0", mta.PriorityBulk}, {"MT-PRIORITY=-3", mta.PriorityBulk}} {
		w.cmdExpect("MAIL FROM:<a@example.org> "+c.param, "250")
		w.cmdExpect("RCPT TO:<r@remote.test>", "250")
		w.cmdExpect("DATA", "354")
		id := queuedID(t, w.cmdExpect("Subject: p\r\n\r\nx\r\n.", "250"))
		if m, _ := storedMessage(t, ts.spool, id); m.Priority != c.want {
			t.Errorf("%s: stored with lane %v, want %v", c.param, m.Priority, c.want)
		}
	}
	w.cmdExpect("MAIL FROM:<a@example.org> MT-PRIORITY=10", "501")
	w.cmdExpect("MAIL FROM:<a@example.org> MT-PRIORITY=high", "501")
}
