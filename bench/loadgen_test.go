package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// serverOpts configures the test SMTP server.
type serverOpts struct {
	dataDelay       time.Duration // delay before every end-of-DATA reply
	tempFailEvery   int           // 451 at end of DATA for every Nth message received
	rcptRejectEvery int           // 550 for every Mth RCPT received
	dropEvery       int           // close the connection instead of replying at end of DATA, every Kth message
	noPipelining    bool          // do not advertise PIPELINING
	dataWithoutRcpt bool          // answer 354 to DATA even with no accepted recipient
	// override, if set, may replace the reply to the nth (global, 1-based)
	// "MAIL", "DATA" (with a valid envelope) or "END" (end of data) by
	// returning it; "" keeps the normal behaviour. After a 421 reply the
	// server closes the connection.
	override func(verb string, n int64) string
}

// testServer is a minimal hand-written SMTP server on 127.0.0.1. Counters
// are global over all connections.
type testServer struct {
	opts serverOpts
	ln   net.Listener
	done chan struct{}
	wg   sync.WaitGroup

	rcptN, dataN    atomic.Int64 // RCPTs and message contents received
	conns, quits    atomic.Int64
	groups          atomic.Int64 // MAIL commands
	pipelinedGroups atomic.Int64 // MAIL commands with RCPT and DATA already buffered
	maxPerConn      atomic.Int64 // most messages accepted on one connection
	violations      atomic.Int64 // protocol violations by the client

	rsets atomic.Int64

	mu    sync.Mutex
	verbN map[string]int64 // counts for override
	open  map[net.Conn]struct{}
	byID  map[string][]byte // accepted messages, dot-stuffing undone
}

func startServer(t testing.TB, opts serverOpts) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &testServer{
		opts:  opts,
		ln:    ln,
		done:  make(chan struct{}),
		open:  make(map[net.Conn]struct{}),
		byID:  make(map[string][]byte),
		verbN: make(map[string]int64),
	}
	s.wg.Add(1)
	go s.accept()
	t.Cleanup(s.close)
	return s
}

func (s *testServer) addr() string { return s.ln.Addr().String() }

func (s *testServer) accept() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		select {
		case <-s.done:
			s.mu.Unlock()
			c.Close()
			return
		default:
		}
		s.open[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		s.conns.Add(1)
		go s.handle(c)
	}
}

func (s *testServer) close() {
	s.mu.Lock()
	close(s.done)
	for c := range s.open {
		c.Close()
	}
	s.mu.Unlock()
	s.ln.Close()
	s.wg.Wait()
}

func (s *testServer) message(id string) ([]byte, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, ok := s.byID[id]
	return m, ok
}

// overridden returns the override reply for verb, if any.
func (s *testServer) overridden(verb string) string {
	if s.opts.override == nil {
		return ""
	}
	s.mu.Lock()
	s.verbN[verb]++
	n := s.verbN[verb]
	s.mu.Unlock()
	return s.opts.override(verb, n)
}

func (s *testServer) accepted() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.byID)
}

