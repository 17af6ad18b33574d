package server

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/textproto"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mtaproject/mta/bench"
	"github.com/mtaproject/mta/internal/pytest"
	"github.com/mtaproject/mta/mta/auth"
)

// localWorld is a world whose server hosts local.test: alice (with the
// postmaster alias) and bob (the catch-all of other.test).
func localWorld(t *testing.T, quota string) *world {
	t.Helper()
	hash, err := auth.Hash("alice-secret")
	if err != nil {
		t.Fatal(err)
	}
	users := filepath.Join(t.TempDir(), "users")
	content := fmt.Sprintf("alice:%s::alice@local.test,postmaster@local.test\nbob:%s::@other.test\n", hash, hash)
	if err := os.WriteFile(users, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return newWorld(t, "", fmt.Sprintf("local_domains: [local.test, other.test]\nauth: {users_file: %s}\nmailboxes: {quota: %s}\n", users, quota))
}

// smtpReply sends one transaction line by line and returns the reply to
// RCPT for each recipient (or the error).
func rcptReplies(t *testing.T, addr, mailParams string, rcpts ...string) []string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	read := func() string {
		var all []string
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				t.Fatalf("reading a reply: %v", err)
			}
			all = append(all, strings.TrimRight(line, "\r\n"))
			if len(line) < 4 || line[3] != '-' {
				return strings.Join(all, " | ")
			}
		}
	}
	read()
	fmt.Fprint(c, "EHLO client.test\r\n")
	read()
	fmt.Fprintf(c, "MAIL FROM:<someone@example.net>%s\r\n", mailParams)
	read()
	var out []string
	for _, rc := range rcpts {
		fmt.Fprintf(c, "RCPT TO:<%s>\r\n", rc)
		out = append(out, read())
	}
	return out
}

// TestLocalDeliveryReadOverPOP3 sends a message to two aliases of one
// local user and to a remote recipient; the remote one is relayed, the
// local user gets one copy with trace headers, and Python's poplib reads
// it byte for byte, over STLS, with every command.
func TestLocalDeliveryReadOverPOP3(t *testing.T) {
	py := pytest.Python(t, "poplib", "ssl")
	w := localWorld(t, "1MiB")
	w.dns.SetA("remote.test", "127.0.0.1")
	remote := w.sink("127.0.0.1", bench.SinkConfig{})
	body := "From: app@example.org\r\nSubject: for the postmaster\r\nMessage-ID: <m1@example.org>\r\n\r\nHello.\r\n.a line with a dot\r\n"
	id := w.sendDSN("app@example.org", nil, []rcpt{{addr: "alice@local.test"}, {addr: "Postmaster@local.test"}, {addr: "x@remote.test"}}, body)
	w.waitFor("delivery", 10*time.Second, func() bool { return w.gone(id) })
	if n := len(remote.Messages()); n != 1 {
		t.Fatalf("the remote recipient got %d messages", n)
	}
	list, err := w.srv.Spool().MailboxList("alice")
	if err != nil || len(list) != 1 || !strings.HasPrefix(list[0].UID, id+".") {
		t.Fatalf("alice's mailbox: %+v, %v", list, err)
	}
	stored, err := w.srv.Spool().MailboxGet("alice", list[0].UID)
	if err != nil {
		t.Fatal(err)
	}
	trace := "Return-Path: <app@example.org>\r\nDelivered-To: alice@local.test\r\nDelivered-To: postmaster@local.test\r\nReceived: from "
	if !bytes.HasPrefix(stored, []byte(trace)) || !bytes.HasSuffix(stored, []byte("\r\n"+body)) {
		t.Fatalf("stored message:\n%s", stored)
	}
	if int64(len(stored)) != list[0].Size {
		t.Errorf("indexed size %d, stored %d", list[0].Size, len(stored))
	}

	wantFile := filepath.Join(t.TempDir(), "want")
	os.WriteFile(wantFile, stored, 0o600)
	host, port, _ := net.SplitHostPort(w.srv.Addr("pop3"))
	out, err := exec.Command(py, "testdata/pop3_client.py", host, port, "alice", "alice-secret", wantFile).CombinedOutput()
	if err != nil {
		t.Fatalf("poplib client: %v\n%s", err, out)
	}
	steps := map[string]map[string]any{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("bad line %q", line)
		}
		steps[m["step"].(string)] = m
	}
	caps := fmt.Sprint(steps["capa"]["caps"])
	for _, c := range []string{"TOP", "UIDL", "USER", "SASL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "STLS", "EXPIRE", "IMPLEMENTATION"} {
		if !strings.Contains(caps, c) {
			t.Errorf("CAPA lacks %s: %s", c, caps)
		}
	}
	if strings.Contains(fmt.Sprint(steps["capa-tls"]["caps"]), "STLS") {
		t.Error("STLS offered again after TLS")
	}
	if s := steps["stat"]; s["count"] != 1.0 || s["size"] != float64(len(stored)) {
		t.Errorf("STAT %v, want 1 %d", s, len(stored))
	}
	if l := fmt.Sprint(steps["uidl"]["lines"]); l != "[1 "+list[0].UID+"]" {
		t.Errorf("UIDL %s", l)
	}
	if r := steps["retr"]; r["same"] != true {
		t.Errorf("RETR gave different bytes: %v", r)
	}
	if s := steps["second"]["text"].(string); !strings.HasPrefix(s, "-ERR [IN-USE]") {
		t.Errorf("second session: %q", s)
	}
	if steps["after-drop"]["count"] != 1.0 {
		t.Errorf("a session dropped without QUIT deleted its marked message: %v", steps["after-drop"])
	}
	if !strings.HasPrefix(steps["retr-deleted"]["text"].(string), "-ERR") || steps["after-rset"]["count"] != 1.0 {
		t.Errorf("DELE/RSET: %v %v", steps["retr-deleted"], steps["after-rset"])
	}
	if q := steps["quit"]["text"].(string); !strings.Contains(q, "(1 messages deleted)") {
		t.Errorf("QUIT: %q", q)
	}
	if a := steps["auth-plain"]; !strings.HasPrefix(a["text"].(string), "+OK") || a["count"] != 0.0 {
		t.Errorf("AUTH PLAIN after the deletion: %v", a)
	}
	if wr := steps["wrong"]; !strings.HasPrefix(wr["text"].(string), "-ERR [AUTH]") || wr["delay"].(float64) < 0.9 {
		t.Errorf("wrong password: %v (want -ERR [AUTH] after about a second)", wr)
	}
	if list, _ := w.srv.Spool().MailboxList("alice"); len(list) != 0 {
		t.Errorf("after DELE and QUIT the mailbox still has %d messages", len(list))
	}
}

