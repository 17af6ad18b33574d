package smtpd

import (
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
