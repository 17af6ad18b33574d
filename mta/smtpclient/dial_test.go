package smtpclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"mime/quotedprintable"
	"net"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mtaproject/mta/mta"
)

func TestHELOFallback(t *testing.T) {
	s := newServer(t, script{rejectEHLO: true, pipelining: true})
	c := dialT(t, s, Options{})
	if len(c.Extensions()) != 0 || c.TLS() {
		t.Errorf("extensions %v tls %v", c.Extensions(), c.TLS())
	}
	if got := codes(send(t, c, msg("hi\r\n", "a@y.test"))); got[0] != 250 {
		t.Errorf("codes %v", got)
	}
	if c.Greeting() != "mx.test ESMTP test" || !strings.HasPrefix(c.RemoteAddr(), "127.0.0.1:") {
		t.Errorf("greeting %q addr %q", c.Greeting(), c.RemoteAddr())
	}
	c.Close()
	_, reads, cmds, _, _, _ := s.session(0).snapshot()
	if !slices.Equal(cmds[:3], []string{"EHLO client.test", "HELO client.test", "MAIL FROM:<s@x.test>"}) {
		t.Errorf("commands %q", cmds)
	}
	for _, r := range reads {
		if strings.Contains(r, "MAIL") && strings.Contains(r, "RCPT") {
			t.Errorf("pipelined after HELO: %q", r)
		}
	}
}

func TestGreetingRefused(t *testing.T) {
	s := newServer(t, script{replies: map[string]string{"GREETING": "554 5.3.2 no service here"}})
	_, err := Dial(context.Background(), s.addr(), "mx.example", Options{LocalName: "client.test"})
	e := connErr(t, nil, err, "greeting")
	if !e.Permanent() || !mta.IsPermanent(err) || e.Host != "mx.example" || e.Addr != s.addr() {
		t.Errorf("%+v", e)
	}
	host, port, _ := net.SplitHostPort(s.addr())
	if want := "mx.example[" + host + "]:" + port + " said at greeting: 554 5.3.2 no service here"; err.Error() != want {
		t.Errorf("Error() = %q, want %q", err.Error(), want)
	}
	// A greeting refusal leaves the stream in step: Dial says QUIT.
	for range 100 {
		if _, _, cmds, _, _, _ := s.session(0).snapshot(); slices.Equal(cmds, []string{"QUIT"}) {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Error("no QUIT after the refused greeting")
}

func TestConnectRefused(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	_, err := Dial(context.Background(), addr, "", Options{LocalName: "client.test"})
	if e := connErr(t, nil, err, "connect"); e.Host != addr || e.Err == nil {
		t.Errorf("%+v", e)
	}
	if _, err := Dial(context.Background(), addr, "", Options{}); err == nil || errors.As(err, new(*Error)) {
		t.Errorf("missing LocalName: %v", err)
	}
}

func TestSTARTTLS(t *testing.T) {
	insecure := &tls.Config{InsecureSkipVerify: true}
	pool := x509.NewCertPool()
	pool.AddCert(testCert(t).Leaf)
	for _, tc := range []struct {
		name     string
		sc       script
		opts     Options
		server   string // serverName
		wantTLS  bool
		stage    string // expected Dial failure
		sessions int
		outcome  string // TLSOutcome when Dial succeeds
	}{
		{"opportunistic offered", script{starttls: true}, Options{}, "mx.example", true, "", 1, TLSUsed},
		{"opportunistic not offered", script{}, Options{}, "mx.example", false, "", 1, TLSNotOffered},
		{"opportunistic refused", script{starttls: true, replies: map[string]string{"STARTTLS": "454 4.7.0 TLS not available"}},
			Options{}, "mx.example", false, "", 1, TLSRefused},
		{"opportunistic broken handshake", script{starttls: true, badTLS: true}, Options{}, "mx.example", false, "", 2, TLSFellBack},
		{"none", script{starttls: true}, Options{TLS: TLSNone}, "mx.example", false, "", 1, TLSDisabled},
		{"required insecure", script{starttls: true}, Options{TLS: TLSRequired, TLSConfig: insecure}, "mx.example", true, "", 1, TLSUsed},
		{"required verified", script{starttls: true}, Options{TLS: TLSRequired, TLSConfig: &tls.Config{RootCAs: pool}}, "localhost.", true, "", 1, TLSUsed},
		{"required wrong name", script{starttls: true}, Options{TLS: TLSRequired, TLSConfig: &tls.Config{RootCAs: pool}}, "mx.example", false, "starttls", 1, ""},
		{"required untrusted", script{starttls: true}, Options{TLS: TLSRequired}, "localhost", false, "starttls", 1, ""},
		{"required not offered", script{}, Options{TLS: TLSRequired, TLSConfig: insecure}, "mx.example", false, "starttls", 1, ""},
		{"required refused", script{starttls: true, replies: map[string]string{"STARTTLS": "554 5.7.0 no TLS for you"}},
			Options{TLS: TLSRequired, TLSConfig: insecure}, "mx.example", false, "starttls", 1, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newServer(t, tc.sc)
			tc.opts.LocalName = "client.test"
			c, err := Dial(context.Background(), s.addr(), tc.server, tc.opts)
			if tc.stage != "" {
				e := connErr(t, nil, err, tc.stage)
				if e.Reply != nil || e.Permanent() || mta.IsPermanent(err) {
					t.Errorf("TLS failure should be temporary: %v", err)
				}
			} else {
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				if c.TLS() != tc.wantTLS {
					t.Errorf("TLS() = %v", c.TLS())
				}
				if c.TLSOutcome() != tc.outcome {
					t.Errorf("TLSOutcome() = %q, want %q", c.TLSOutcome(), tc.outcome)
				}
				if _, ok := c.Extensions()["STARTTLS"]; ok && tc.wantTLS {
					t.Error("extensions not refreshed after STARTTLS")
				}
				if got := codes(send(t, c, msg("hi\r\n", "a@y.test"))); got[0] != 250 {
					t.Errorf("codes %v", got)
				}
				_, _, _, msgs, stls, _ := s.session(tc.sessions - 1).snapshot()
				if stls != tc.wantTLS || len(msgs) != 1 {
					t.Errorf("server: tls %v msgs %q", stls, msgs)
				}
			}
			if n := s.count(); n != tc.sessions {
				t.Errorf("%d connections, want %d", n, tc.sessions)
			}
		})
	}
}

// fakeRemote makes a connection look as if it came from elsewhere.
type fakeRemote struct{ net.Conn }

func (fakeRemote) RemoteAddr() net.Addr { return &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 25} }

