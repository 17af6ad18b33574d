package smtpd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/mtaproject/mta/mta"
)

func TestEHLOAdvertisesExtensions(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	ehlo := w.cmdExpect("EHLO client.test", "250-")
	for _, ext := range []string{"PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN", "MT-PRIORITY", "STARTTLS", "SIZE 65536", "AUTH PLAIN LOGIN"} {
		if !strings.Contains(ehlo, "250-"+ext+"\n") && !strings.HasSuffix(ehlo, "250 "+ext) {
			t.Errorf("EHLO does not advertise %s:\n%s", ext, ehlo)
		}
	}
}

func TestAcceptedMessageIsStoredByteForByte(t *testing.T) {
	ts := startServer(t, nil)
	c, err := smtp.Dial(ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := "From: a@example.org\r\nTo: b@remote.test\r\nSubject: hi\r\n\r\nline one\r\n.leading dot\r\n"
	if err := c.Mail("a@example.org", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("b@remote.test", nil); err != nil {
		t.Fatal(err)
	}
	wc, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprint(wc, msg)
	resp, err := wc.CloseWithResponse()
	if err != nil {
		t.Fatal(err)
	}
	id := queuedID(t, "250 "+resp.StatusText)
	m, body := storedMessage(t, ts.spool, id)
	if body != msg {
		t.Fatalf("stored %q, want %q", body, msg)
	}
	if m.From != "a@example.org" || len(m.Recipients) != 1 || m.Recipients[0].Address != "b@remote.test" || m.ClientIP != "127.0.0.1" || m.HELO != "localhost" {
		t.Fatalf("record %+v", m)
	}
	raw, _ := ts.spool.Body(id)
	hdr := string(raw[:len(raw)-len(body)])
	for _, want := range []string{"Received: from localhost ([127.0.0.1])\r\n\tby mx.test (mta) with ESMTP id " + id, "\r\n\tfor <b@remote.test>; "} {
		if !strings.Contains(hdr, want) {
			t.Errorf("Received header %q lacks %q", hdr, want)
		}
	}
	if got := testutil.ToFloat64(ts.metrics.accepted.WithLabelValues("smtp")); got != 1 {
		t.Errorf("accepted metric = %v", got)
	}
}

func TestDSNParametersAreStored(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org> RET=HDRS ENVID=QQ+2Bid", "250")
	w.cmdExpect("RCPT TO:<b@remote.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+40orig.test", "250")
	w.cmdExpect("RCPT TO:<c@remote.test> NOTIFY=NEVER", "250")
	w.cmdExpect("MAIL FROM:<x@example.org>", "503 5.5.1") // nested MAIL
	w.cmdExpect("DATA", "354")
	id := queuedID(t, w.cmd("Subject: dsn\r\n\r\nbody\r\n."))
	m, _ := storedMessage(t, ts.spool, id)
	if m.Ret != mta.ReturnHeaders || m.EnvID != "QQ+id" {
		t.Fatalf("RET/ENVID = %q/%q", m.Ret, m.EnvID)
	}
	r0, r1 := m.Recipients[0], m.Recipients[1]
	if r0.Notify != mta.NotifySuccess|mta.NotifyFailure || !strings.EqualFold(r0.ORcptType, "rfc822") || r0.ORcpt != "b@orig.test" || r1.Notify != mta.NotifyNever {
		t.Fatalf("recipients %+v", m.Recipients)
	}
	// Malformed parameters get 501.
	w.cmdExpect("MAIL FROM:<a@example.org> RET=SOME", "501 5.5.4")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	w.cmdExpect("RCPT TO:<b@remote.test> NOTIFY=NEVER,SUCCESS", "501 5.5.4")
	w.cmdExpect("RCPT TO:<b@remote.test> ORCPT=rfc822", "501 5.5.4")
}

func TestRelayPolicy(t *testing.T) {
	ts := startServer(t, func(o *Options) {
		o.Trusted = func(netip.Addr) bool { return false } // loopback is an outsider here
	})
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO outsider.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	if got := w.cmd("RCPT TO:<victim@elsewhere.test>"); got != "554 5.7.1 Relay access denied" {
		t.Fatalf("relay attempt → %q", got)
	}
	w.cmdExpect("RCPT TO:<user@LOCAL.test>", "250") // local domains are open to all
	w.cmdExpect("RCPT TO:<nodomain>", "501 ")
	w.cmdExpect("RSET", "250")
	// After AUTH the same client may relay.
	w.cmdExpect("AUTH PLAIN "+plainIR("alice", "s3cret"), "235 2.7.0")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	w.cmdExpect("RCPT TO:<victim@elsewhere.test>", "250")
	if got := ts.rejections("relay_denied"); got != 1 {
		t.Fatalf("relay_denied metric = %v", got)
	}
}

func plainIR(user, pass string) string {
	_, ir, _ := sasl.NewPlainClient("", user, pass).Start()
	return b64(ir)
}

func TestSubmissionRequiresAuth(t *testing.T) {
	ts := startServer(t, func(o *Options) { o.Submission = true; o.Name = "smtp" })
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	if got := w.cmd("MAIL FROM:<a@example.org>"); got != "530 5.7.0 Authentication required" {
		t.Fatalf("MAIL without AUTH on submission → %q", got)
	}
	w.cmdExpect("AUTH PLAIN "+plainIR("alice", "wrong"), "535 5.7.8")
	w.cmdExpect("AUTH LOGIN", "334 VXNlcm5hbWU6") // "Username:"
	w.cmdExpect(b64([]byte("alice")), "334 UGFzc3dvcmQ6")
	w.cmdExpect(b64([]byte("s3cret")), "235 2.7.0")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
}

func TestAuthNeedsTLSUnlessLoopbackAllowed(t *testing.T) {
	ts := startServer(t, func(o *Options) { o.CleartextAuthFromLoopback = false })
	w := dial(t, ts.addr)
	ehlo := w.cmdExpect("EHLO client.test", "250")
	if strings.Contains(ehlo, "AUTH") {
		t.Fatalf("AUTH advertised in cleartext:\n%s", ehlo)
	}
	w.cmdExpect("AUTH PLAIN "+plainIR("alice", "s3cret"), "538 5.7.11")

	// Over STARTTLS, with go-smtp's client: AUTH is offered and works.
	c, err := smtp.DialStartTLS(ts.addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if ok, mechs := c.Extension("AUTH"); !ok || !strings.Contains(mechs, "PLAIN") || !strings.Contains(mechs, "LOGIN") {
		t.Fatalf("AUTH after STARTTLS: %v %q", ok, mechs)
	}
	if err := c.Auth(sasl.NewPlainClient("", "alice", "wrong")); err == nil {
		t.Fatal("wrong password accepted")
	}
	if err := c.Auth(sasl.NewPlainClient("", "alice", "s3cret")); err != nil {
		t.Fatal(err)
	}
	if err := c.SendMail("a@example.org", []string{"b@remote.test"}, strings.NewReader("Subject: tls\r\n\r\nx\r\n")); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(ts.metrics.auth.WithLabelValues("success")); got != 1 {
		t.Fatalf("auth success metric = %v", got)
	}
	list, _ := ts.spool.List("", 10)
	if len(list) != 1 || list[0].AuthUser != "alice" {
		t.Fatalf("spool after TLS send: %+v", list)
	}
	body, _ := ts.spool.Body(list[0].ID)
	if !strings.Contains(string(body), "with ESMTPSA id") {
		t.Fatalf("Received header does not say ESMTPSA: %q", body)
	}
}

func TestSizeLimit(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	if got := w.cmd("MAIL FROM:<a@example.org> SIZE=1000000"); !strings.HasPrefix(got, "552 5.3.4") {
		t.Fatalf("MAIL with SIZE over limit → %q", got)
	}
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	w.cmdExpect("RCPT TO:<b@remote.test>", "250")
	w.cmdExpect("DATA", "354")
	line := strings.Repeat("x", 900) + "\r\n"
	w.send(strings.Repeat(line, 100)) // 90 KB > 64 KiB
	if got := w.cmd("."); got != "552 5.3.4 Message size exceeds fixed limit" {
		t.Fatalf("oversized data → %q", got)
	}
	// The session goes on, and nothing was stored.
	w.cmdExpect("NOOP", "250")
	if ts.spool.Count() != 0 || ts.rejections("message_too_big") != 2 { // at MAIL and at the end of data
		t.Fatalf("count %d, metric %v", ts.spool.Count(), ts.rejections("message_too_big"))
	}
}

func TestRecipientLimit(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	for i := 0; i < 5; i++ {
		w.cmdExpect(fmt.Sprintf("RCPT TO:<r%d@remote.test>", i), "250")
	}
	if got := w.cmd("RCPT TO:<r5@remote.test>"); got != "452 4.5.3 Too many recipients" {
		t.Fatalf("sixth recipient → %q", got)
	}
	w.cmdExpect("DATA", "354")
	id := queuedID(t, w.cmd("Subject: five\r\n\r\n."))
	m, _ := storedMessage(t, ts.spool, id)
	if len(m.Recipients) != 5 {
		t.Fatalf("%d recipients stored", len(m.Recipients))
	}
}

func TestLineLengthLimit(t *testing.T) {
	ts := startServer(t, nil)
	w := dial(t, ts.addr)
	w.cmdExpect("EHLO client.test", "250")
	w.cmdExpect("MAIL FROM:<a@example.org>", "250")
	w.cmdExpect("RCPT TO:<b@remote.test>", "250")
	w.cmdExpect("DATA", "354")
	w.send("Subject: long\r\n\r\n" + strings.Repeat("y", 1500) + "\r\n.\r\n")
	if got := w.reply(); got != "554 5.6.0 Message contains a line longer than 1000 octets" {
		t.Fatalf("long line → %q", got)
	}
	if ts.spool.Count() != 0 {
		t.Fatal("message with an over-long line stored")
	}
	// A too-long command line is refused too.
	w2 := dial(t, ts.addr)
	w2.cmdExpect("NOOP "+strings.Repeat("z", 1500), "500 5.5.2")
}

func TestConnectionLimits(t *testing.T) {
	ts := startServer(t, func(o *Options) { o.Limits = NewConnLimits(3, 2) })
	dial(t, ts.addr)
	dial(t, ts.addr)
	// A third connection from the same IP is over the per-IP limit.
	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	w := &wire{t: t, conn: c, r: newReader(c)}
	if got := w.reply(); got != "421 4.7.0 Too many connections from your address, please try again later" {
		t.Fatalf("over per-IP limit → %q", got)
	}
	c.Close()
	// From another loopback address: under the per-IP limit, at the total.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	c2, err := d.Dial("tcp", ts.addr)
	if err != nil {
		t.Skipf("cannot bind 127.0.0.2: %v", err)
	}
	w2 := &wire{t: t, conn: c2, r: newReader(c2)}
	w2.expect("220 ")
	c3, err := d.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	w3 := &wire{t: t, conn: c3, r: newReader(c3)}
	if got := w3.reply(); got != "421 4.3.2 Too many connections, please try again later" {
		t.Fatalf("over total limit → %q", got)
	}
	// Closing one frees its slot.
	c2.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		c4, err := d.Dial("tcp", ts.addr)
		if err != nil {
			t.Fatal(err)
		}
		w4 := &wire{t: t, conn: c4, r: newReader(c4)}
		got := w4.reply()
		c4.Close()
		if strings.HasPrefix(got, "220 ") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("slot never freed: %q", got)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestCommandTimeout(t *testing.T) {
	ts := startServer(t, func(o *Options) { o.CommandTimeout = 200 * time.Millisecond })
	w := dial(t, ts.addr)
	if got := w.reply(); !strings.HasPrefix(got, "421 4.4.2") {
		t.Fatalf("idle client → %q", got)
	}
}

type failingSpool struct {
	err   error
	panic bool
}

func (f failingSpool) NewID() string { return "0123456789ABCDEF" }
func (f failingSpool) Room(int64) error {
	return nil
}
func (f failingSpool) Accept(string, *mta.Envelope, []byte, []byte) error {
	if f.panic {
		panic("boom")
	}
	return f.err
}

func TestSpoolFailuresAreExplicitReplies(t *testing.T) {
	for _, tc := range []struct {
		name   string
		spool  failingSpool
		want   string
		metric string
	}{
		{"io error", failingSpool{err: errors.New("pebble: disk on fire /secret/path")}, "451 4.3.0 Temporary local problem, please try again later", "spool_error"},
		{"disk full", failingSpool{err: fmt.Errorf("wrapped: %w", mta.ErrStorageFull)}, "452 4.3.1 Insufficient system storage, please try again later", "storage_full"},
		{"panic", failingSpool{panic: true}, "451 4.3.0 Internal error, please try again later", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := startServer(t, func(o *Options) { o.Spool = tc.spool })
			w := dial(t, ts.addr)
			w.cmdExpect("EHLO client.test", "250")
			w.cmdExpect("MAIL FROM:<a@example.org>", "250")
			w.cmdExpect("RCPT TO:<b@remote.test>", "250")
			w.cmdExpect("DATA", "354")
			if got := w.cmd("Subject: x\r\n\r\ny\r\n."); got != tc.want {
				t.Fatalf("reply %q, want %q", got, tc.want)
			}
			w.cmdExpect("NOOP", "250") // the session survives
			if tc.metric != "" && ts.rejections(tc.metric) != 1 {
				t.Fatalf("metric %s not counted", tc.metric)
			}
			if tc.spool.panic && testutil.ToFloat64(ts.metrics.panics) != 1 {
				t.Fatal("panic not counted")
			}
		})
	}
}

func TestDiskReserveRefusesAtMAIL(t *testing.T) {
	ts := startServer(t, nil)
	full := startServer(t, func(o *Options) { o.Spool = reserveSpool{ts.spool} })
	w := dial(t, full.addr)
	w.cmdExpect("EHLO client.test", "250")
	if got := w.cmd("MAIL FROM:<a@example.org> SIZE=100"); got != "452 4.3.1 Insufficient system storage, please try again later" {
		t.Fatalf("MAIL with the disk below the reserve → %q", got)
	}
}

// reserveSpool is the real spool with a reserve no disk can meet.
type reserveSpool struct{ Spooler }

func (r reserveSpool) Room(size int64) error { return r.Spooler.Room(size + 1<<61) }

func TestGracefulShutdownFinishesTransactions(t *testing.T) {
	ts := startServer(t, nil)
	idle := dial(t, ts.addr)
	idle.cmdExpect("EHLO idle.test", "250")
	busy := dial(t, ts.addr)
	busy.cmdExpect("EHLO busy.test", "250")
	busy.cmdExpect("MAIL FROM:<a@example.org>", "250")
	busy.cmdExpect("RCPT TO:<b@remote.test>", "250")
	busy.cmdExpect("DATA", "354")
	busy.send("Subject: in flight\r\n\r\n")

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- ts.srv.Shutdown(ctx)
	}()
	if got := idle.reply(); !strings.HasPrefix(got, "421 ") {
		t.Fatalf("idle connection at shutdown → %q", got)
	}
	time.Sleep(100 * time.Millisecond)
	// The transaction in flight still completes.
	id := queuedID(t, busy.cmd("still here\r\n."))
	if _, err := ts.spool.Get(id); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if _, err := net.DialTimeout("tcp", ts.addr, time.Second); err == nil {
		t.Fatal("still accepting after shutdown")
	}
}

func TestConcurrentSessions(t *testing.T) {
	ts := startServer(t, nil)
	const sessions, each = 20, 10
	var wg sync.WaitGroup
	errs := make(chan error, sessions)
	for i := 0; i < sessions; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			c, err := smtp.Dial(ts.addr)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			for j := 0; j < each; j++ {
				msg := fmt.Sprintf("Subject: %d-%d\r\n\r\nbody\r\n", i, j)
				if err := c.SendMail("a@example.org", []string{"b@remote.test"}, strings.NewReader(msg)); err != nil {
					errs <- err
					return
				}
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if ts.spool.Count() != sessions*each {
		t.Fatalf("spool holds %d, want %d", ts.spool.Count(), sessions*each)
	}
}

// TestShutdownTimeoutClosesSessions: a transaction that does not finish
// within the shutdown timeout gets 421, not 250, its connection is
// closed, and nothing is stored after Shutdown returns.
func TestShutdownTimeoutClosesSessions(t *testing.T) {
	ts := startServer(t, nil)
	slow := dial(t, ts.addr)
	slow.cmdExpect("EHLO slow.test", "250")
	slow.cmdExpect("MAIL FROM:<a@example.org>", "250")
	slow.cmdExpect("RCPT TO:<b@remote.test>", "250")
	slow.cmdExpect("DATA", "354")
	slow.send("Subject: never finished\r\n\r\n")
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := ts.srv.Shutdown(ctx); err == nil {
		t.Fatal("Shutdown reported success with a transaction still open")
	}
	slow.expect("421 4.3.2 ")
	slow.expectClosed()
	if ts.spool.Count() != 0 {
		t.Fatal("the unfinished message was stored")
	}
}
