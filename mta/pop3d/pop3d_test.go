package pop3d

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mtaproject/mta/mta/certs"
)

// memBackend is one user with an in-memory mailbox.
type memBackend struct {
	mu      sync.Mutex
	msgs    map[string][]byte
	order   []string
	deleted []string
}

func newBackend(msgs ...string) *memBackend {
	b := &memBackend{msgs: map[string][]byte{}}
	for i, m := range msgs {
		uid := fmt.Sprintf("UID%02d", i+1)
		b.msgs[uid] = []byte(m)
		b.order = append(b.order, uid)
	}
	return b
}

func (b *memBackend) Authenticate(user, pass string) bool { return user == "u" && pass == "p" }

func (b *memBackend) List(string) ([]Message, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []Message
	for _, uid := range b.order {
		if m, ok := b.msgs[uid]; ok {
			out = append(out, Message{UID: uid, Size: int64(len(m))})
		}
	}
	return out, nil
}

func (b *memBackend) Retrieve(_, uid string) ([]byte, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.msgs[uid], nil
}

func (b *memBackend) Delete(_ string, uids []string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, u := range uids {
		delete(b.msgs, u)
		b.deleted = append(b.deleted, u)
	}
	return nil
}

func start(t *testing.T, b Backend, mod func(*Options)) (string, *Server) {
	t.Helper()
	cfg, err := certs.SelfSigned(t.TempDir(), "pop.test")
	if err != nil {
		t.Fatal(err)
	}
	o := Options{Name: "pop3", Hostname: "pop.test", Backend: b, TLS: cfg, CleartextFromLoopback: true, FailureDelay: 10 * time.Millisecond}
	if mod != nil {
		mod(&o)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := New(o)
	go s.Serve(ln)
	t.Cleanup(func() { s.Shutdown(time.Now().Add(time.Second)) })
	return ln.Addr().String(), s
}

type client struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func dial(t *testing.T, addr string) *client {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	cl := &client{t: t, c: c, r: bufio.NewReader(c)}
	cl.line()
	return cl
}

func (c *client) line() string {
	c.t.Helper()
	c.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	l, err := c.r.ReadString('\n')
	if err != nil {
		return "EOF"
	}
	return strings.TrimRight(l, "\r\n")
}

func (c *client) cmd(s string) string {
	c.t.Helper()
	fmt.Fprint(c.c, s+"\r\n")
	return c.line()
}

// multi reads a multi-line body up to ".", undoing the dot-stuffing.
func (c *client) multi() []string {
	var out []string
	for {
		l := c.line()
		if l == "." || l == "EOF" {
			return out
		}
		out = append(out, strings.TrimPrefix(l, "."))
	}
}

func (c *client) login() {
	c.t.Helper()
	if r := c.cmd("USER u"); !strings.HasPrefix(r, "+OK") {
		c.t.Fatalf("USER: %q", r)
	}
	if r := c.cmd("PASS p"); !strings.HasPrefix(r, "+OK") {
		c.t.Fatalf("PASS: %q", r)
	}
}

func TestStuffingSizesAndTop(t *testing.T) {
	msg := "Subject: a\r\n\r\n.starts with a dot\r\nline two\r\n..two dots\r\n"
	addr, _ := start(t, newBackend(msg, "no final line break"), nil)
	c := dial(t, addr)
	c.login()
	if r := c.cmd("STAT"); r != fmt.Sprintf("+OK 2 %d", len(msg)+len("no final line break")) {
		t.Errorf("STAT %q", r)
	}
	if r := c.cmd("LIST 1"); r != fmt.Sprintf("+OK 1 %d", len(msg)) {
		t.Errorf("LIST 1 %q", r)
	}
	if r := c.cmd("UIDL 2"); r != "+OK 2 UID02" {
		t.Errorf("UIDL 2 %q", r)
	}
	fmt.Fprint(c.c, "RETR 1\r\n")
	if r := c.line(); r != fmt.Sprintf("+OK %d octets", len(msg)) {
		t.Errorf("RETR %q", r)
	}
	raw := []string{}
	for l := c.line(); l != "."; l = c.line() {
		raw = append(raw, l)
	}
	if strings.Join(raw, "|") != "Subject: a||..starts with a dot|line two|...two dots" {
		t.Errorf("stuffed lines %q", raw)
	}
	fmt.Fprint(c.c, "RETR 2\r\n")
	c.line()
	if got := c.multi(); len(got) != 1 || got[0] != "no final line break" {
		t.Errorf("RETR 2 %q", got)
	}
	fmt.Fprint(c.c, "TOP 1 1\r\n")
	c.line()
	if got := c.multi(); strings.Join(got, "|") != "Subject: a||.starts with a dot" {
		t.Errorf("TOP 1 1 %q", got)
	}
	if r := c.cmd("TOP 1 x"); !strings.HasPrefix(r, "-ERR") {
		t.Errorf("TOP with a bad count: %q", r)
	}
	if r := c.cmd("RETR 3"); !strings.HasPrefix(r, "-ERR") {
		t.Errorf("RETR of no message: %q", r)
	}
}

func TestCleartextLoginRefusedUnlessAllowed(t *testing.T) {
	addr, _ := start(t, newBackend(), func(o *Options) { o.CleartextFromLoopback = false })
	c := dial(t, addr)
	fmt.Fprint(c.c, "CAPA\r\n")
	c.line()
	caps := strings.Join(c.multi(), " ")
	if strings.Contains(caps, "USER") || strings.Contains(caps, "SASL") || !strings.Contains(caps, "STLS") {
		t.Errorf("cleartext CAPA offers %q", caps)
	}
	for _, cmd := range []string{"USER u", "PASS p", "AUTH PLAIN AHUAcA=="} {
		if r := c.cmd(cmd); !strings.HasPrefix(r, "-ERR [AUTH]") {
			t.Errorf("%s in cleartext: %q", cmd, r)
		}
	}
}

// TestSTLSDiscardsPlaintext: commands sent in the clear right after STLS
// (a man in the middle's injection) are not run inside TLS.
func TestSTLSDiscardsPlaintext(t *testing.T) {
	addr, _ := start(t, newBackend("Subject: x\r\n\r\nx\r\n"), func(o *Options) { o.CleartextFromLoopback = false })
	c := dial(t, addr)
	fmt.Fprint(c.c, "STLS\r\nUSER u\r\nPASS p\r\n")
	if r := c.line(); !strings.HasPrefix(r, "+OK") {
		t.Fatalf("STLS: %q", r)
	}
	tc := tls.Client(c.c, &tls.Config{InsecureSkipVerify: true})
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	tr := bufio.NewReader(tc)
	fmt.Fprint(tc, "STAT\r\n")
	tc.SetReadDeadline(time.Now().Add(5 * time.Second))
	r, _ := tr.ReadString('\n')
	if !strings.HasPrefix(r, "-ERR") {
		t.Fatalf("STAT after STLS answered %q: the injected login ran inside TLS", r)
	}
	fmt.Fprint(tc, "USER u\r\nPASS p\r\nSTAT\r\n")
	tr.ReadString('\n')
	tr.ReadString('\n')
	if r, _ := tr.ReadString('\n'); !strings.HasPrefix(r, "+OK 1 ") {
		t.Errorf("STAT after a login inside TLS: %q", r)
	}
}

func TestLimits(t *testing.T) {
	addr, _ := start(t, newBackend(), func(o *Options) { o.MaxPerIP = 2; o.IdleTimeout = time.Second }) // long enough that no session idles out before the third dials, on a busy machine
	c := dial(t, addr)
	if r := c.cmd(strings.Repeat("A", 600)); !strings.HasPrefix(r, "-ERR line too long") || c.line() != "EOF" {
		t.Errorf("a 600-octet line: %q", r)
	}
	c = dial(t, addr)
	for i := 0; i < maxBadCommands; i++ {
		c.cmd("BOGUS")
	}
	if r := c.line(); !strings.Contains(r, "too many bad commands") {
		t.Errorf("after %d bad commands: %q", maxBadCommands, r)
	}
	c = dial(t, addr)
	for i := 0; i < maxAuthTries; i++ {
		c.cmd("USER u")
		c.cmd("PASS wrong")
	}
	if r := c.line(); r != "EOF" {
		t.Errorf("after %d failed logins the session goes on: %q", maxAuthTries, r)
	}
	a, b := dial(t, addr), dial(t, addr)
	third, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer third.Close()
	third.SetReadDeadline(time.Now().Add(5 * time.Second))
	if l, _ := bufio.NewReader(third).ReadString('\n'); !strings.HasPrefix(l, "-ERR [SYS/TEMP]") {
		t.Errorf("a third session from one address: %q", l)
	}
	if r := a.line(); !strings.HasPrefix(r, "-ERR idle") {
		t.Errorf("idle session: %q", r)
	}
	b.c.Close()
}

func TestImplicitTLSAndLock(t *testing.T) {
	be := newBackend("Subject: x\r\n\r\nx\r\n")
	addr, _ := start(t, be, func(o *Options) { o.ImplicitTLS = true; o.CleartextFromLoopback = false })
	conn := func() (*tls.Conn, *bufio.Reader) {
		tc, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tc.Close() })
		r := bufio.NewReader(tc)
		r.ReadString('\n')
		return tc, r
	}
	a, ar := conn()
	fmt.Fprint(a, "USER u\r\nPASS p\r\n")
	ar.ReadString('\n')
	if l, _ := ar.ReadString('\n'); !strings.HasPrefix(l, "+OK") {
		t.Fatalf("login over implicit TLS: %q", l)
	}
	b, br := conn()
	fmt.Fprint(b, "USER u\r\nPASS p\r\n")
	br.ReadString('\n')
	if l, _ := br.ReadString('\n'); !strings.HasPrefix(l, "-ERR [IN-USE]") {
		t.Errorf("second session: %q", l)
	}
	fmt.Fprint(a, "DELE 1\r\nQUIT\r\n")
	ar.ReadString('\n')
	if l, _ := ar.ReadString('\n'); !strings.Contains(l, "(1 messages deleted)") {
		t.Errorf("QUIT: %q", l)
	}
	if len(be.deleted) != 1 {
		t.Errorf("deleted %v", be.deleted)
	}
	// The lock is free again.
	fmt.Fprint(b, "USER u\r\nPASS p\r\n")
	br.ReadString('\n')
	if l, _ := br.ReadString('\n'); !strings.HasPrefix(l, "+OK u has 0 messages") {
		t.Errorf("after the first session quit: %q", l)
	}
}