// TestLocalRecipientsCheckedAtRCPT: an unknown local address is refused at
// RCPT with 550 5.1.1 (nothing is accepted and then bounced), a catch-all
// takes any address of its domain, and a mailbox without room for the
// declared SIZE gets 552 5.2.2, as does a message at its end of data.
func TestLocalRecipientsCheckedAtRCPT(t *testing.T) {
	w := localWorld(t, "4KiB")
	got := rcptReplies(t, w.srv.Addr("smtp"), " SIZE=100", "nobody@local.test", "anything@other.test", "alice@local.test")
	if !strings.HasPrefix(got[0], "550 5.1.1 ") || !strings.HasPrefix(got[1], "250") || !strings.HasPrefix(got[2], "250") {
		t.Errorf("RCPT replies %q", got)
	}
	if got := rcptReplies(t, w.srv.Addr("smtp"), " SIZE=5000", "alice@local.test"); !strings.HasPrefix(got[0], "552 5.2.2 ") {
		t.Errorf("declared size over quota: %q", got)
	}
	// Without SIZE=, the end of data refuses what does not fit.
	c, err := smtp.Dial(w.srv.Addr("smtp"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.SendMail("someone@example.net", []string{"alice@local.test"}, strings.NewReader("Subject: big\r\n\r\n"+strings.Repeat("x", 5000)+"\r\n"))
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code != 552 || se.EnhancedCode != (smtp.EnhancedCode{5, 2, 2}) {
		t.Errorf("message over quota at the end of data: %v", err)
	}
}

// TestPostmasterIsNeverRefused: with no user holding a local domain's
// postmaster address, RCPT TO:<Postmaster> and postmaster@ the domain in
// any case are still taken (RFC 5321 §4.1.1.3, §4.5.1), and the mail is
// kept in the postmaster mailbox; other unknown addresses are refused.
func TestPostmasterIsNeverRefused(t *testing.T) {
	hash, err := auth.Hash("bob-secret")
	if err != nil {
		t.Fatal(err)
	}
	users := filepath.Join(t.TempDir(), "users")
	if err := os.WriteFile(users, []byte("bob:"+hash+"::bob@local.test\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	w := newWorld(t, "", fmt.Sprintf("local_domains: [local.test]\nauth: {users_file: %s}\n", users))
	got := rcptReplies(t, w.srv.Addr("smtp"), "", "Postmaster", "postmaster@local.test", "POSTMASTER@Local.Test", "nobody@local.test")
	for i, want := range []string{"250", "250", "250", "550 5.1.1"} {
		if !strings.HasPrefix(got[i], want) {
			t.Errorf("RCPT replies %q, want %q for the %dth", got, want, i+1)
		}
	}
	c, err := smtp.Dial(w.srv.Addr("smtp"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SendMail("someone@example.net", []string{"postmaster@local.test"}, strings.NewReader("Subject: abuse report\r\n\r\nhello\r\n")); err != nil {
		t.Fatal(err)
	}
	w.waitFor("the postmaster's mail stored", 10*time.Second, func() bool {
		n, _, err := w.srv.Spool().MailboxUsage("postmaster")
		return err == nil && n == 1
	})
}

// TestSendersReturnPathIsDropped: a Return-Path: the sender wrote is not
// stored in the mailbox, where a reader would take it for the envelope
// sender; the one final delivery adds is the only one.
func TestSendersReturnPathIsDropped(t *testing.T) {
	w := localWorld(t, "1MiB")
	c, err := smtp.Dial(w.srv.Addr("smtp"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := "Return-Path: <forged@evil.test>\r\nSubject: hi\r\nreturn-path:\r\n <folded@evil.test>\r\n\r\nReturn-Path: in the body stays\r\n"
	if err := c.SendMail("real@example.net", []string{"alice@local.test"}, strings.NewReader(msg)); err != nil {
		t.Fatal(err)
	}
	var got []byte
	w.waitFor("alice's copy", 10*time.Second, func() bool {
		list, err := w.srv.Spool().MailboxList("alice")
		if err != nil || len(list) != 1 {
			return false
		}
		got, err = w.srv.Spool().MailboxGet("alice", list[0].UID)
		return err == nil
	})
	text := string(got)
	if !strings.HasPrefix(text, "Return-Path: <real@example.net>\r\n") || strings.Contains(text, "evil.test") ||
		!strings.Contains(text, "Subject: hi\r\n\r\nReturn-Path: in the body stays\r\n") {
		t.Fatalf("stored copy:\n%s", text)
	}
}

// TestFetchmailAndMpop: two independent POP3 clients from Debian fetch and
// delete mail that came in through the SMTP edge.
func TestFetchmailAndMpop(t *testing.T) {
	fetchmail, err1 := exec.LookPath("fetchmail")
	mpop, err2 := exec.LookPath("mpop")
	if err1 != nil || err2 != nil {
		t.Skip("fetchmail or mpop not found: apt-get install fetchmail mpop (make test does)")
	}
	w := localWorld(t, "1MiB")
	host, port, _ := net.SplitHostPort(w.srv.Addr("pop3"))
	dir := t.TempDir()
	send := func(subject string) string {
		return w.send("app@example.org", []string{"someone@other.test"}, "From: app@example.org\r\nSubject: "+subject+"\r\n\r\nbody of "+subject+"\r\n")
	}
	waitDelivered := func(ids ...string) {
		for _, id := range ids {
			w.waitFor("local delivery", 10*time.Second, func() bool { return w.gone(id) })
		}
	}
	empty := func(client string) {
		if list, _ := w.srv.Spool().MailboxList("bob"); len(list) != 0 {
			t.Errorf("%s left %d messages in the mailbox", client, len(list))
		}
	}

	waitDelivered(send("first"), send("second"))
	rc := filepath.Join(dir, "fetchmailrc")
	out := filepath.Join(dir, "fetched")
	os.WriteFile(rc, []byte(fmt.Sprintf("poll %s service %s protocol pop3 auth password timeout 10\n"+
		"  user \"bob\" there with password \"alice-secret\" is \"bob\" here\n"+
		"  sslproto \"\" no rewrite mda \"/bin/sh -c 'cat >> %s'\"\n", host, port, out)), 0o600)
	cmd := exec.Command(fetchmail, "-f", rc, "--nodetach", "--nosyslog", "-v", "-i", filepath.Join(dir, "fetchids"))
	cmd.Env = append(os.Environ(), "HOME="+dir, "FETCHMAILHOME="+dir)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("fetchmail: %v\n%s", err, b)
	}
	got, _ := os.ReadFile(out)
	if !bytes.Contains(got, []byte("body of first")) || !bytes.Contains(got, []byte("body of second")) {
		t.Fatalf("fetchmail delivered:\n%s", got)
	}
	empty("fetchmail")

	waitDelivered(send("third"), send("fourth"))
	mbox := filepath.Join(dir, "mbox")
	mrc := filepath.Join(dir, "mpoprc")
	os.WriteFile(mrc, []byte(fmt.Sprintf("account default\nhost %s\nport %s\nuser bob\npassword alice-secret\n"+
		"auth user\ntls off\ndelivery mbox %s\nkeep off\nuidls_file %s\n", host, port, mbox, filepath.Join(dir, "uidls"))), 0o600)
	cmd = exec.Command(mpop, "--file="+mrc, "--quiet")
	cmd.Env = append(os.Environ(), "HOME="+dir)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("mpop: %v\n%s", err, b)
	}
	got, _ = os.ReadFile(mbox)
	if !bytes.Contains(got, []byte("body of third")) || !bytes.Contains(got, []byte("body of fourth")) {
		t.Fatalf("mpop delivered:\n%s", got)
	}
	empty("mpop")
}

// TestBounceToALocalSenderLandsInItsMailbox: the notice for a message from
// a local user goes the way of any mail to a local domain: into the
// user's mailbox.
func TestBounceToALocalSenderLandsInItsMailbox(t *testing.T) {
	w := localWorld(t, "1MiB")
	w.dns.SetA("remote.test", "127.0.0.1")
	w.sink("127.0.0.1", bench.SinkConfig{RcptReplies: map[string]string{"gone@remote.test": "550 5.1.1 gone"}})
	id := w.send("alice@local.test", []string{"gone@remote.test"}, "From: alice@local.test\r\nSubject: hi\r\n\r\nx\r\n")
	w.waitFor("the bounce in alice's mailbox", 10*time.Second, func() bool {
		list, _ := w.srv.Spool().MailboxList("alice")
		return len(list) == 1 && w.gone(id)
	})
	list, _ := w.srv.Spool().MailboxList("alice")
	msg, _ := w.srv.Spool().MailboxGet("alice", list[0].UID)
	r := parseReport(string(msg))
	if !bytes.HasPrefix(msg, []byte("Return-Path: <>\r\nDelivered-To: alice@local.test\r\n")) || r.rcpts["gone@remote.test"]["Status"] != "5.1.1" || r.perMessage["X-Queue-ID"] != id {
		t.Fatalf("alice's mailbox holds:\n%s", msg)
	}
}

// TestAliasesInTwoLocalDomainsGetTwoCopies: a message to a user's address
// in each of two local domains is two deliveries, so two copies, each with
// its own Delivered-To and UID.
func TestAliasesInTwoLocalDomainsGetTwoCopies(t *testing.T) {
	hash, _ := auth.Hash("pw")
	users := filepath.Join(t.TempDir(), "users")
	os.WriteFile(users, []byte("carol:"+hash+"::carol@local.test,carol@other.test\n"), 0o600)
	w := newWorld(t, "", "local_domains: [local.test, other.test]\nauth: {users_file: "+users+"}\n")
	id := w.send("app@example.org", []string{"carol@local.test", "carol@other.test"}, "Subject: twice\r\n\r\nx\r\n")
	w.waitFor("both deliveries", 10*time.Second, func() bool { return w.gone(id) })
	list, _ := w.srv.Spool().MailboxList("carol")
	if len(list) != 2 || list[0].UID == list[1].UID {
		t.Fatalf("carol's mailbox: %+v", list)
	}
	seen := map[string]bool{}
	for _, m := range list {
		b, _ := w.srv.Spool().MailboxGet("carol", m.UID)
		for _, to := range []string{"carol@local.test", "carol@other.test"} {
			if bytes.Contains(b, []byte("Delivered-To: "+to+"\r\n")) {
				seen[to] = true
			}
		}
	}
	if len(seen) != 2 {
		t.Errorf("Delivered-To headers seen: %v", seen)
	}
}

// TestRoomMadeOverPOP3CountsAtOnce: once the owner of a full mailbox has
// deleted its messages over POP3, mail for it is taken at once, not
// refused for good (552) until the quota check's measurement expires.
func TestRoomMadeOverPOP3CountsAtOnce(t *testing.T) {
	w := localWorld(t, "3KiB")
	id := w.send("app@example.org", []string{"alice@local.test"}, "Subject: fill\r\n\r\n"+strings.Repeat("x", 2500)+"\r\n")
	w.waitFor("delivery", 10*time.Second, func() bool { return w.gone(id) })
	w.waitFor("the mailbox full", 5*time.Second, func() bool {
		return strings.HasPrefix(rcptReplies(t, w.srv.Addr("smtp"), " SIZE=1000", "alice@local.test")[0], "552 5.2.2 ")
	})
	c, err := textproto.Dial("tcp", w.srv.Addr("pop3"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, cmd := range []string{"", "USER alice", "PASS alice-secret", "DELE 1", "QUIT"} {
		if cmd != "" {
			c.PrintfLine("%s", cmd)
		}
		if line, err := c.ReadLine(); err != nil || !strings.HasPrefix(line, "+OK") {
			t.Fatalf("POP3 %q: %q %v", cmd, line, err)
		}
	}
	if got := rcptReplies(t, w.srv.Addr("smtp"), " SIZE=1000", "alice@local.test"); !strings.HasPrefix(got[0], "250") {
		t.Errorf("after the owner emptied the mailbox: %q, want 250", got)
	}
}
