package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mtaproject/mta/mta/auth"
)

// pop3Session logs in as user and runs cmds, returning each reply's first
// line; "QUIT" is not sent unless it is in cmds.
func pop3Session(t *testing.T, addr, user, pass string, cmds ...string) []string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	read := func() string { l, _ := r.ReadString('\n'); return strings.TrimRight(l, "\r\n") }
	read()
	fmt.Fprintf(c, "USER %s\r\n", user)
	read()
	fmt.Fprintf(c, "PASS %s\r\n", pass)
	out := []string{read()}
	for _, cmd := range cmds {
		fmt.Fprint(c, cmd+"\r\n")
		out = append(out, read())
	}
	return out
}

// TestMailboxSurvivesSIGKILL: a message delivered to a mailbox is there
// after SIGKILL and a restart; messages deleted with DELE and QUIT stay
// deleted after SIGKILL; a session killed before QUIT deletes nothing.
func TestMailboxSurvivesSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	dir := t.TempDir()
	hash, _ := auth.Hash("pw")
	users := filepath.Join(dir, "users")
	os.WriteFile(users, []byte("dana:"+hash+"::dana@local.test\n"), 0o600)
	cfg := "local_domains: [local.test]\nauth: {users_file: " + users + "}\ndns: {servers: [\"127.0.0.1:1\"]}\n"
	data := t.TempDir()
	p := startMTA(t, data, cfg)
	for i := 0; i < 3; i++ {
		c, err := smtp.Dial(p.SMTP)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.SendMail("app@example.org", []string{"dana@local.test"}, strings.NewReader(fmt.Sprintf("Subject: %d\r\n\r\nmessage %d\r\n", i, i))); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if r := pop3Session(t, p.POP3, "dana", "pw", "QUIT"); strings.HasPrefix(r[0], "+OK dana has 3 messages") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the three messages never reached the mailbox")
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Delete one and QUIT, mark another and vanish: then SIGKILL.
	if r := pop3Session(t, p.POP3, "dana", "pw", "DELE 1", "QUIT"); !strings.Contains(r[2], "(1 messages deleted)") {
		t.Fatalf("DELE + QUIT: %q", r)
	}
	pop3Session(t, p.POP3, "dana", "pw", "DELE 1")
	p.Kill()

	p = startMTA(t, data, cfg)
	r := pop3Session(t, p.POP3, "dana", "pw", "UIDL", "QUIT")
	if !strings.HasPrefix(r[0], "+OK dana has 2 messages") {
		t.Fatalf("after SIGKILL and a restart: %q, want the 2 messages not deleted with QUIT", r)
	}
}