// TestLockSharedBetweenListeners: a mailbox open through one listener is
// in use for the other too (POP3 and POP3S share the lock table).
func TestLockSharedBetweenListeners(t *testing.T) {
	locks, be := NewLocks(), newBackend("Subject: x\r\n\r\nx\r\n")
	a, _ := start(t, be, func(o *Options) { o.Locks = locks })
	b, _ := start(t, be, func(o *Options) { o.Locks = locks })
	first := dial(t, a)
	first.login()
	second := dial(t, b)
	second.cmd("USER u")
	if r := second.cmd("PASS p"); !strings.HasPrefix(r, "-ERR [IN-USE]") {
		t.Errorf("the other listener let a second session in: %q", r)
	}
}

// TestImplicitTLSHandshakeTimesOut: a client that connects to the POP3S
// port and says nothing is dropped, not left holding a slot.
func TestImplicitTLSHandshakeTimesOut(t *testing.T) {
	addr, _ := start(t, newBackend(), func(o *Options) { o.ImplicitTLS = true; o.IdleTimeout = 300 * time.Millisecond })
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	_, err = c.Read(make([]byte, 1))
	if err == nil || time.Since(start) > 3*time.Second {
		t.Errorf("a silent client on the TLS port: %v after %v", err, time.Since(start))
	}
}

