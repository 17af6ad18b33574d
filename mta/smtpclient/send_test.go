package smtpclient

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"

	"github.com/mtaproject/mta/mta"
)

func dialT(t testing.TB, s *testServer, opts Options) *Conn {
	t.Helper()
	if opts.LocalName == "" {
		opts.LocalName = "client.test"
	}
	c, err := Dial(context.Background(), s.addr(), "localhost", opts)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func msg(data string, rcpts ...string) *Message {
	m := &Message{From: "s@x.test", Data: []byte(data)}
	for _, r := range rcpts {
		m.Recipients = append(m.Recipients, mta.Recipient{Address: r})
	}
	return m
}

func codes(res *Result) []int {
	var cs []int
	for _, r := range res.Recipients {
		if r == nil {
			cs = append(cs, 0)
		} else {
			cs = append(cs, r.Code)
		}
	}
	return cs
}

func send(t *testing.T, c *Conn, m *Message) *Result {
	t.Helper()
	res, err := c.Send(context.Background(), m)
	if err != nil {
		t.Fatalf("Send: %v", err)
	}
	if len(res.Recipients) != len(m.Recipients) {
		t.Fatalf("got %d replies for %d recipients", len(res.Recipients), len(m.Recipients))
	}
	return res
}

// connErr asserts err is an *Error at stage and the conn unusable.
func connErr(t *testing.T, c *Conn, err error, stage string) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) is not *Error", err, err)
	}
	if e.Stage != stage {
		t.Errorf("stage %q, want %q (%v)", e.Stage, stage, e)
	}
	if c != nil && c.Usable() {
		t.Errorf("conn still usable after %v", err)
	}
	return e
}

func forBoth(t *testing.T, f func(t *testing.T, pipelining bool)) {
	t.Run("pipelining", func(t *testing.T) { f(t, true) })
	t.Run("lockstep", func(t *testing.T) { f(t, false) })
}

func TestDotStuffing(t *testing.T) {
	for _, tc := range []struct{ in, out string }{
		{"", ".\r\n"},
		{".", "..\r\n.\r\n"},
		{".\r\n", "..\r\n.\r\n"},
		{"a\r\n.b\r\n", "a\r\n..b\r\n.\r\n"},
		{"a\r\n..\r\n.\r\nb", "a\r\n...\r\n..\r\nb\r\n.\r\n"},
		{"a", "a\r\n.\r\n"},
		{"a\r", "a\r\n.\r\n"},
		{"a.b\r\n", "a.b\r\n.\r\n"},
	} {
		var buf bytes.Buffer
		w := bufio.NewWriter(&buf)
		writeDotStuffed(w, []byte(tc.in))
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		if buf.String() != tc.out {
			t.Errorf("%q: got %q, want %q", tc.in, buf.String(), tc.out)
		}
	}
}

func TestSendByteExact(t *testing.T) {
	for _, tc := range []struct{ name, data, wire string }{
		{"dots", "Subject: x\r\n\r\n.hidden\r\nbody\r\n..\r\nend\r\n", "Subject: x\r\n\r\n..hidden\r\nbody\r\n...\r\nend\r\n.\r\n"},
		{"just a dot", ".", "..\r\n.\r\n"},
		{"no final CRLF", "a\r\nb", "a\r\nb\r\n.\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newServer(t, script{pipelining: true})
			c := dialT(t, s, Options{})
			res := send(t, c, msg(tc.data, "r@y.test"))
			if r := res.Recipients[0]; r.Code != 250 || r.Enhanced != (mta.Enhanced{2, 0, 0}) || r.Text != "Ok: queued as TEST" {
				t.Errorf("reply %+v", r)
			}
			c.Close()
			raw, _, _, msgs, _, _ := s.session(0).snapshot()
			want := "EHLO client.test\r\nMAIL FROM:<s@x.test>\r\nRCPT TO:<r@y.test>\r\nDATA\r\n" + tc.wire + "QUIT\r\n"
			if raw != want {
				t.Errorf("server got\n%q\nwant\n%q", raw, want)
			}
			if len(msgs) != 1 || msgs[0] != tc.wire {
				t.Errorf("messages %q", msgs)
			}
		})
	}
}