func (s *testServer) handle(c net.Conn) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.open, c)
		s.mu.Unlock()
		c.Close()
	}()
	r := bufio.NewReader(c)
	w := bufio.NewWriter(c)
	// reply queues a reply and, as RFC 2920 servers do, flushes when no
	// more input is waiting.
	reply := func(text string, flush bool) bool {
		w.WriteString(text)
		if flush || r.Buffered() == 0 {
			return w.Flush() == nil
		}
		return true
	}
	if !reply("220-bench.test ESMTP test server\r\n220 ready\r\n", true) {
		return
	}
	ext := "250-PIPELINING\r\n"
	if s.opts.noPipelining {
		ext = ""
	}
	var mail bool
	var rcpts, perConn int
	// special sends an override reply; it reports whether to go on.
	special := func(text string) bool {
		if !reply(text+"\r\n", true) {
			return false
		}
		return !strings.HasPrefix(text, "421")
	}
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		if !strings.HasSuffix(line, "\r\n") {
			s.violations.Add(1)
		}
		up := strings.ToUpper(strings.TrimRight(line, "\r\n"))
		ok := true
		switch {
		case strings.HasPrefix(up, "EHLO "):
			mail = false
			ok = reply("250-bench.test greets you\r\n"+ext+"250-SIZE 100000000\r\n250 8BITMIME\r\n", false)
		case strings.HasPrefix(up, "MAIL FROM:<"):
			s.groups.Add(1)
			if n := r.Buffered(); n > 0 {
				if p, _ := r.Peek(n); bytes.Contains(p, []byte("\r\nDATA\r\n")) {
					s.pipelinedGroups.Add(1)
				}
			}
			if mail {
				s.violations.Add(1)
				ok = reply("503 5.5.1 nested MAIL\r\n", false)
				break
			}
			if o := s.overridden("MAIL"); o != "" {
				ok = special(o)
				break
			}
			mail, rcpts = true, 0
			ok = reply("250 2.1.0 Ok\r\n", false)
		case strings.HasPrefix(up, "RCPT TO:<"):
			if !mail {
				ok = reply("503 5.5.1 need MAIL\r\n", false)
				break
			}
			n := s.rcptN.Add(1)
			if e := s.opts.rcptRejectEvery; e > 0 && n%int64(e) == 0 {
				ok = reply("550 5.1.1 no such user\r\n", false)
				break
			}
			rcpts++
			ok = reply("250 2.1.5 Ok\r\n", false)
		case up == "DATA":
			if !mail {
				ok = reply("503 5.5.1 need MAIL\r\n", false)
				break
			}
			if rcpts == 0 && !s.opts.dataWithoutRcpt {
				mail = false
				ok = reply("554 5.5.1 no valid recipients\r\n", false)
				break
			}
			if rcpts > 0 {
				if o := s.overridden("DATA"); o != "" {
					mail = false
					ok = special(o)
					break
				}
			}
			if !reply("354 go ahead\r\n", true) {
				return
			}
			msg, err := s.readData(r)
			if err != nil {
				return
			}
			mail = false
			if rcpts == 0 {
				ok = reply("554 5.5.1 no valid recipients\r\n", true)
				break
			}
			if o := s.overridden("END"); o != "" {
				ok = special(o)
				break
			}
			n := s.dataN.Add(1)
			if e := s.opts.dropEvery; e > 0 && n%int64(e) == 0 {
				return
			}
			if d := s.opts.dataDelay; d > 0 {
				t := time.NewTimer(d)
				select {
				case <-t.C:
				case <-s.done:
					t.Stop()
					return
				}
			}
			if e := s.opts.tempFailEvery; e > 0 && n%int64(e) == 0 {
				ok = reply("451 4.3.0 try again later\r\n", true)
				break
			}
			id := "Q" + strconv.FormatInt(n, 10)
			s.mu.Lock()
			s.byID[id] = msg
			s.mu.Unlock()
			perConn++
			for {
				m := s.maxPerConn.Load()
				if int64(perConn) <= m || s.maxPerConn.CompareAndSwap(m, int64(perConn)) {
					break
				}
			}
			ok = reply("250-2.0.0 message accepted\r\n250 2.0.0 Ok: queued as "+id+"\r\n", true)
		case up == "RSET":
			s.rsets.Add(1)
			mail = false
			ok = reply("250 2.0.0 Ok\r\n", false)
		case up == "NOOP":
			ok = reply("250 2.0.0 Ok\r\n", false)
		case up == "QUIT":
			s.quits.Add(1)
			reply("221 2.0.0 bye\r\n", true)
			return
		default:
			s.violations.Add(1)
			ok = reply("500 5.5.2 what?\r\n", false)
		}
		if !ok {
			return
		}
	}
}

// readData reads message content up to the terminating ".\r\n" and undoes
// dot-stuffing.
func (s *testServer) readData(r *bufio.Reader) ([]byte, error) {
	var msg []byte
	for {
		line, err := r.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			s.violations.Add(1) // no generated line is that long
			return nil, err
		}
		if err != nil {
			return nil, err
		}
		if !bytes.HasSuffix(line, []byte("\r\n")) {
			s.violations.Add(1)
		}
		if string(line) == ".\r\n" {
			return msg, nil
		}
		if line[0] == '.' {
			line = line[1:]
		}
		msg = append(msg, line...)
	}
}

// acceptLog records OnAccepted calls.
type acceptLog struct {
	mu   sync.Mutex
	ids  []string
	msgs map[string][]byte
}

func (l *acceptLog) record(id string, msg []byte) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.msgs == nil {
		l.msgs = make(map[string][]byte)
	}
	l.ids = append(l.ids, id)
	l.msgs[id] = bytes.Clone(msg)
}