type fakeDialer struct{}

func (fakeDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return fakeRemote{c}, nil
}

func TestAuth(t *testing.T) {
	insecure := &tls.Config{InsecureSkipVerify: true}
	good := &Auth{Username: "user", Password: "secret"}
	for _, tc := range []struct {
		name string
		sc   script
		opts Options
		err  error // expected Dial error, nil for success
	}{
		{"plain over TLS", script{starttls: true, auth: "LOGIN PLAIN"}, Options{TLS: TLSRequired, TLSConfig: insecure, Auth: good}, nil},
		{"login on loopback", script{auth: "LOGIN"}, Options{Auth: good}, nil},
		{"wrong password", script{auth: "PLAIN"}, Options{Auth: &Auth{"user", "wrong"}}, ErrAuthFailed},
		{"wrong password login", script{auth: "LOGIN"}, Options{Auth: &Auth{"user", "wrong"}}, ErrAuthFailed},
		{"not offered", script{}, Options{Auth: good}, ErrAuthFailed},
		{"no known mechanism", script{auth: "CRAM-MD5"}, Options{Auth: good}, ErrAuthFailed},
		{"cleartext to a remote host", script{auth: "PLAIN"}, Options{Auth: good, Dialer: fakeDialer{}}, ErrAuthNeedsTLS},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.sc.user, tc.sc.pass = "user", "secret"
			s := newServer(t, tc.sc)
			tc.opts.LocalName = "client.test"
			c, err := Dial(context.Background(), s.addr(), "mx.example", tc.opts)
			if tc.err != nil {
				connErr(t, nil, err, "auth")
				if !errors.Is(err, tc.err) || mta.IsPermanent(err) {
					t.Errorf("%v", err)
				}
				if _, _, cmds, _, _, _ := s.session(0).snapshot(); tc.err == ErrAuthNeedsTLS && slices.ContainsFunc(cmds, func(s string) bool { return strings.HasPrefix(s, "AUTH") }) {
					t.Errorf("credentials sent in cleartext: %q", cmds)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if got := codes(send(t, c, msg("hi\r\n", "a@y.test"))); got[0] != 250 {
				t.Errorf("codes %v", got)
			}
			if _, _, _, _, _, user := s.session(0).snapshot(); user != "user" {
				t.Errorf("server saw user %q", user)
			}
		})
	}
}