func TestPipelining(t *testing.T) {
	forBoth(t, func(t *testing.T, pipelining bool) {
		s := newServer(t, script{pipelining: pipelining})
		c := dialT(t, s, Options{})
		for range 2 {
			send(t, c, msg("hi\r\n", "a@y.test", "b@y.test", "c@y.test"))
		}
		c.Close()
		_, reads, cmds, msgs, _, _ := s.session(0).snapshot()
		if len(msgs) != 2 {
			t.Fatalf("%d messages", len(msgs))
		}
		groups := 0
		for _, r := range reads {
			both := strings.Contains(r, "MAIL FROM") && strings.Contains(r, "RCPT TO")
			if !pipelining && both {
				t.Errorf("lockstep client sent MAIL and RCPT together: %q", r)
			}
			if pipelining && both {
				groups++
				if strings.Count(r, "RCPT TO") != 3 || !strings.HasSuffix(r, "DATA\r\n") {
					t.Errorf("pipelined group incomplete: %q", r)
				}
				if groups == 2 && !strings.HasPrefix(r, "RSET\r\n") {
					t.Errorf("second group does not start with RSET: %q", r)
				}
			}
		}
		if pipelining && groups != 2 {
			t.Errorf("%d pipelined groups in %q", groups, reads)
		}
		want := []string{"EHLO client.test", "MAIL FROM:<s@x.test>", "RCPT TO:<a@y.test>",
			"RCPT TO:<b@y.test>", "RCPT TO:<c@y.test>", "DATA", "RSET", "MAIL FROM:<s@x.test>",
			"RCPT TO:<a@y.test>", "RCPT TO:<b@y.test>", "RCPT TO:<c@y.test>", "DATA", "QUIT"}
		if !slices.Equal(cmds, want) {
			t.Errorf("commands %q", cmds)
		}
	})
}

func TestSeveralMessages(t *testing.T) {
	s := newServer(t, script{pipelining: true, enhanced: true})
	c := dialT(t, s, Options{})
	for i := range 5 {
		res := send(t, c, msg(fmt.Sprintf("message %d\r\n", i), "a@y.test"))
		if r := res.Recipients[0]; r.Code != 250 || r.Enhanced != (mta.Enhanced{2, 0, 0}) || r.Text != "Ok: queued as TEST" {
			t.Errorf("reply %+v", r)
		}
	}
	if c.Messages() != 5 || !c.Usable() {
		t.Errorf("Messages %d Usable %v", c.Messages(), c.Usable())
	}
	c.Close()
	_, _, cmds, msgs, _, _ := s.session(0).snapshot()
	if n := slices.Index(cmds, "RSET"); n < 0 || strings.Count(strings.Join(cmds, "\n"), "RSET") != 4 {
		t.Errorf("commands %q", cmds)
	}
	if len(msgs) != 5 || msgs[4] != "message 4\r\n.\r\n" {
		t.Errorf("messages %q", msgs)
	}
}

func TestMixedRecipients(t *testing.T) {
	forBoth(t, func(t *testing.T, pipelining bool) {
		s := newServer(t, script{pipelining: pipelining, enhanced: true, rcpt: map[string]string{
			"b@y.test": "550 5.1.1 <b@y.test>: no such user",
			"c@y.test": "451 4.3.0 try later",
		}})
		c := dialT(t, s, Options{})
		res := send(t, c, msg("hi\r\n", "a@y.test", "b@y.test", "c@y.test"))
		if got := codes(res); !slices.Equal(got, []int{250, 550, 451}) {
			t.Fatalf("codes %v", got)
		}
		b := res.Recipients[1]
		if b.Enhanced != (mta.Enhanced{5, 1, 1}) || b.Text != "<b@y.test>: no such user" || !b.Permanent() {
			t.Errorf("b: %+v", b)
		}
		if !res.Recipients[2].Temporary() || !c.Usable() {
			t.Errorf("c: %+v usable %v", res.Recipients[2], c.Usable())
		}
	})
}

func TestNoRecipientAccepted(t *testing.T) {
	forBoth(t, func(t *testing.T, pipelining bool) {
		s := newServer(t, script{pipelining: pipelining, rcpt: map[string]string{
			"a@y.test": "550 no such user", "b@y.test": "450 mailbox busy",
		}})
		c := dialT(t, s, Options{})
		res := send(t, c, msg("hi\r\n", "a@y.test", "b@y.test"))
		if got := codes(res); !slices.Equal(got, []int{550, 450}) {
			t.Fatalf("codes %v", got)
		}
		if !c.Usable() {
			t.Fatal("conn unusable after a clean refusal")
		}
		// The conn is still in step: the next message goes through.
		if got := codes(send(t, c, msg("hi\r\n", "ok@y.test"))); got[0] != 250 {
			t.Errorf("next message: %v", got)
		}
		c.Close()
		_, _, cmds, msgs, _, _ := s.session(0).snapshot()
		if n := strings.Count(strings.Join(cmds, "\n"), "DATA"); pipelining && n != 2 || !pipelining && n != 1 {
			t.Errorf("DATA sent %d times: %q", n, cmds)
		}
		if len(msgs) != 1 {
			t.Errorf("messages %q", msgs)
		}
	})
}