// A connection that does not log in is closed after the login timeout,
// well before the ten-minute idle timeout of a session that did, so that
// idle connections cannot hold every slot; a session that logged in gets
// the idle timeout.
func TestLoginTimeout(t *testing.T) {
	addr, _ := start(t, newBackend("Subject: a\r\n\r\nx\r\n"), func(o *Options) {
		o.LoginTimeout = 200 * time.Millisecond
		o.IdleTimeout = 3 * time.Second
	})
	idle := dial(t, addr)
	start := time.Now()
	if r := idle.line(); !strings.HasPrefix(r, "-ERR idle") || time.Since(start) > 2*time.Second {
		t.Fatalf("no login: %q after %v", r, time.Since(start))
	}
	// Commands do not put the login timeout off.
	busy := dial(t, addr)
	start = time.Now()
	for time.Since(start) < time.Second {
		if r := busy.cmd("CAPA"); !strings.HasPrefix(r, "+OK") {
			if !strings.HasPrefix(r, "-ERR idle") && r != "EOF" {
				t.Fatalf("CAPA → %q", r)
			}
			break
		}
		busy.multi()
		time.Sleep(50 * time.Millisecond)
	}
	if took := time.Since(start); took > 900*time.Millisecond {
		t.Fatalf("a session sending CAPA without logging in stayed %v (login timeout 200ms)", took)
	}
	in := dial(t, addr)
	in.login()
	time.Sleep(500 * time.Millisecond)
	if r := in.cmd("STAT"); !strings.HasPrefix(r, "+OK 1 ") {
		t.Fatalf("logged in, idle 0.5 s: %q", r)
	}
}

// Past the per-client limit, an implicit-TLS listener closes the
// connection without writing cleartext at it, which a TLS client would
// read as a broken handshake.
func TestImplicitTLSRefusalIsNotCleartext(t *testing.T) {
	addr, _ := start(t, newBackend(), func(o *Options) { o.ImplicitTLS = true; o.MaxPerIP = 1 })
	first, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	time.Sleep(50 * time.Millisecond) // the first is counted
	second, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	second.SetReadDeadline(time.Now().Add(3 * time.Second))
	b, err := io.ReadAll(second)
	if err != nil || len(b) != 0 {
		t.Fatalf("over the limit, the TLS listener sent %q (%v)", b, err)
	}
}