func TestRunLoadCounts(t *testing.T) {
	const (
		messages   = 300
		tempEvery  = 5
		rejectEvry = 7
	)
	// Every 7th RCPT is refused; with one recipient per message those
	// messages fail permanently. Of the others, every 5th gets a 451.
	const (
		wantPerm     = messages / rejectEvry
		wantTemp     = (messages - wantPerm) / tempEvery
		wantAccepted = messages - wantPerm - wantTemp
	)
	tests := []struct {
		name       string
		pipelining bool
		opts       serverOpts
		sizeDist   []SizeWeight
	}{
		{name: "stepwise"},
		{name: "pipelined", pipelining: true},
		{name: "pipelined/354 without recipients", pipelining: true, opts: serverOpts{dataWithoutRcpt: true}},
		{name: "stepwise/size distribution", sizeDist: []SizeWeight{{300, 3}, {5000, 2}, {80000, 1}, {1 << 20, 0}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := tt.opts
			opts.tempFailEvery, opts.rcptRejectEvery = tempEvery, rejectEvry
			srv := startServer(t, opts)
			var log acceptLog
			var inProgress, progressCalls atomic.Int32
			var lastSent, lastAccepted atomic.Int64
			cfg := LoadConfig{
				Addr:       srv.addr(),
				Sessions:   8,
				Messages:   messages,
				Size:       1500,
				SizeDist:   tt.sizeDist,
				Pipelining: tt.pipelining,
				Seed:       42,
				Timeout:    10 * time.Second,
				CollectIDs: true,
				OnAccepted: log.record,
				Progress: func(sent, accepted int) {
					if inProgress.Add(1) != 1 {
						t.Error("concurrent Progress calls")
					}
					progressCalls.Add(1)
					lastSent.Store(int64(sent))
					lastAccepted.Store(int64(accepted))
					inProgress.Add(-1)
				},
			}
			res, err := RunLoad(context.Background(), cfg)
			if err != nil {
				t.Fatalf("RunLoad: %v", err)
			}
			got := [5]int{res.Attempted, res.Accepted, res.TempFailed, res.PermFailed, res.Errors}
			want := [5]int{messages, wantAccepted, wantTemp, wantPerm, 0}
			if got != want {
				t.Fatalf("attempted/accepted/temp/perm/errors = %v, want %v", got, want)
			}
			if res.RcptRejected != wantPerm {
				t.Errorf("RcptRejected = %d, want %d", res.RcptRejected, wantPerm)
			}
			if len(res.Replies) != 2 || res.Replies["250"] != wantAccepted || res.Replies["451"] != wantTemp {
				t.Errorf("Replies = %v", res.Replies)
			}
			if len(res.Latency) != wantAccepted {
				t.Errorf("len(Latency) = %d, want %d", len(res.Latency), wantAccepted)
			}
			if res.Elapsed <= 0 || res.Rate() <= 0 {
				t.Errorf("Elapsed = %v, Rate = %v", res.Elapsed, res.Rate())
			}
			if c := int(srv.conns.Load()); res.Connections != c || res.Connections < 1 || res.Connections > 8 {
				t.Errorf("Connections = %d, server saw %d", res.Connections, c)
			}
			if q := int(srv.quits.Load()); q != res.Connections {
				t.Errorf("server saw %d QUITs for %d connections", q, res.Connections)
			}
			if v := srv.violations.Load(); v != 0 {
				t.Errorf("server saw %d protocol violations", v)
			}
			if progressCalls.Load() < 1 || lastSent.Load() != messages || lastAccepted.Load() != wantAccepted {
				t.Errorf("Progress: %d calls, last (%d, %d)", progressCalls.Load(), lastSent.Load(), lastAccepted.Load())
			}

			// Pipelining: the server finds RCPT and DATA buffered when it
			// reads MAIL iff the client pipelines.
			groups, piped := srv.groups.Load(), srv.pipelinedGroups.Load()
			if groups != messages {
				t.Errorf("server saw %d MAIL commands, want %d", groups, messages)
			}
			if tt.pipelining && piped < groups*9/10 {
				t.Errorf("only %d of %d transactions arrived pipelined", piped, groups)
			}
			if !tt.pipelining && piped != 0 {
				t.Errorf("%d of %d transactions arrived pipelined in stepwise mode", piped, groups)
			}

			// Bytes: what OnAccepted reported is what the server stored.
			if len(log.ids) != wantAccepted || srv.accepted() != wantAccepted {
				t.Fatalf("OnAccepted called %d times, server stored %d, want %d", len(log.ids), srv.accepted(), wantAccepted)
			}
			if !equalStrings(res.QueueIDs, log.ids) {
				t.Errorf("QueueIDs differ from the IDs given to OnAccepted")
			}
			seqs := make(map[string]bool)
			dotLines := 0
			for _, id := range log.ids {
				stored, ok := srv.message(id)
				if !ok {
					t.Fatalf("OnAccepted reported ID %q that the server did not issue", id)
				}
				sent := log.msgs[id]
				if !bytes.Equal(stored, sent) {
					t.Fatalf("message %s: server stored %d bytes that differ from the %d reported", id, len(stored), len(sent))
				}
				seq := headerValue(sent, "X-Load-Seq")
				if seqs[seq] {
					t.Errorf("X-Load-Seq %s accepted twice", seq)
				}
				seqs[seq] = true
				dotLines += bytes.Count(sent, []byte("\r\n."))
			}
			if dotLines == 0 {
				t.Error("no accepted message had a line starting with '.'; dot-stuffing untested")
			}
		})
	}
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// headerValue returns the value of the first header named name in msg.
func headerValue(msg []byte, name string) string {
	hdr, _, _ := bytes.Cut(msg, []byte("\r\n\r\n"))
	for _, line := range strings.Split(string(hdr), "\r\n") {
		if k, v, ok := strings.Cut(line, ": "); ok && strings.EqualFold(k, name) {
			return v
		}
	}
	return ""
}

func TestRunLoadRefusals(t *testing.T) {
	// Of 60 MAILs: every 10th gets 452, every 10th+5 gets 553, the 23rd a
	// 421 (and a hang-up); of the 47 DATAs with a valid envelope every 7th
	// gets 554.
	override := func(verb string, n int64) string {
		switch {
		case verb == "MAIL" && n%10 == 0:
			return "452 4.3.1 insufficient storage"
		case verb == "MAIL" && n%10 == 5:
			return "553-5.1.8 sender\r\n553 5.1.8 refused"
		case verb == "MAIL" && n == 23:
			return "421 4.3.2 shutting down"
		case verb == "DATA" && n%7 == 0:
			return "554 5.7.1 not today"
		}
		return ""
	}
	for _, pipelining := range []bool{false, true} {
		t.Run(fmt.Sprintf("pipelining=%v", pipelining), func(t *testing.T) {
			srv := startServer(t, serverOpts{override: override})
			res, err := RunLoad(context.Background(), LoadConfig{
				Addr: srv.addr(), Sessions: 2, Messages: 60, Pipelining: pipelining, Size: 300,
			})
			if err != nil {
				t.Fatal(err)
			}
			got := [5]int{res.Attempted, res.Accepted, res.TempFailed, res.PermFailed, res.Errors}
			if want := [5]int{60, 41, 7, 12, 0}; got != want {
				t.Errorf("attempted/accepted/temp/perm/errors = %v, want %v", got, want)
			}
			if len(res.Replies) != 1 || res.Replies["250"] != 41 {
				t.Errorf("Replies = %v", res.Replies)
			}
			// RSET after each refused MAIL and DATA, not after the 421.
			if n := srv.rsets.Load(); n != 18 {
				t.Errorf("server saw %d RSETs, want 18", n)
			}
			if c := srv.conns.Load(); int64(res.Connections) != c || c < 2 || srv.quits.Load() != c-1 {
				t.Errorf("Connections = %d, server saw %d connections, %d QUITs", res.Connections, c, srv.quits.Load())
			}
			if v := srv.violations.Load(); v != 0 {
				t.Errorf("server saw %d protocol violations", v)
			}
		})
	}
}

func TestRunLoadProtocolError(t *testing.T) {
	srv := startServer(t, serverOpts{override: func(verb string, n int64) string {
		if verb == "END" && n == 3 {
			return "250-2.0.0 ok\r\n251 2.0.0 changed my mind"
		}
		return ""
	}})
	res, err := RunLoad(context.Background(), LoadConfig{Addr: srv.addr(), Messages: 5})
	if err != nil {
		t.Fatal(err)
	}
	if res.Accepted != 4 || res.Errors != 1 || res.Connections != 2 {
		t.Errorf("accepted %d, errors %d, connections %d", res.Accepted, res.Errors, res.Connections)
	}
}

func TestRunLoadPartialRecipients(t *testing.T) {
	// One session so that the global RCPT order is the client's order: every
	// 4th of 3 recipients per message is refused, never all three.
	srv := startServer(t, serverOpts{rcptRejectEvery: 4})
	var log acceptLog
	res, err := RunLoad(context.Background(), LoadConfig{
		Addr:                 srv.addr(),
		Messages:             40,
		RecipientsPerMessage: 3,
		Domains:              []string{"a.test", "b.test"},
		Pipelining:           true,
		Size:                 300,
		OnAccepted:           log.record,
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Accepted != 40 || res.RcptRejected != 30 || res.PermFailed+res.TempFailed+res.Errors != 0 {
		t.Fatalf("accepted %d, rcpt rejected %d, result %+v", res.Accepted, res.RcptRejected, res)
	}
	for _, msg := range log.msgs {
		seq, _ := strconv.Atoi(headerValue(msg, "X-Load-Seq"))
		d := []string{"a.test", "b.test"}[seq%2]
		want := fmt.Sprintf("user1@%s, user2@%s, user3@%s", d, d, d)
		if got := headerValue(msg, "To"); got != want {
			t.Errorf("message %d: To = %q, want %q", seq, got, want)
		}
	}
}

func TestRunLoadLatency(t *testing.T) {
	const delay = 20 * time.Millisecond
	for _, pipelining := range []bool{false, true} {
		t.Run(fmt.Sprintf("pipelining=%v", pipelining), func(t *testing.T) {
			srv := startServer(t, serverOpts{dataDelay: delay})
			res, err := RunLoad(context.Background(), LoadConfig{
				Addr:       srv.addr(),
				Sessions:   4,
				Messages:   32,
				Pipelining: pipelining,
			})
			if err != nil {
				t.Fatal(err)
			}
			if res.Accepted != 32 || len(res.Latency) != 32 {
				t.Fatalf("accepted %d, %d latencies", res.Accepted, len(res.Latency))
			}
			sum := res.Latency.Summary()
			// The server sleeps after reading the terminator, so no sample
			// can be shorter; the upper bound only has to survive a noisy
			// machine and the race detector.
			if min := res.Latency.Percentile(0); min < delay {
				t.Errorf("shortest latency %v < injected %v", min, delay)
			}
			if sum.P50 < delay || sum.P50 >= delay+200*time.Millisecond {
				t.Errorf("p50 = %v, want in [%v, %v)", sum.P50, delay, delay+200*time.Millisecond)
			}
			// 8 messages per session, each waiting >= 20ms.
			if res.Elapsed < 8*delay {
				t.Errorf("Elapsed = %v, want >= %v", res.Elapsed, 8*delay)
			}
			t.Logf("latency %v, elapsed %v, %.0f msg/s", sum, res.Elapsed, res.Rate())
		})
	}
}

func TestRunLoadMessagesPerSession(t *testing.T) {
	srv := startServer(t, serverOpts{})
	res, err := RunLoad(context.Background(), LoadConfig{
		Addr:               srv.addr(),
		Sessions:           3,
		Messages:           50,
		MessagesPerSession: 4,
		Size:               200,
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Accepted != 50 || res.Attempted != 50 {
		t.Fatalf("result %+v", res)
	}
	if m := srv.maxPerConn.Load(); m > 4 {
		t.Errorf("server got %d messages on one connection, limit 4", m)
	}
	if res.Connections < 13 || int64(res.Connections) != srv.conns.Load() || int64(res.Connections) != srv.quits.Load() {
		t.Errorf("Connections = %d, server saw %d connections and %d QUITs", res.Connections, srv.conns.Load(), srv.quits.Load())
	}
}

func TestRunLoadReconnectsAfterIOError(t *testing.T) {
	// The server hangs up instead of answering every 4th end of DATA.
	srv := startServer(t, serverOpts{dropEvery: 4})
	res, err := RunLoad(context.Background(), LoadConfig{Addr: srv.addr(), Messages: 20, Pipelining: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.Accepted != 15 || res.Errors != 5 || res.Attempted != 20 {
		t.Fatalf("accepted %d, errors %d, attempted %d", res.Accepted, res.Errors, res.Attempted)
	}
	// Reconnected after each drop but the last, which used the last message.
	if res.Connections != 5 || srv.conns.Load() != 5 {
		t.Errorf("Connections = %d, server saw %d, want 5", res.Connections, srv.conns.Load())
	}
}

func TestRunLoadGivesUp(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now
	start := time.Now()
	res, err := RunLoad(context.Background(), LoadConfig{Addr: addr, Sessions: 2, Messages: 10})
	if err == nil || !strings.Contains(err.Error(), "gave up") {
		t.Fatalf("err = %v, want a give-up error", err)
	}
	if res.Attempted != 0 || res.Connections != 0 {
		t.Errorf("result %+v", res)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("giving up took %v", d)
	}
}

func TestRunLoadCancel(t *testing.T) {
	srv := startServer(t, serverOpts{dataDelay: time.Minute})
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	res, err := RunLoad(ctx, LoadConfig{Addr: srv.addr(), Sessions: 2, Messages: 10})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("cancellation took %v", d)
	}
	if res.Attempted != 2 || res.Errors != 2 || res.Accepted != 0 {
		t.Errorf("result %+v", res)
	}
}

func TestRunLoadTimeout(t *testing.T) {
	srv := startServer(t, serverOpts{dataDelay: time.Minute})
	start := time.Now()
	res, err := RunLoad(context.Background(), LoadConfig{Addr: srv.addr(), Messages: 2, Timeout: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if res.Errors != 2 || res.Connections != 2 {
		t.Errorf("errors %d, connections %d, want 2 and 2", res.Errors, res.Connections)
	}
	if d := time.Since(start); d < 180*time.Millisecond || d > 3*time.Second {
		t.Errorf("two timeouts of 100ms took %v", d)
	}
}

func TestRunLoadRequiresAdvertisedPipelining(t *testing.T) {
	srv := startServer(t, serverOpts{noPipelining: true})
	res, err := RunLoad(context.Background(), LoadConfig{Addr: srv.addr(), Sessions: 3, Messages: 10, Pipelining: true})
	if err == nil || !strings.Contains(err.Error(), "PIPELINING") {
		t.Fatalf("err = %v", err)
	}
	if res.Attempted != 0 {
		t.Errorf("attempted %d", res.Attempted)
	}
	// Stepwise works against the same server.
	res, err = RunLoad(context.Background(), LoadConfig{Addr: srv.addr(), Messages: 3})
	if err != nil || res.Accepted != 3 {
		t.Fatalf("stepwise: %v, %+v", err, res)
	}
}

func TestLoopbackOnly(t *testing.T) {
	for _, addr := range []string{
		"192.0.2.1:25", "10.0.0.1:2525", "[2001:db8::1]:25", "example.com:25",
		"0.0.0.0:25", ":25", "[::]:25", "localhost.example.com:25", "127.0.0.1", "",
	} {
		_, err := RunLoad(context.Background(), LoadConfig{Addr: addr, Messages: 1})
		if !errors.Is(err, ErrNotLoopback) {
			t.Errorf("RunLoad(Addr %q): err = %v, want ErrNotLoopback", addr, err)
		}
	}
	for _, addr := range []string{"127.0.0.1:25", "127.1.2.3:25", "[::1]:25", "localhost:25", "LOCALHOST.:25", "[::ffff:127.0.0.1]:25"} {
		if err := checkLoopback(addr); err != nil {
			t.Errorf("checkLoopback(%q) = %v", addr, err)
		}
	}
}

func TestConfigErrors(t *testing.T) {
	for _, cfg := range []LoadConfig{
		{Messages: 0},
		{Messages: 1, Size: 199},
		{Messages: 1, Sessions: -1},
		{Messages: 1, MessagesPerSession: -1},
		{Messages: 1, SizeDist: []SizeWeight{{100, 1}}},
		{Messages: 1, SizeDist: []SizeWeight{{300, 0}}},
		{Messages: 1, SizeDist: []SizeWeight{{300, -1}, {400, 2}}},
		{Messages: 1, Domains: []string{"ok.test", "bad domain"}},
		{Messages: 1, From: "a@b>\r\nRSET"},
		{Messages: 1, Timeout: -time.Second},
	} {
		cfg.Addr = "127.0.0.1:1"
		if _, err := RunLoad(context.Background(), cfg); err == nil {
			t.Errorf("RunLoad(%+v) accepted an invalid config", cfg)
		}
	}
}

func testGenerator(t *testing.T, cfg LoadConfig) *generator {
	t.Helper()
	cfg.Addr = "127.0.0.1:1"
	if cfg.Messages == 0 {
		cfg.Messages = 1
	}
	n, err := cfg.normalized()
	if err != nil {
		t.Fatal(err)
	}
	return newGenerator(&n)
}

func TestGeneratedMessages(t *testing.T) {
	for _, size := range []int{200, 201, 202, 203, 250, 1000, 4096, 100000} {
		g := testGenerator(t, LoadConfig{Size: size, Seed: 7})
		g2 := testGenerator(t, LoadConfig{Size: size, Seed: 7})
		other := testGenerator(t, LoadConfig{Size: size, Seed: 8})
		ids := make(map[string]bool)
		for seq := range 50 {
			m := g.build(nil, seq)
			if !bytes.Equal(m, g2.build(nil, seq)) {
				t.Fatalf("size %d seq %d: not deterministic", size, seq)
			}
			if bytes.Equal(m, other.build(nil, seq)) {
				t.Errorf("size %d seq %d: same message for different seeds", size, seq)
			}
			if len(m) < size-2 || len(m) > size {
				t.Errorf("size %d seq %d: got %d bytes", size, seq, len(m))
			}
			checkMessage(t, m)
			if got := headerValue(m, "X-Load-Seq"); got != strconv.Itoa(seq) {
				t.Errorf("X-Load-Seq = %q, want %d", got, seq)
			}
			id := headerValue(m, "Message-ID")
			if ids[id] {
				t.Errorf("duplicate Message-ID %s", id)
			}
			ids[id] = true
		}
	}
}

// checkMessage verifies the shape of a generated message: CRLF lines of at
// most 76 printable ASCII characters (headers included), ending in CRLF, with
// a header/body separator.
func checkMessage(t *testing.T, m []byte) {
	t.Helper()
	if !bytes.HasSuffix(m, []byte("\r\n")) {
		t.Fatalf("message does not end with CRLF")
	}
	if !bytes.Contains(m, []byte("\r\n\r\n")) {
		t.Fatalf("no header/body separator")
	}
	lines := bytes.Split(m[:len(m)-2], []byte("\r\n"))
	for i, l := range lines {
		if len(l) > maxLineLen {
			t.Fatalf("line %d has %d chars: %q", i, len(l), l)
		}
		for _, c := range l {
			if c < ' ' || c > '~' {
				t.Fatalf("line %d has byte %#x", i, c)
			}
		}
	}
}

func TestGeneratedSizeDistribution(t *testing.T) {
	dist := []SizeWeight{{300, 1}, {2000, 3}, {9000, 0}, {50000, 1}}
	g := testGenerator(t, LoadConfig{SizeDist: dist, Size: 123456, Seed: 1})
	counts := make(map[int]int)
	for seq := range 1000 {
		m := g.build(nil, seq)
		var size int
		switch l := len(m); {
		case l >= 298 && l <= 300:
			size = 300
		case l >= 1998 && l <= 2000:
			size = 2000
		case l >= 49998 && l <= 50000:
			size = 50000
		default:
			t.Fatalf("seq %d: size %d not from the distribution", seq, l)
		}
		counts[size]++
	}
	// Expect 200/600/200; allow generous statistical slack.
	if counts[300] < 140 || counts[300] > 260 || counts[2000] < 520 || counts[2000] > 680 || counts[50000] < 140 || counts[50000] > 260 {
		t.Errorf("size counts %v, want about 200/600/200", counts)
	}
}

func TestGeneratedHeadersLargerThanSize(t *testing.T) {
	g := testGenerator(t, LoadConfig{Size: 200, RecipientsPerMessage: 3, Domains: []string{"a-rather-long-domain-name.example"}})
	m := g.build(nil, 1234567)
	checkMessage(t, m)
	if !bytes.Contains(m, []byte(",\r\n user2@")) {
		t.Errorf("To: not folded:\n%s", m)
	}
	if len(m) > 400 {
		t.Errorf("message is %d bytes", len(m))
	}
}

// build appends message seq to dst in one piece.
func (g *generator) build(dst []byte, seq int) []byte {
	var m message
	g.compose(&m, seq)
	return m.appendTo(dst)
}

// TestMessageDoesNotAllocate covers what a session does per message:
// compose, send dot-stuffed, and build the raw bytes for OnAccepted.
func TestMessageDoesNotAllocate(t *testing.T) {
	g := testGenerator(t, LoadConfig{Size: 8000})
	raw := make([]byte, 0, 9000)
	m := message{head: make([]byte, 0, 512), tail: make([]byte, 0, maxLineLen+2)}
	d := dotWriter{w: bufio.NewWriter(io.Discard)}
	seq := 0
	allocs := testing.AllocsPerRun(100, func() {
		m.head = m.head[:0]
		g.compose(&m, seq)
		d.writeRange(&m, 0, m.len())
		d.end()
		raw = m.appendTo(raw[:0])
		seq++
	})
	if allocs != 0 {
		t.Errorf("%v allocations per message", allocs)
	}
}

// TestComposeSegments checks that compose reuses the session's buffers and
// shares the body with the pool, and that writing a message in two ranges
// gives the same wire bytes as in one.
func TestComposeSegments(t *testing.T) {
	for _, size := range []int{200, 203, 1000, 70000, 1 << 20} {
		g := testGenerator(t, LoadConfig{Size: size, Seed: 11, RecipientsPerMessage: 2})
		var m message
		for seq := range 20 {
			m.head = m.head[:0]
			g.compose(&m, seq)
			raw := g.build(nil, seq)
			if got := m.appendTo(nil); !bytes.Equal(got, raw) || m.len() != len(raw) {
				t.Fatalf("size %d seq %d: compose gives %d bytes that differ from build's %d", size, seq, len(got), len(raw))
			}
			if len(m.body) > 0 && !slices.ContainsFunc(g.starts, func(i int) bool { return &g.pool[i] == &m.body[0] }) {
				t.Fatalf("size %d seq %d: body is not a slice of the pool", size, seq)
			}
			want := stuffed(raw)
			var whole, split bytes.Buffer
			d := dotWriter{w: bufio.NewWriterSize(&whole, 4096)}
			d.writeRange(&m, 0, m.len())
			d.end()
			cut := seq * 7919 % (m.len() + 1)
			d = dotWriter{w: bufio.NewWriterSize(&split, 4096)}
			d.writeRange(&m, 0, cut)
			d.writeRange(&m, cut, m.len())
			d.end()
			if !bytes.Equal(whole.Bytes(), want) || !bytes.Equal(split.Bytes(), want) {
				t.Fatalf("size %d seq %d: wire form differs (cut at %d)", size, seq, cut)
			}
		}
	}
}

// stuffed is the DATA wire form of msg, done line by line as a reference.
func stuffed(msg []byte) []byte {
	var b []byte
	for len(msg) > 0 {
		if msg[0] == '.' {
			b = append(b, '.')
		}
		i := bytes.IndexByte(msg, '\n')
		if i < 0 {
			b = append(b, msg...)
			b = append(b, '\r', '\n')
			break
		}
		b = append(b, msg[:i+1]...)
		msg = msg[i+1:]
	}
	return append(b, '.', '\r', '\n')
}

func TestDotWriter(t *testing.T) {
	tests := []struct{ in, want string }{
		{"", ".\r\n"},
		{"a\r\n", "a\r\n.\r\n"},
		{"a", "a\r\n.\r\n"},
		{".\r\n", "..\r\n.\r\n"},
		{".a\r\nb\r\n..\r\n", "..a\r\nb\r\n...\r\n.\r\n"},
		{"a.b\r\n.", "a.b\r\n..\r\n.\r\n"},
		{"x\r\n\r\n.\r\n", "x\r\n\r\n..\r\n.\r\n"},
	}
	for _, tt := range tests {
		if got := string(stuffed([]byte(tt.in))); got != tt.want {
			t.Errorf("stuffed(%q) = %q, want %q", tt.in, got, tt.want)
		}
		// Every way of cutting the input into three pieces.
		for i := 0; i <= len(tt.in); i++ {
			for j := i; j <= len(tt.in); j++ {
				var buf bytes.Buffer
				d := dotWriter{w: bufio.NewWriter(&buf)}
				d.write([]byte(tt.in[:i]))
				d.write([]byte(tt.in[i:j]))
				d.write([]byte(tt.in[j:]))
				if err := d.end(); err != nil {
					t.Fatal(err)
				}
				if buf.String() != tt.want {
					t.Errorf("dotWriter(%q cut at %d, %d) = %q, want %q", tt.in, i, j, buf.String(), tt.want)
				}
			}
		}
	}
}

func TestReadReply(t *testing.T) {
	long := "250-" + strings.Repeat("x", 10000) + "\r\n"
	tests := []struct {
		name     string
		in       string
		code     int
		id       string
		pipe     bool
		inEHLO   bool
		wantErr  bool
		leftover string
	}{
		{name: "single", in: "250 ok\r\nNEXT", code: 250, leftover: "NEXT"},
		{name: "bare code", in: "354\r\n", code: 354},
		{name: "bare LF", in: "221 bye\n", code: 221},
		{name: "multi-line", in: "250-a\r\n250-b\r\n250 c\r\n", code: 250},
		{name: "queued as", in: "250 2.0.0 Ok: queued as 4ABC123\r\n", code: 250, id: "4ABC123"},
		{name: "queued as, multi-line", in: "250-accepted\r\n250 Queued as <X1.y> (ok)\r\n", code: 250, id: "X1.y"},
		{name: "queued as, trailing period", in: "250 OK queued as q-9.\r\n", code: 250, id: "q-9"},
		{name: "no id on 4xx", in: "451 queued as NOPE\r\n", code: 451},
		{name: "overlong line", in: long + "250 queued as Z\r\n", code: 250, id: "Z"},
		{name: "ehlo", in: "250-host hi\r\n250-SIZE 10\r\n250-pipelining\r\n250 8BITMIME\r\n", code: 250, inEHLO: true, pipe: true},
		{name: "ehlo without", in: "250-host PIPELINING\r\n250 8BITMIME\r\n", code: 250, inEHLO: true},
		{name: "code change", in: "250-a\r\n251 b\r\n", wantErr: true},
		{name: "garbage", in: "hello\r\n", wantErr: true},
		{name: "short", in: "25\r\n", wantErr: true},
		{name: "bad separator", in: "250x\r\n", wantErr: true},
		{name: "eof mid reply", in: "250-a\r\n", wantErr: true},
		{name: "eof", in: "", wantErr: true},
	}
	for _, tt := range tests {
		sr := strings.NewReader(tt.in)
		s := &session{br: bufio.NewReaderSize(sr, 4096), inEHLO: tt.inEHLO, scanID: true}
		code, err := s.readReply()
		if (err != nil) != tt.wantErr {
			t.Errorf("%s: err = %v", tt.name, err)
			continue
		}
		if tt.wantErr {
			continue
		}
		rest := make([]byte, 100)
		n, _ := s.br.Read(rest)
		if code != tt.code || s.id != tt.id || s.pipelining != tt.pipe || string(rest[:n]) != tt.leftover {
			t.Errorf("%s: code %d id %q pipelining %v leftover %q", tt.name, code, s.id, s.pipelining, rest[:n])
		}
	}
}

// BenchmarkRunLoad measures the generator against the test server (both in
// this process, so the numbers include the server's cost).
func BenchmarkRunLoad(b *testing.B) {
	for _, pipelining := range []bool{false, true} {
		b.Run(fmt.Sprintf("pipelining=%v", pipelining), func(b *testing.B) {
			srv := startServer(b, serverOpts{})
			b.ReportAllocs()
			b.ResetTimer()
			res, err := RunLoad(context.Background(), LoadConfig{
				Addr: srv.addr(), Sessions: 4, Messages: b.N, Pipelining: pipelining, Size: 2000,
			})
			if err != nil || res.Accepted != b.N {
				b.Fatalf("%v, %+v", err, res)
			}
			b.ReportMetric(res.Rate(), "msgs/s")
			b.ReportMetric(float64(res.Latency.Median().Microseconds()), "p50-µs")
		})
	}
}