func TestExtensionParameters(t *testing.T) {
	dsnMsg := &Message{From: "s@x.test", EnvID: "id+1 x", Ret: mta.ReturnHeaders, Data: []byte("hi\r\n"),
		Recipients: []mta.Recipient{
			{Address: "a+b@x", Notify: mta.NotifySuccess | mta.NotifyFailure, ORcptType: "rfc822", ORcpt: "a+b@x"},
			{Address: "c@x", Notify: mta.NotifyNever},
			{Address: "d@x"},
			{Address: "e@x", ORcptType: "utf-8", ORcpt: "δ+1@x"},
		}}
	eight := msg("caf\xc3\xa9\r\n", "a@x")
	eight.Body8Bit = true
	utf8 := msg("hi\r\n", "δ@x")
	utf8.SMTPUTF8 = true
	for _, tc := range []struct {
		name string
		sc   script
		m    *Message
		want []string // commands from MAIL to DATA
	}{
		{"dsn offered", script{dsn: true}, dsnMsg, []string{
			"MAIL FROM:<s@x.test> RET=HDRS ENVID=id+2B1+20x",
			"RCPT TO:<a+b@x> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2Bb@x",
			"RCPT TO:<c@x> NOTIFY=NEVER", "RCPT TO:<d@x>", `RCPT TO:<e@x> ORCPT=utf-8;\x{3B4}\x{2B}1@x`, "DATA"}},
		{"dsn not offered", script{}, dsnMsg, []string{
			"MAIL FROM:<s@x.test>", "RCPT TO:<a+b@x>", "RCPT TO:<c@x>", "RCPT TO:<d@x>", "RCPT TO:<e@x>", "DATA"}},
		{"size", script{size: "1000"}, msg("0123456789", "a@x"), []string{
			"MAIL FROM:<s@x.test> SIZE=10", "RCPT TO:<a@x>", "DATA"}},
		{"size without limit", script{size: ""}, msg("0123456789", "a@x"), []string{
			"MAIL FROM:<s@x.test>", "RCPT TO:<a@x>", "DATA"}},
		{"8bitmime offered", script{eightBit: true}, eight, []string{
			"MAIL FROM:<s@x.test> BODY=8BITMIME", "RCPT TO:<a@x>", "DATA"}},
		{"8bitmime not offered", script{}, eight, []string{"MAIL FROM:<s@x.test>", "RCPT TO:<a@x>", "DATA"}},
		{"smtputf8 offered", script{smtputf8: true, eightBit: true}, utf8, []string{
			"MAIL FROM:<s@x.test> SMTPUTF8", "RCPT TO:<δ@x>", "DATA"}},
		{"null sender", script{}, &Message{Recipients: []mta.Recipient{{Address: "a@x"}}, Data: []byte("x\r\n")},
			[]string{"MAIL FROM:<>", "RCPT TO:<a@x>", "DATA"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newServer(t, tc.sc)
			c := dialT(t, s, Options{})
			send(t, c, tc.m)
			c.Close()
			_, _, cmds, msgs, _, _ := s.session(0).snapshot()
			if got := cmds[1 : len(cmds)-1]; !slices.Equal(got, tc.want) {
				t.Errorf("commands\n%q\nwant\n%q", got, tc.want)
			}
			if len(msgs) != 1 {
				t.Errorf("messages %q", msgs)
			}
		})
	}
}