func TestNoRecipientButData354(t *testing.T) {
	s := newServer(t, script{pipelining: true, rcpt: map[string]string{"a@y.test": "550 no"},
		replies: map[string]string{"DATA": "354 go ahead anyway"}})
	c := dialT(t, s, Options{})
	res := send(t, c, msg("hi\r\n", "a@y.test"))
	if got := codes(res); got[0] != 550 {
		t.Fatalf("codes %v", got)
	}
	if c.Usable() {
		t.Error("conn usable after a 354 with no recipients")
	}
	if _, _, _, msgs, _, _ := s.session(0).snapshot(); len(msgs) != 0 {
		t.Errorf("a message was completed: %q", msgs)
	}
}

func TestMailRejected(t *testing.T) {
	forBoth(t, func(t *testing.T, pipelining bool) {
		s := newServer(t, script{pipelining: pipelining,
			replies: map[string]string{"MAIL": "550 sender rejected"}})
		c := dialT(t, s, Options{})
		res := send(t, c, msg("hi\r\n", "a@y.test", "b@y.test"))
		if got := codes(res); !slices.Equal(got, []int{550, 550}) || res.Recipients[0].Text != "sender rejected" {
			t.Fatalf("codes %v %v", got, res.Recipients[0])
		}
		if !c.Usable() || c.Messages() != 1 {
			t.Errorf("usable %v messages %d", c.Usable(), c.Messages())
		}
		res = send(t, c, msg("hi\r\n", "a@y.test")) // RSET, then the same again
		if got := codes(res); got[0] != 550 || !c.Usable() {
			t.Errorf("second: %v usable %v", got, c.Usable())
		}
	})
}

func TestDataAndDotReplies(t *testing.T) {
	forBoth(t, func(t *testing.T, pipelining bool) {
		for _, stage := range []string{"DATA", "DOT"} {
			s := newServer(t, script{pipelining: pipelining, rcpt: map[string]string{"b@y.test": "550 no"},
				replies: map[string]string{stage: "452 4.3.1 queue full"}})
			c := dialT(t, s, Options{})
			res := send(t, c, msg("hi\r\n", "a@y.test", "b@y.test"))
			if got := codes(res); !slices.Equal(got, []int{452, 550}) {
				t.Errorf("%s: codes %v", stage, got)
			}
			if !c.Usable() {
				t.Errorf("%s: unusable", stage)
			}
		}
	})
}

