package smtpclient

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"
)

// sendThen is SendThen that fails the test on an error.
func sendThen(t *testing.T, c *Conn, m, next *Message) *Result {
	t.Helper()
	res, err := c.SendThen(context.Background(), m, func() *Message { return next })
	if err != nil {
		t.Fatalf("SendThen: %v", err)
	}
	return res
}

// TestNextMessageRidesWithTheData: the next message's MAIL, RCPT and DATA
// go in the same write as the data before them, without RSET, and every
// message arrives whole with its own replies.
func TestNextMessageRidesWithTheData(t *testing.T) {
	s := newServer(t, script{pipelining: true, enhanced: true, rcpt: map[string]string{"no@y.test": "550 5.1.1 no such user"}})
	c := dialT(t, s, Options{})
	m1, m2, m3 := msg("one\r\n", "a@y.test"), msg("two\r\n", "b@y.test", "no@y.test"), msg("three\r\n", "c@y.test")
	if got := codes(sendThen(t, c, m1, m2)); !slices.Equal(got, []int{250}) {
		t.Errorf("first: %v", got)
	}
	if got := codes(sendThen(t, c, m2, m3)); !slices.Equal(got, []int{250, 550}) {
		t.Errorf("second: %v", got)
	}
	if got := codes(send(t, c, m3)); !slices.Equal(got, []int{250}) {
		t.Errorf("third: %v", got)
	}
	if c.Messages() != 3 || !c.Usable() {
		t.Errorf("Messages %d Usable %v", c.Messages(), c.Usable())
	}
	c.Close()
	_, reads, cmds, msgs, _, _ := s.session(0).snapshot()
	if !slices.Equal(msgs, []string{"one\r\n.\r\n", "two\r\n.\r\n", "three\r\n.\r\n"}) {
		t.Errorf("messages %q", msgs)
	}
	want := []string{"EHLO client.test",
		"MAIL FROM:<s@x.test>", "RCPT TO:<a@y.test>", "DATA",
		"MAIL FROM:<s@x.test>", "RCPT TO:<b@y.test>", "RCPT TO:<no@y.test>", "DATA",
		"MAIL FROM:<s@x.test>", "RCPT TO:<c@y.test>", "DATA", "QUIT"}
	if !slices.Equal(cmds, want) {
		t.Errorf("commands %q", cmds)
	}
	for _, group := range []string{
		"one\r\n.\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<no@y.test>\r\nDATA\r\n",
		"two\r\n.\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n",
	} {
		if !slices.Contains(reads, group) {
			t.Errorf("no read of %q in %q", group, reads)
		}
	}
}

// TestNextMessageNoneOrRefused: when next has nothing, or names a message
// the server would refuse from its EHLO alone, nothing is begun and the
// next Send goes as usual.
func TestNextMessageNoneOrRefused(t *testing.T) {
	s := newServer(t, script{pipelining: true, size: "100"})
	c := dialT(t, s, Options{})
	big := msg(strings.Repeat("x", 200)+"\r\n", "b@y.test")
	sendThen(t, c, msg("one\r\n", "a@y.test"), big)
	if got := send(t, c, big).Recipients[0]; got.Code != 552 || !got.Local {
		t.Errorf("over SIZE: %+v", got)
	}
	sendThen(t, c, msg("two\r\n", "a@y.test"), nil)
	send(t, c, msg("three\r\n", "a@y.test"))
	c.Close()
	_, _, cmds, msgs, _, _ := s.session(0).snapshot()
	if len(msgs) != 3 || strings.Count(strings.Join(cmds, "\n"), "MAIL FROM") != 3 {
		t.Errorf("commands %q, messages %q", cmds, msgs)
	}
	if got := strings.Count(strings.Join(cmds, "\n"), "RSET"); got != 2 {
		t.Errorf("%d RSET in %q: one before each transaction not begun behind data", got, cmds)
	}
}

// TestNextMessageLockstep: a server without PIPELINING gets one command at
// a time, and next is not asked.
func TestNextMessageLockstep(t *testing.T) {
	s := newServer(t, script{})
	c := dialT(t, s, Options{})
	res, err := c.SendThen(context.Background(), msg("one\r\n", "a@y.test"), func() *Message {
		t.Error("next asked of a server without PIPELINING")
		return nil
	})
	if err != nil || res.Recipients[0].Code != 250 {
		t.Fatalf("%v %v", res, err)
	}
}