func TestRefusedWithoutSending(t *testing.T) {
	utf8 := msg("hi\r\n", "δ@x", "b@x")
	utf8.SMTPUTF8 = true
	for _, tc := range []struct {
		name string
		sc   script
		m    *Message
		want mta.Reply
	}{
		{"size exceeded", script{size: "100", pipelining: true}, msg(strings.Repeat("x", 200), "a@x", "b@x"),
			mta.Reply{Code: 552, Enhanced: mta.Enhanced{5, 3, 4}, Text: "message size exceeds localhost's limit of 100 bytes", Local: true}},
		{"smtputf8 not offered", script{pipelining: true}, utf8,
			mta.Reply{Code: 550, Enhanced: mta.Enhanced{5, 6, 7}, Text: "SMTPUTF8 required but not supported by localhost", Local: true}},
		{"8-bit header and body without 8BITMIME", script{pipelining: true}, msg("Subject: K\xc3\xa4se\r\n\r\nK\xc3\xa4se\r\n", "a@x", "b@x"),
			mta.Reply{Code: 554, Enhanced: mta.Enhanced{5, 6, 3}, Text: "localhost does not offer 8BITMIME, and the 8-bit message cannot be converted to 7 bits: 8-bit octets in a header", Local: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newServer(t, tc.sc)
			c := dialT(t, s, Options{})
			res := send(t, c, tc.m)
			for _, r := range res.Recipients {
				if *r != tc.want {
					t.Errorf("reply %+v, want %+v", r, tc.want)
				}
			}
			if !c.Usable() || c.Messages() != 0 {
				t.Errorf("usable %v messages %d", c.Usable(), c.Messages())
			}
			c.Close()
			if _, _, cmds, _, _, _ := s.session(0).snapshot(); len(cmds) != 2 {
				t.Errorf("commands %q", cmds)
			}
		})
	}
}

// TestEnhancedCodes: an enhanced code of the reply's class is read from
// the first line and stripped where lines repeat it, whether or not the
// server advertised ENHANCEDSTATUSCODES; one of another class is text.
func TestEnhancedCodes(t *testing.T) {
	for _, enhanced := range []bool{true, false} {
		s := newServer(t, script{enhanced: enhanced, rcpt: map[string]string{
			"a@x": "550-5.1.1 first line\r\n550-5.1.1\r\n550 5.1.1 second line",
			"b@x": "550 5.1.1", "c@x": "451 5.1.1 class mismatch",
		}})
		c := dialT(t, s, Options{})
		res := send(t, c, msg("hi\r\n", "a@x", "b@x", "c@x"))
		want := []mta.Reply{
			{Code: 550, Enhanced: mta.Enhanced{5, 1, 1}, Text: "first line second line"},
			{Code: 550, Enhanced: mta.Enhanced{5, 1, 1}},
			{Code: 451, Text: "5.1.1 class mismatch"},
		}
		// Without ENHANCEDSTATUSCODES the codes are read all the same
		// (as Postfix does): many servers write them without the keyword.
		for i, r := range res.Recipients {
			if *r != want[i] {
				t.Errorf("enhanced %v: %+v, want %+v", enhanced, *r, want[i])
			}
		}
	}
}

func TestReplyParsing(t *testing.T) {
	long := strings.Repeat("x", 700)
	if got := joinText([]string{"a\x01b", long}); len(got) != maxReplyText || !strings.HasPrefix(got, "a?b xx") {
		t.Errorf("joinText: %q", got)
	}
	if got := joinText([]string{strings.Repeat("x", 511) + "é"}); got != strings.Repeat("x", 511)+"?" {
		t.Errorf("joinText cut rune: %q", got[500:])
	}
	for _, tc := range []struct {
		in   string
		e    mta.Enhanced
		rest string
		ok   bool
	}{
		{"5.1.1 user unknown", mta.Enhanced{5, 1, 1}, " user unknown", true},
		{"5.7.26", mta.Enhanced{5, 7, 26}, "", true},
		{"5.1.1user", mta.Enhanced{}, "5.1.1user", false},
		{"4.1.1 x", mta.Enhanced{}, "4.1.1 x", false}, // class differs from 550
		{"5.1 x", mta.Enhanced{}, "5.1 x", false},
		{"5.1234.1 x", mta.Enhanced{}, "5.1234.1 x", false},
	} {
		e, rest, ok := parseEnhanced(tc.in, 550)
		if e != tc.e || rest != tc.rest || ok != tc.ok {
			t.Errorf("%q: %v %q %v", tc.in, e, rest, ok)
		}
	}
	if got := string(appendXtext(nil, "a+b=c d\xff~")); got != "a+2Bb+3Dc+20d+FF~" {
		t.Errorf("xtext %q", got)
	}
}

