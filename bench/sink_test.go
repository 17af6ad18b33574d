package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func startTestSink(t *testing.T, cfg SinkConfig) *Sink {
	t.Helper()
	s, err := StartSink(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// sinkClient is a minimal hand-written SMTP client for the sink tests.
type sinkClient struct {
	t  *testing.T
	c  net.Conn
	br *bufio.Reader
}

func dialSink(t *testing.T, addr string) *sinkClient {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(5 * time.Second))
	return &sinkClient{t: t, c: c, br: bufio.NewReader(c)}
}

func (c *sinkClient) send(s string) {
	c.t.Helper()
	if _, err := io.WriteString(c.c, s); err != nil {
		c.t.Fatal(err)
	}
}

// reply reads one possibly multi-line reply and returns its code and lines.
func (c *sinkClient) reply() (int, []string, error) {
	var lines []string
	for {
		l, err := c.br.ReadString('\n')
		if err != nil {
			return 0, lines, err
		}
		l = strings.TrimRight(l, "\r\n")
		lines = append(lines, l)
		if len(l) < 3 {
			return 0, lines, errors.New("short reply line " + strconv.Quote(l))
		}
		if len(l) == 3 || l[3] == ' ' {
			code, err := strconv.Atoi(l[:3])
			return code, lines, err
		}
	}
}

// expect reads a reply and fails unless its code is code; it returns the
// reply's text.
func (c *sinkClient) expect(code int) string {
	c.t.Helper()
	got, lines, err := c.reply()
	if err != nil || got != code {
		c.t.Fatalf("reply %d %q (err %v), want %d", got, lines, err, code)
	}
	return strings.Join(lines, "\n")
}

func (c *sinkClient) cmd(line string, code int) string {
	c.t.Helper()
	c.send(line + "\r\n")
	return c.expect(code)
}

// expectClosed fails unless the server closed the connection.
func (c *sinkClient) expectClosed() {
	c.t.Helper()
	if l, err := c.br.ReadString('\n'); err == nil {
		c.t.Fatalf("read %q, want the connection closed", l)
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		c.t.Fatal("connection not closed")
	}
}

func TestSinkCountsExact(t *testing.T) {
	for _, pipe := range []bool{false, true} {
		t.Run("pipelining="+strconv.FormatBool(pipe), func(t *testing.T) {
			s := startTestSink(t, SinkConfig{})
			var bytesSent atomic.Int64
			res, err := RunLoad(context.Background(), LoadConfig{
				Addr: s.Addr(), Sessions: 4, Messages: 300, MessagesPerSession: 40,
				RecipientsPerMessage: 3, Pipelining: pipe, SizeDist: []SizeWeight{{300, 1}, {5000, 1}, {70000, 1}},
				OnAccepted: func(_ string, msg []byte) { bytesSent.Add(int64(len(msg))) },
			})
			if err != nil {
				t.Fatal(err)
			}
			if res.Accepted != 300 {
				t.Fatalf("accepted %d of 300: %+v", res.Accepted, res)
			}
			want := SinkStats{
				Connections: int64(res.Connections), Messages: 300, Recipients: 900,
				Bytes: bytesSent.Load(), MaxMessagesPerConn: 40,
			}
			if got := s.Stats(); got != want {
				t.Fatalf("stats %+v\nwant  %+v", got, want)
			}
			if m := s.Messages(); len(m) != 0 {
				t.Fatalf("%d messages kept without Keep", len(m))
			}
		})
	}
}

func TestSinkKeep(t *testing.T) {
	s := startTestSink(t, SinkConfig{Keep: true})
	var cb []SinkMessage
	var mu sync.Mutex
	s.OnMessage(func(m SinkMessage) {
		mu.Lock()
		cb = append(cb, m)
		mu.Unlock()
	})
	var sent [][]byte
	_, err := RunLoad(context.Background(), LoadConfig{
		Addr: s.Addr(), Messages: 40, RecipientsPerMessage: 2, Pipelining: true, Seed: 7,
		SizeDist:   []SizeWeight{{200, 1}, {3000, 1}, {100000, 1}, {300000, 1}},
		OnAccepted: func(_ string, msg []byte) { sent = append(sent, bytes.Clone(msg)) },
	})
	if err != nil {
		t.Fatal(err)
	}
	got := s.Messages()
	if len(got) != len(sent) || len(cb) != len(sent) || len(sent) != 40 {
		t.Fatalf("kept %d, callback %d, sent %d", len(got), len(cb), len(sent))
	}
	var total int64
	for i, m := range got {
		if !bytes.Equal(m.Data, sent[i]) {
			t.Fatalf("message %d: kept %d bytes differ from the %d sent", i, len(m.Data), len(sent[i]))
		}
		if m.From != "loadgen@bench.test" || len(m.To) != 2 || m.To[1] != "user2@example.com" || m.ConnID != 1 || m.Received.IsZero() {
			t.Fatalf("message %d envelope: %+v", i, m)
		}
		if !bytes.Equal(cb[i].Data, m.Data) {
			t.Fatalf("callback message %d differs", i)
		}
		total += int64(len(m.Data))
	}
	if st := s.Stats(); st.Bytes != total {
		t.Fatalf("Bytes = %d, kept %d", st.Bytes, total)
	}

	// Dot-stuffing edge cases, written one byte at a time so that the
	// terminator is split across reads.
	c := dialSink(t, s.Addr())
	c.expect(220)
	c.cmd("EHLO x", 250)
	for _, content := range []string{"", ".\r\n", "..\r\n.x\r\n\r\n", "a\r\n.\r\nb\r\n", "a\n.\n.\r\n"} {
		c.cmd("MAIL FROM:<>", 250)
		c.cmd("RCPT TO:<a@b>", 250)
		c.cmd("DATA", 354)
		wire := string(sinkStuff([]byte(content))) + ".\r\n"
		for i := range len(wire) {
			c.send(wire[i : i+1])
			time.Sleep(100 * time.Microsecond)
		}
		c.expect(250)
		all := s.Messages()
		if m := all[len(all)-1]; string(m.Data) != content || m.From != "" || m.ConnID != 2 {
			t.Fatalf("kept %q from %q conn %d, want %q", m.Data, m.From, m.ConnID, content)
		}
	}
	c.cmd("QUIT", 221)
	c.expectClosed()
}

// sinkStuff dot-stuffs msg (which must end in CRLF or be empty).
func sinkStuff(msg []byte) []byte {
	var out []byte
	for len(msg) > 0 {
		if msg[0] == '.' {
			out = append(out, '.')
		}
		i := bytes.IndexByte(msg, '\n')
		out = append(out, msg[:i+1]...)
		msg = msg[i+1:]
	}
	return out
}

// chunkReader returns at most n bytes per Read.
type chunkReader struct {
	r io.Reader
	n int
}

func (c chunkReader) Read(p []byte) (int, error) { return c.r.Read(p[:min(len(p), c.n)]) }

func TestSinkReadData(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	const alphabet = "..\r\n\nab"
	for iter := range 3000 {
		n := rng.IntN(60)
		if iter%100 == 0 {
			n = rng.IntN(5000)
		}
		content := make([]byte, n)
		for i := range content {
			content[i] = alphabet[rng.IntN(len(alphabet))]
		}
		if n > 0 && !bytes.HasSuffix(content, []byte("\r\n")) {
			content = append(content, '\r', '\n')
		}
		wire := append(sinkStuff(content), ".\r\nQUIT\r\n"...)
		chunk := []int{1, 2, 3, 4, 5, 7, 16, 4096}[iter%8]
		br := bufio.NewReaderSize(chunkReader{bytes.NewReader(wire), chunk}, 16)
		keep := iter%2 == 0
		size, data, err := sinkReadData(br, []byte("prefix"), keep, false)
		if err != nil {
			t.Fatal(err)
		}
		rest, _ := io.ReadAll(br)
		if size != int64(len(content)) || string(rest) != "QUIT\r\n" {
			t.Fatalf("wire %q in chunks of %d: size %d, rest %q", wire, chunk, size, rest)
		}
		want := "prefix"
		if keep {
			want += string(content)
		}
		if string(data) != want {
			t.Fatalf("wire %q in chunks of %d: data %q", wire, chunk, data)
		}
	}
	br := bufio.NewReader(strings.NewReader("abc\r\n.\r\n"))
	if _, _, err := sinkReadData(br, nil, true, true); err != errSinkDrop {
		t.Fatalf("drop: %v", err)
	}
	br = bufio.NewReader(strings.NewReader("abc\r\n"))
	if _, _, err := sinkReadData(br, nil, true, false); err != io.EOF {
		t.Fatalf("truncated: %v", err)
	}
}

func within(t *testing.T, what string, got, want, tol float64) {
	t.Helper()
	if math.Abs(got-want) > tol {
		t.Errorf("%s = %.4f, want %.3f ± %.3f", what, got, want, tol)
	} else {
		t.Logf("%s = %.4f", what, got)
	}
}

func TestSinkFaultRates(t *testing.T) {
	t.Run("data", func(t *testing.T) {
		s := startTestSink(t, SinkConfig{Seed: 1, Faults: Faults{DataTempFail: 0.1, DataPermFail: 0.05}})
		res, err := RunLoad(context.Background(), LoadConfig{Addr: s.Addr(), Sessions: 4, Messages: 5000, Size: 300, Pipelining: true})
		if err != nil {
			t.Fatal(err)
		}
		within(t, "temp rate", float64(res.TempFailed)/5000, 0.1, 0.02)
		within(t, "perm rate", float64(res.PermFailed)/5000, 0.05, 0.02)
		st := s.Stats()
		if st.TempFails != int64(res.TempFailed) || st.PermFails != int64(res.PermFailed) || st.Messages != int64(res.Accepted) {
			t.Fatalf("stats %+v, load %+v", st, res)
		}
	})
	t.Run("rcpt", func(t *testing.T) {
		s := startTestSink(t, SinkConfig{Seed: 2, Faults: Faults{RcptPermFail: 0.2}})
		res, err := RunLoad(context.Background(), LoadConfig{Addr: s.Addr(), Sessions: 2, Messages: 4000, Size: 300, RecipientsPerMessage: 2})
		if err != nil {
			t.Fatal(err)
		}
		within(t, "rcpt reject rate", float64(res.RcptRejected)/8000, 0.2, 0.02)
		within(t, "message perm rate", float64(res.PermFailed)/4000, 0.04, 0.015)
		st := s.Stats()
		if st.PermFails != int64(res.RcptRejected) || st.Recipients != int64(8000-res.RcptRejected) || st.Messages != int64(res.Accepted) {
			t.Fatalf("stats %+v, load %+v", st, res)
		}
	})
	t.Run("mail", func(t *testing.T) {
		s := startTestSink(t, SinkConfig{Seed: 3, Faults: Faults{MailTempFail: 0.1, MailPermFail: 0.1}})
		res, err := RunLoad(context.Background(), LoadConfig{Addr: s.Addr(), Sessions: 2, Messages: 5000, Size: 300, Pipelining: true})
		if err != nil {
			t.Fatal(err)
		}
		within(t, "temp rate", float64(res.TempFailed)/5000, 0.1, 0.02)
		within(t, "perm rate", float64(res.PermFailed)/5000, 0.1, 0.02)
	})
	t.Run("deterministic", func(t *testing.T) {
		run := func() (LoadResult, SinkStats) {
			s := startTestSink(t, SinkConfig{Seed: 42, Faults: Faults{MailTempFail: 0.05, RcptTempFail: 0.1, DataPermFail: 0.1}})
			res, err := RunLoad(context.Background(), LoadConfig{Addr: s.Addr(), Messages: 300, Size: 300, RecipientsPerMessage: 2, MessagesPerSession: 50})
			if err != nil {
				t.Fatal(err)
			}
			return res, s.Stats()
		}
		r1, s1 := run()
		r2, s2 := run()
		if s1 != s2 || r1.Accepted != r2.Accepted || r1.TempFailed != r2.TempFailed {
			t.Fatalf("same seed, different outcome:\n%+v\n%+v", s1, s2)
		}
	})
}

func TestSinkLatency(t *testing.T) {
	s := startTestSink(t, SinkConfig{})
	const lat = 30 * time.Millisecond
	s.SetFaults(Faults{Latency: lat})
	res, err := RunLoad(context.Background(), LoadConfig{Addr: s.Addr(), Sessions: 2, Messages: 10, Pipelining: true})
	if err != nil {
		t.Fatal(err)
	}
	if p50 := res.Latency.Median(); p50 < lat {
		t.Fatalf("p50 %v < injected %v", p50, lat)
	}
	// Per session: greeting, EHLO, 5 x (MAIL group + end of data).
	if min := (2 + 5*2) * lat; res.Elapsed < min {
		t.Fatalf("elapsed %v, want >= %v", res.Elapsed, min)
	}
	func() {
		defer func() {
			if recover() == nil {
				t.Error("SetFaults with a rate > 1 did not panic")
			}
		}()
		s.SetFaults(Faults{DataTempFail: 1.5})
	}()
}

func TestSinkMaxConns(t *testing.T) {
	s := startTestSink(t, SinkConfig{MaxConns: 2})
	c1, c2 := dialSink(t, s.Addr()), dialSink(t, s.Addr())
	c1.expect(220)
	c2.expect(220)
	c3 := dialSink(t, s.Addr())
	if txt := c3.expect(421); txt != "421 4.7.0 Too many connections" {
		t.Fatalf("refusal %q", txt)
	}
	c3.expectClosed()
	c1.cmd("QUIT", 221)
	c1.expectClosed()
	// The slot is freed once the server noticed the close.
	for deadline := time.Now().Add(3 * time.Second); ; {
		c := dialSink(t, s.Addr())
		code, _, err := c.reply()
		if err == nil && code == 220 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no slot after a connection closed: %d %v", code, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if st := s.Stats(); st.Connections != 3 || st.ConnectionsRefused < 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestSinkDown(t *testing.T) {
	s := startTestSink(t, SinkConfig{Down: true})
	c := dialSink(t, s.Addr())
	if txt := c.expect(421); !strings.HasPrefix(txt, "421 4.3.2 ") {
		t.Fatalf("down reply %q", txt)
	}
	c.expectClosed()
	res, _ := RunLoad(context.Background(), LoadConfig{Addr: s.Addr(), Messages: 2})
	if res.Accepted != 0 {
		t.Fatalf("accepted %d while down", res.Accepted)
	}
	s.SetDown(false)
	c = dialSink(t, s.Addr())
	c.expect(220)
	c.cmd("EHLO x", 250)
	s.SetDown(true)
	if txt := c.cmd("NOOP", 421); !strings.HasPrefix(txt, "421 4.3.2 ") {
		t.Fatalf("reply after SetDown: %q", txt)
	}
	c.expectClosed()
	if st := s.Stats(); st.ConnectionsRefused < 2 || st.Connections != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestSinkDropInData(t *testing.T) {
	s := startTestSink(t, SinkConfig{Faults: Faults{DropInData: 1}})
	c := dialSink(t, s.Addr())
	c.expect(220)
	c.cmd("EHLO x", 250)
	c.cmd("MAIL FROM:<a@b>", 250)
	c.cmd("RCPT TO:<c@d>", 250)
	c.cmd("DATA", 354)
	c.send("Subject: x\r\n\r\nhello\r\n.\r\n")
	if code, lines, err := c.reply(); err == nil {
		t.Fatalf("got reply %d %q after the drop", code, lines)
	}
	if st := s.Stats(); st.Drops != 1 || st.Messages != 0 {
		t.Fatalf("stats %+v", st)
	}

	s.SetFaults(Faults{DropInData: 0.2})
	res, _ := RunLoad(context.Background(), LoadConfig{Addr: s.Addr(), Sessions: 2, Messages: 300, Pipelining: true})
	st := s.Stats()
	if res.Errors == 0 || int64(res.Errors) != st.Drops-1 || res.Accepted+res.Errors != 300 || st.Messages != int64(res.Accepted) {
		t.Fatalf("load %+v\nstats %+v", res, st)
	}
}

// countingConn counts the Write calls on a connection.
type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c countingConn) Write(b []byte) (int, error) {
	c.n.Add(1)
	return c.Conn.Write(b)
}

func TestSinkPipelinedOneWrite(t *testing.T) {
	var writes atomic.Int64
	s, err := startSink(SinkConfig{Keep: true}, func(c net.Conn) net.Conn { return countingConn{c, &writes} })
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c := dialSink(t, s.Addr())
	c.expect(220)
	ehlo := c.cmd("EHLO client.test", 250)
	for _, kw := range []string{"PIPELINING", "SIZE 52428800", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN"} {
		if !strings.Contains(ehlo, "250-"+kw+"\n") && !strings.HasSuffix(ehlo, "250 "+kw) {
			t.Errorf("EHLO reply lacks %s: %q", kw, ehlo)
		}
	}
	if strings.Contains(ehlo, "STARTTLS") {
		t.Error("STARTTLS offered")
	}
	if n := writes.Load(); n != 2 {
		t.Fatalf("%d writes for greeting and EHLO", n)
	}
	c.send("MAIL FROM:<a@b> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<x@y> NOTIFY=NEVER\r\nRCPT TO:<z@y>\r\nDATA\r\n")
	for _, code := range []int{250, 250, 250, 354} {
		c.expect(code)
	}
	if n := writes.Load(); n != 3 {
		t.Fatalf("%d writes after a pipelined group, want 3", n)
	}
	c.send("hello\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n")
	for _, code := range []int{250, 250, 250, 221} {
		c.expect(code)
	}
	if n := writes.Load(); n != 4 {
		t.Fatalf("%d writes after the second group, want 4", n)
	}
	if m := s.Messages(); len(m) != 1 || string(m[0].Data) != "hello\r\n" || strings.Join(m[0].To, ",") != "x@y,z@y" {
		t.Fatalf("messages %+v", m)
	}

	s2 := startTestSink(t, SinkConfig{NoPipelining: true, Hostname: "mx.example"})
	c = dialSink(t, s2.Addr())
	if g := c.expect(220); !strings.HasPrefix(g, "220 mx.example ") {
		t.Fatalf("greeting %q", g)
	}
	if ehlo := c.cmd("EHLO x", 250); strings.Contains(ehlo, "PIPELINING") {
		t.Fatalf("PIPELINING advertised: %q", ehlo)
	}
}

func TestSinkProtocol(t *testing.T) {
	s := startTestSink(t, SinkConfig{Keep: true})
	c := dialSink(t, s.Addr())
	c.expect(220)
	c.cmd("MAIL FROM:<a@b>", 503)
	c.cmd("EHLO", 501)
	c.cmd("HELO client.test", 250)
	c.cmd("RCPT TO:<a@b>", 503)
	c.cmd("DATA", 503)
	c.cmd("MAIL TO:<a@b>", 501)
	c.cmd("mail from:<a@b>", 250)
	c.cmd("MAIL FROM:<a@b>", 503)
	c.cmd("DATA", 503)
	c.cmd("RCPT TO:", 501)
	c.cmd("rcpt to:<c@d>", 250)
	c.cmd("STARTTLS", 502)
	c.cmd("BDAT 10 LAST", 502)
	c.cmd("XYZZY", 500)
	c.cmd("NOOP", 250)
	c.cmd("RSET", 250)
	c.cmd("DATA", 503)
	c.send(strings.Repeat("x", 40000) + "\r\n")
	c.expect(500)
	c.cmd("MAIL FROM:<>", 250)
	c.cmd("RCPT TO:<e@f>", 250)
	c.cmd("DATA", 354)
	if txt := c.cmd(".", 250); !strings.Contains(txt, "queued as ") {
		t.Fatalf("end of data reply %q", txt)
	}
	c.cmd("QUIT", 221)
	c.expectClosed()
	m := s.Messages()
	if len(m) != 1 || len(m[0].Data) != 0 || m[0].Data == nil || m[0].To[0] != "e@f" {
		t.Fatalf("messages %+v", m)
	}
	if st := s.Stats(); st.Messages != 1 || st.Recipients != 1 || st.Bytes != 0 || st.MaxMessagesPerConn != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestSinkReplyStyles(t *testing.T) {
	cases := []struct {
		style, prefix string
		faults        Faults
		code          int
		closes        bool
	}{
		{"gmail", "452-4.2.2 The recipient's inbox is out of storage space.", Faults{RcptTempFail: 1}, 452, false},
		{"gmail", "421-4.7.0 ", Faults{MailTempFail: 1}, 421, true},
		{"gmail", "550-5.1.1 ", Faults{RcptPermFail: 1}, 550, false},
		{"outlook", "451 4.7.500 Server busy. Please try again later from [127.0.0.1]", Faults{MailTempFail: 1}, 451, false},
		{"yahoo", "421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred", Faults{MailTempFail: 1}, 421, true},
		{"yahoo", "554 5.6.0 ", Faults{DataPermFail: 1}, 554, false},
		{"", "550 5.7.1 ", Faults{MailPermFail: 1}, 550, false},
		{"", "451 4.3.0 ", Faults{DataTempFail: 1}, 451, false},
	}
	for _, tc := range cases {
		s := startTestSink(t, SinkConfig{ReplyStyle: tc.style, Faults: tc.faults})
		c := dialSink(t, s.Addr())
		c.expect(220)
		c.cmd("EHLO x", 250)
		c.send("MAIL FROM:<a@b>\r\n")
		code, lines, err := c.reply()
		if code == 250 {
			c.send("RCPT TO:<c@d>\r\n")
			code, lines, err = c.reply()
		}
		if code == 250 {
			c.cmd("DATA", 354)
			c.send("x\r\n.\r\n")
			code, lines, err = c.reply()
		}
		if err != nil || code != tc.code || !strings.HasPrefix(lines[0], tc.prefix) {
			t.Errorf("%s %+v: got %d %q %v, want %d %q...", tc.style, tc.faults, code, lines, err, tc.code, tc.prefix)
			continue
		}
		if tc.closes {
			c.expectClosed()
		} else {
			c.cmd("NOOP", 250)
		}
	}
	if _, err := StartSink(SinkConfig{ReplyStyle: "aol"}); err == nil {
		t.Error("unknown ReplyStyle accepted")
	}
}

func TestSinkConfigErrors(t *testing.T) {
	for _, cfg := range []SinkConfig{
		{Addr: "0.0.0.0:0"},
		{Addr: "192.0.2.1:25"},
		{Faults: Faults{RcptTempFail: 0.6, RcptPermFail: 0.6}},
		{Faults: Faults{DropInData: -0.1}},
		{MaxConns: -1},
	} {
		if s, err := StartSink(cfg); err == nil {
			s.Close()
			t.Errorf("StartSink(%+v) succeeded", cfg)
		}
	}
	if _, err := StartSink(SinkConfig{Addr: "0.0.0.0:0"}); !errors.Is(err, ErrNotLoopback) {
		t.Errorf("non-loopback address: %v", err)
	}
	s, err := StartSink(SinkConfig{Addr: "localhost:0"})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Error(err)
	}
	s.Close() // idempotent
}

func BenchmarkSink(b *testing.B) {
	s, err := StartSink(SinkConfig{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	b.ResetTimer()
	res, err := RunLoad(context.Background(), LoadConfig{Addr: s.Addr(), Sessions: 8, Messages: b.N, Size: 4096, Pipelining: true})
	if err != nil || res.Accepted != b.N {
		b.Fatal(err, res.Accepted)
	}
	b.ReportMetric(res.Rate(), "msgs/s")
}

// TestSinkBDAT: with Chunking the sink advertises CHUNKING and takes BDAT
// messages, in one chunk or several, byte for byte.
func TestSinkBDAT(t *testing.T) {
	s, err := StartSink(SinkConfig{Chunking: true, Keep: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c, err := net.Dial("tcp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	reply := func() string {
		var last string
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				t.Fatal(err)
			}
			last = line
			if len(line) < 4 || line[3] != '-' {
				return strings.TrimSpace(last)
			}
		}
	}
	reply() // greeting
	fmt.Fprint(c, "EHLO x\r\n")
	if r := reply(); !strings.HasPrefix(r, "250 ") {
		t.Fatalf("EHLO: %q", r)
	}
	one := "Subject: one\r\n\r\n.dot stays\r\n"
	fmt.Fprintf(c, "MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT %d LAST\r\n%s", len(one), one)
	for i, want := range []string{"250", "250", "250 2.0.0 Ok: queued"} {
		if r := reply(); !strings.HasPrefix(r, want) {
			t.Fatalf("reply %d: %q", i, r)
		}
	}
	a, b := "Subject: two\r\n\r\nfirst ", "chunk and second\r\n"
	fmt.Fprintf(c, "MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT %d\r\n%sBDAT %d LAST\r\n%s", len(a), a, len(b), b)
	for i, want := range []string{"250", "250", fmt.Sprintf("250 2.0.0 %d octets", len(a)), "250 2.0.0 Ok: queued"} {
		if r := reply(); !strings.HasPrefix(r, want) {
			t.Fatalf("reply %d: %q", i, r)
		}
	}
	// No recipient: the chunk is read and refused; the stream stays in step.
	fmt.Fprintf(c, "BDAT 3 LAST\r\nxyzNOOP\r\n")
	if r := reply(); !strings.HasPrefix(r, "503") {
		t.Fatalf("BDAT without a transaction: %q", r)
	}
	if r := reply(); !strings.HasPrefix(r, "250") {
		t.Fatalf("NOOP after a refused chunk: %q", r)
	}
	got := s.Messages()
	if len(got) != 2 || string(got[0].Data) != one || string(got[1].Data) != a+b {
		t.Fatalf("sink kept %+v", got)
	}
}