// TestNextMessageAfterFailedData: when the reply to "." ends the session
// (421) or never comes, the begun message was not sent: its data never
// went out, the Conn is unusable, and Close does not say QUIT into a
// transaction that may be waiting for data.
func TestNextMessageAfterFailedData(t *testing.T) {
	for _, dot := range []string{"421 4.3.2 shutting down", "DROP"} {
		s := newServer(t, script{pipelining: true, replies: map[string]string{"DOT": dot}})
		c := dialT(t, s, Options{})
		next := msg("two\r\n", "b@y.test")
		_, err := c.SendThen(context.Background(), msg("one\r\n", "a@y.test"), func() *Message { return next })
		connErr(t, c, err, "dot")
		if _, err := c.Send(context.Background(), next); err == nil {
			t.Errorf("%s: the begun message was sent on an unusable Conn", dot)
		}
		c.Close()
		_, _, cmds, _, _, _ := s.session(0).snapshot()
		if slices.Contains(cmds, "QUIT") || slices.Contains(cmds, "two") {
			t.Errorf("%s: commands %q", dot, cmds)
		}
	}
}

// TestNextMessageAbandoned: closing a Conn with a begun transaction drops
// the connection without QUIT, so the server (which answered DATA with
// 354) takes nothing; sending another message than the one begun does the
// same.
func TestNextMessageAbandoned(t *testing.T) {
	for _, how := range []string{"close", "other message"} {
		s := newServer(t, script{pipelining: true})
		c := dialT(t, s, Options{})
		sendThen(t, c, msg("one\r\n", "a@y.test"), msg("two\r\n", "b@y.test"))
		if how == "other message" {
			_, err := c.Send(context.Background(), msg("three\r\n", "c@y.test"))
			connErr(t, c, err, "mail")
		}
		c.Close()
		waitClosed(t, s)
		_, _, cmds, msgs, _, _ := s.session(0).snapshot()
		if len(msgs) != 1 || slices.Contains(cmds, "QUIT") || slices.Contains(cmds, "RCPT TO:<c@y.test>") {
			t.Errorf("%s: commands %q, messages %q", how, cmds, msgs)
		}
	}
}

// waitClosed waits until the server's handlers of s have all returned.
func waitClosed(t *testing.T, s *testServer) {
	t.Helper()
	done := make(chan struct{})
	go func() { s.ln.Close(); s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the server's sessions did not end")
	}
}

// TestNextMessageCancelled: a cancelled context for the begun message's
// Send drops the connection rather than leaving the server mid-transaction.
func TestNextMessageCancelled(t *testing.T) {
	s := newServer(t, script{pipelining: true})
	c := dialT(t, s, Options{})
	next := msg("two\r\n", "b@y.test")
	sendThen(t, c, msg("one\r\n", "a@y.test"), next)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := c.Send(ctx, next)
	if e := connErr(t, c, err, "mail"); !errors.Is(e, context.Canceled) {
		t.Errorf("error %v", err)
	}
}

// TestNoNextMessageBehindAFullTransaction: when the server answers a RCPT
// that the transaction is full and takes another (in either order), the
// next message is not begun behind the data: the caller sends the
// recipients left first.
func TestNoNextMessageBehindAFullTransaction(t *testing.T) {
	for _, rcpts := range [][]string{{"a@y.test", "full@y.test"}, {"full@y.test", "a@y.test"}} {
		s := newServer(t, script{pipelining: true, enhanced: true, rcpt: map[string]string{"full@y.test": "452 4.5.3 Too many recipients"}})
		c := dialT(t, s, Options{})
		asked := false
		res, err := c.SendThen(context.Background(), msg("one\r\n", rcpts...), func() *Message {
			asked = true
			return msg("two\r\n", "b@y.test")
		})
		if err != nil {
			t.Fatal(err)
		}
		if got := codes(res); len(got) != 2 || got[0]+got[1] != 250+452 || asked {
			t.Fatalf("%v: replies %v, next asked %v: want 250 and 452, and not asked", rcpts, got, asked)
		}
		if got := codes(send(t, c, msg("again\r\n", "full2@y.test"))); !slices.Equal(got, []int{250}) {
			t.Errorf("the next transaction: %v", got)
		}
	}
}

// TestNoRecipientsAfterTheTransactionIsFull: without PIPELINING, once the
// server said the transaction is full, the recipients left are not sent
// (they would get the same) and get its reply.
func TestNoRecipientsAfterTheTransactionIsFull(t *testing.T) {
	s := newServer(t, script{enhanced: true, rcpt: map[string]string{"full@y.test": "452 4.5.3 Too many recipients"}})
	c := dialT(t, s, Options{})
	res := send(t, c, msg("one\r\n", "a@y.test", "full@y.test", "c@y.test", "d@y.test"))
	if got := codes(res); !slices.Equal(got, []int{250, 452, 452, 452}) {
		t.Errorf("replies %v", got)
	}
	c.Close()
	_, _, cmds, msgs, _, _ := s.session(0).snapshot()
	want := []string{"EHLO client.test", "MAIL FROM:<s@x.test>", "RCPT TO:<a@y.test>", "RCPT TO:<full@y.test>", "DATA", "QUIT"}
	if !slices.Equal(cmds, want) || len(msgs) != 1 {
		t.Errorf("commands %q, messages %d; want %q and one message", cmds, len(msgs), want)
	}
}