func TestTimeouts(t *testing.T) {
	short := Timeouts{Greeting: 200 * time.Millisecond, Command: 200 * time.Millisecond,
		DataInit: 200 * time.Millisecond, DataDone: 200 * time.Millisecond}
	for stage, want := range map[string]string{
		"GREETING": "greeting", "EHLO": "ehlo", "MAIL": "mail", "RCPT": "rcpt", "DATA": "data", "DOT": "dot",
	} {
		s := newServer(t, script{pipelining: true, replies: map[string]string{stage: "STALL"}})
		start := time.Now()
		opts := Options{LocalName: "client.test", Timeouts: short}
		c, err := Dial(context.Background(), s.addr(), "", opts)
		if err == nil {
			_, err = c.Send(context.Background(), msg("hi\r\n", "a@x"))
			defer c.Close()
		}
		e := connErr(t, c, err, want)
		if !e.Timeout() || e.Reply != nil || mta.IsPermanent(err) {
			t.Errorf("%s: %v", stage, err)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("%s: took %v", stage, d)
		}
	}
}

func TestContextCancel(t *testing.T) {
	s := newServer(t, script{pipelining: true, replies: map[string]string{"DOT": "STALL"}})
	c := dialT(t, s, Options{})

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.Send(ctx, msg("hi\r\n", "a@x")); !errors.Is(err, context.Canceled) || !c.Usable() {
		t.Fatalf("already cancelled: %v usable %v", err, c.Usable())
	}

	ctx, cancel = context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := c.Send(ctx, msg("hi\r\n", "a@x"))
	connErr(t, c, err, "dot")
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 3*time.Second {
		t.Errorf("%v after %v", err, time.Since(start))
	}

	s2 := newServer(t, script{replies: map[string]string{"GREETING": "STALL"}})
	ctx, cancel = context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	_, err = Dial(ctx, s2.addr(), "", Options{LocalName: "client.test"})
	connErr(t, nil, err, "greeting")
	if !errors.Is(err, context.Canceled) {
		t.Errorf("%v", err)
	}
}

func TestClose(t *testing.T) {
	s := newServer(t, script{})
	c := dialT(t, s, Options{})
	if !c.Usable() {
		t.Fatal("new conn unusable")
	}
	first, second := c.Close(), c.Close()
	if first != nil || second != nil || c.Usable() {
		t.Error("Close not idempotent")
	}
	if _, err := c.Send(context.Background(), msg("hi\r\n", "a@x")); !errors.Is(err, ErrUnusable) {
		t.Errorf("Send after Close: %v", err)
	}
	if _, _, cmds, _, _, _ := s.session(0).snapshot(); !slices.Equal(cmds, []string{"EHLO client.test", "QUIT"}) {
		t.Errorf("commands %q", cmds)
	}
}