func Test421(t *testing.T) {
	forBoth(t, func(t *testing.T, pipelining bool) {
		for stage, want := range map[string]string{
			"GREETING": "greeting", "EHLO": "ehlo", "MAIL": "mail", "RCPT": "rcpt",
			"DATA": "data", "DOT": "dot", "RSET": "rset",
		} {
			s := newServer(t, script{pipelining: pipelining,
				replies: map[string]string{stage: "421 4.3.2 shutting down"}})
			opts := Options{LocalName: "client.test"}
			c, err := Dial(context.Background(), s.addr(), "localhost", opts)
			if stage == "GREETING" || stage == "EHLO" {
				e := connErr(t, nil, err, want)
				if c != nil || e.Reply == nil || e.Reply.Code != 421 || e.Permanent() || mta.IsPermanent(err) {
					t.Errorf("%s: %v", stage, err)
				}
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			if stage == "RSET" {
				send(t, c, msg("hi\r\n", "a@y.test"))
			}
			res, err := c.Send(context.Background(), msg("hi\r\n", "a@y.test"))
			e := connErr(t, c, err, want)
			if res != nil || e.Reply == nil || e.Reply.Code != 421 || e.Permanent() {
				t.Errorf("%s: %v %v", stage, res, err)
			}
			if _, err := c.Send(context.Background(), msg("hi\r\n", "a@y.test")); !errors.Is(err, ErrUnusable) {
				t.Errorf("%s: Send on an unusable conn: %v", stage, err)
			}
			c.Close()
		}
	})
}

func TestDropMidData(t *testing.T) {
	s := newServer(t, script{pipelining: true, dropAfter: 1000})
	c := dialT(t, s, Options{})
	big := strings.Repeat("0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstu\r\n", 16000)
	_, err := c.Send(context.Background(), msg(big, "a@y.test"))
	var e *Error
	if !errors.As(err, &e) || e.Stage != "data" && e.Stage != "dot" || e.Reply != nil || e.Err == nil || c.Usable() {
		t.Errorf("%v", err)
	}
}

func TestBadReplies(t *testing.T) {
	for _, tc := range []struct {
		reply string
		want  error
	}{
		{"hello there", ErrMalformedReply},
		{"250-first\r\n251 second", ErrMalformedReply},
		{"354 what?", ErrUnexpectedReply},
		{"999 no", ErrMalformedReply},
	} {
		s := newServer(t, script{replies: map[string]string{"MAIL": tc.reply}})
		c := dialT(t, s, Options{})
		_, err := c.Send(context.Background(), msg("hi\r\n", "a@y.test"))
		connErr(t, c, err, "mail")
		if !errors.Is(err, tc.want) {
			t.Errorf("%q: %v", tc.reply, err)
		}
	}
}

func TestRSETRefused(t *testing.T) {
	s := newServer(t, script{pipelining: true, replies: map[string]string{"RSET": "502 5.5.1 no RSET here"}})
	c := dialT(t, s, Options{})
	send(t, c, msg("hi\r\n", "a@y.test"))
	_, err := c.Send(context.Background(), msg("hi\r\n", "a@y.test"))
	e := connErr(t, c, err, "rset")
	if e.Permanent() || mta.IsPermanent(err) || !strings.Contains(err.Error(), "no RSET here") {
		t.Errorf("%v", err)
	}
}

func TestStaleConnection(t *testing.T) {
	forBoth(t, func(t *testing.T, pipelining bool) {
		s := newServer(t, script{pipelining: pipelining})
		c := dialT(t, s, Options{})
		send(t, c, msg("hi\r\n", "a@y.test"))
		s.mu.Lock()
		s.conns[0].Close() // the server's idle timeout
		s.mu.Unlock()
		_, err := c.Send(context.Background(), msg("hi\r\n", "a@y.test"))
		if e := connErr(t, c, err, "rset"); e.Reply != nil {
			t.Errorf("%v", err)
		}
	})
}

func TestInvalidMessage(t *testing.T) {
	s := newServer(t, script{})
	c := dialT(t, s, Options{})
	for _, m := range []*Message{
		msg("hi\r\n"),
		msg("hi\r\n", "a@y.test>\r\nDATA"),
		{From: "x\r\nRSET", Recipients: []mta.Recipient{{Address: "a@y.test"}}},
	} {
		if _, err := c.Send(context.Background(), m); err == nil || errors.As(err, new(*Error)) {
			t.Errorf("%+v: %v", m, err)
		}
	}
	if !c.Usable() || c.Messages() != 0 {
		t.Error("invalid message affected the conn")
	}
}

func BenchmarkSend1KB(b *testing.B) {
	s := newServer(b, script{pipelining: true, enhanced: true, size: "10000000", noRecord: true})
	c, err := Dial(context.Background(), s.addr(), "localhost", Options{LocalName: "client.test"})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	body := strings.Repeat("The quick brown fox jumps over the lazy dog. 0123456789 abcdefghij\r\n", 15)
	m := msg("Subject: bench\r\n\r\n"+body, "a@y.test")
	b.SetBytes(int64(len(m.Data)))
	b.ReportAllocs()
	ctx := context.Background()
	for b.Loop() {
		res, err := c.Send(ctx, m)
		if err != nil || res.Recipients[0].Code != 250 {
			b.Fatal(err, res)
		}
	}
}

// A server that answers one command twice is out of step: every reply
// after would belong to the command before it. Seen after the last reply
// a transaction expects, the message is not taken for delivered: the
// connection is dropped and Send fails, so the message is tried again.
func TestExtraReplyIsOutOfStep(t *testing.T) {
	// After a 354, the reply to "." cannot be mistaken: it stands, and the
	// connection is not used again.
	s := newServer(t, script{pipelining: true, enhanced: true, replies: map[string]string{"DOT": "250 2.0.0 Ok\r\n250 2.0.0 queued again"}})
	c := dialT(t, s, Options{})
	res, err := c.Send(context.Background(), msg("hi\r\n", "a@y.test"))
	if err != nil || res.Recipients[0].Code != 250 || c.Usable() {
		t.Fatalf("Send = %+v, %v (usable %v): want delivered, the connection dropped", res, err, c.Usable())
	}
	// The same with BDAT, where nothing marks where the replies are: the
	// outcome is unknown, the transaction fails and the message is retried.
	pa, pb := net.Pipe()
	defer pb.Close()
	c2 := &Conn{raw: pa, conn: pa}
	c2.br = bufio.NewReader(strings.NewReader("451 4.3.0 the real reply\r\n"))
	c2.br.Peek(1)
	if err := c2.inStep("dot", &mta.Reply{Code: 250}); !errors.Is(err, ErrUnexpectedReply) {
		t.Fatalf("inStep with a reply left over: %v", err)
	}
}

// A 421 right after the last reply is the server closing the connection
// (a limit of messages per connection): the reply before it stands.
func TestClosingAfterTheLastReply(t *testing.T) {
	s := newServer(t, script{pipelining: true, enhanced: true, replies: map[string]string{"DOT": "250 2.0.0 Ok\r\n421 4.7.0 too many messages, closing"}})
	c := dialT(t, s, Options{})
	res, err := c.Send(context.Background(), msg("hi\r\n", "a@y.test"))
	if err != nil || res.Recipients[0].Code != 250 || c.Usable() {
		t.Fatalf("Send = %+v, %v (usable %v): want delivered, and the connection not used again", res, err, c.Usable())
	}
}