func TestErrorUnwrap(t *testing.T) {
	e := &Error{Stage: "rcpt", Host: "mx", Addr: "1.2.3.4:25", Reply: &mta.Reply{Code: 550, Text: "no"}}
	var r *mta.Reply
	if !errors.As(error(e), &r) || r.Code != 550 || !mta.IsPermanent(e) || !e.Permanent() {
		t.Error("reply not found")
	}
	if e.Error() != "mx[1.2.3.4]:25 said at rcpt: 550 no" {
		t.Error(e.Error())
	}
	io := &Error{Stage: "data", Host: "mx", Err: errors.New("boom")}
	if mta.IsPermanent(io) || io.Permanent() || len(io.Unwrap()) != 1 || io.Error() != "mx at data: boom" {
		t.Error(io.Error())
	}
	refused := &Error{Stage: "connect", Host: "mx.example.net", Addr: "192.0.2.1:25",
		Err: &net.OpError{Op: "dial", Net: "tcp", Err: &os.SyscallError{Syscall: "connect", Err: syscall.ECONNREFUSED}}}
	if got := refused.Error(); got != "connect to mx.example.net[192.0.2.1]:25: connection refused" {
		t.Error(got)
	}
	timeout := &Error{Stage: "connect", Host: "192.0.2.1:25", Addr: "192.0.2.1:25", Err: os.ErrDeadlineExceeded}
	if got := timeout.Error(); got != "connect to 192.0.2.1:25: timed out" {
		t.Error(got)
	}
}

// TestSMTPUTF8OnlyWhenNeeded: a message the client sent with SMTPUTF8 but
// whose envelope and header are ASCII goes to a server without SMTPUTF8.
func TestSMTPUTF8OnlyWhenNeeded(t *testing.T) {
	ascii := msg("Subject: plain\r\n\r\nhi\r\n", "a@x", "b@x")
	ascii.SMTPUTF8 = true
	s := newServer(t, script{pipelining: true})
	c := dialT(t, s, Options{})
	res := send(t, c, ascii)
	for _, r := range res.Recipients {
		if r.Code != 250 {
			t.Fatalf("replies %+v", res.Recipients)
		}
	}
	c.Close()
	if _, _, cmds, _, _, _ := s.session(0).snapshot(); len(cmds) < 2 || strings.Contains(strings.Join(cmds, " "), "SMTPUTF8") {
		t.Fatalf("commands %q: MAIL must not carry SMTPUTF8", cmds)
	}
}

// TestEightBitBodyConvertedWithout8BITMIME: to a server that does not offer
// 8BITMIME, an 8-bit body arrives as quoted-printable, without BODY=8BITMIME,
// and decodes to what was sent; a server that offers it gets the octets as
// they are.
func TestEightBitBodyConvertedWithout8BITMIME(t *testing.T) {
	body := "Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n" + strings.Repeat("\xc3\xa9", 600) + "\r\n"
	data := "From: s@x.test\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body
	for _, offered := range []bool{false, true} {
		s := newServer(t, script{eightBit: offered, pipelining: true})
		c := dialT(t, s, Options{})
		m := msg(data, "a@x")
		m.Body8Bit = true
		if res := send(t, c, m); res.Recipients[0].Code != 250 {
			t.Fatalf("8BITMIME offered %v: reply %+v", offered, res.Recipients[0])
		}
		c.Close()
		_, _, cmds, msgs, _, _ := s.session(0).snapshot()
		got := strings.TrimSuffix(strings.ReplaceAll(msgs[0], "\r\n..", "\r\n."), ".\r\n")
		if offered {
			if got != data || cmds[1] != "MAIL FROM:<s@x.test> BODY=8BITMIME" {
				t.Errorf("with 8BITMIME the message changed or the parameter is missing: %q %q", cmds[1], got)
			}
			continue
		}
		if cmds[1] != "MAIL FROM:<s@x.test>" {
			t.Errorf("MAIL without 8BITMIME offered: %q", cmds[1])
		}
		for i := 0; i < len(got); i++ {
			if got[i] >= 0x80 {
				t.Fatalf("8-bit octet reached a server without 8BITMIME: %q", got)
			}
		}
		head, qp, ok := strings.Cut(got, "\r\n\r\n")
		if !ok || !strings.Contains(head, "Content-Transfer-Encoding: quoted-printable") || strings.Contains(head, "8bit") {
			t.Fatalf("header not relabelled: %q", head)
		}
		decoded, err := io.ReadAll(quotedprintable.NewReader(strings.NewReader(qp)))
		if err != nil || string(decoded) != body {
			t.Errorf("decoded body %q (%v), want %q", decoded, err, body)
		}
	}
}
