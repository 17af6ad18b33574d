package server

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/mtaproject/mta/mta/certs"
	"github.com/mtaproject/mta/spool"
)

// receiver is a go-smtp server standing in for a smarthost or a remote MX:
// an independent SMTP implementation to interoperate with.
type receiver struct {
	mu   sync.Mutex
	got  []received
	user string // AUTH PLAIN user ("" = no AUTH offered)
	pass string
}

type received struct {
	from, user string
	to         []string
	tls        bool
	data       string
}

func (r *receiver) NewSession(c *smtp.Conn) (smtp.Session, error) {
	_, isTLS := c.TLSConnectionState()
	return &recvSession{r: r, tls: isTLS}, nil
}

type recvSession struct {
	r    *receiver
	tls  bool
	user string
	cur  received
}

func (s *recvSession) AuthMechanisms() []string {
	if s.r.user == "" {
		return nil
	}
	return []string{sasl.Plain}
}

func (s *recvSession) Auth(mech string) (sasl.Server, error) {
	return sasl.NewPlainServer(func(_, user, pass string) error {
		if user != s.r.user || pass != s.r.pass {
			return errors.New("bad credentials")
		}
		s.user = user
		return nil
	}), nil
}

func (s *recvSession) Mail(from string, _ *smtp.MailOptions) error {
	if s.r.user != "" && s.user == "" {
		return smtp.ErrAuthRequired
	}
	s.cur = received{from: from, user: s.user, tls: s.tls}
	return nil
}

func (s *recvSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	s.cur.to = append(s.cur.to, to)
	return nil
}

func (s *recvSession) Data(r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	s.cur.data = string(b)
	s.r.mu.Lock()
	s.r.got = append(s.r.got, s.cur)
	s.r.mu.Unlock()
	return nil
}

func (s *recvSession) Reset()        {}
func (s *recvSession) Logout() error { return nil }

func (r *receiver) messages() []received {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]received(nil), r.got...)
}

// startReceiver runs a go-smtp server on loopback, with STARTTLS if withTLS.
func startReceiver(t *testing.T, r *receiver, withTLS bool) string {
	t.Helper()
	srv := smtp.NewServer(r)
	srv.Domain = "receiver.test"
	srv.AllowInsecureAuth = true
	if withTLS {
		cfg, err := certs.SelfSigned(t.TempDir(), "receiver.test")
		if err != nil {
			t.Fatal(err)
		}
		srv.TLSConfig = cfg
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String()
}

// TestSmarthostWithAuthAndSTARTTLS relays everything through a static
// route to a go-smtp smarthost that requires AUTH and offers STARTTLS.
func TestSmarthostWithAuthAndSTARTTLS(t *testing.T) {
	r := &receiver{user: "relay-user", pass: "relay-secret"}
	addr := startReceiver(t, r, true)
	pwFile := filepath.Join(t.TempDir(), "smarthost.password")
	os.WriteFile(pwFile, []byte("relay-secret\n"), 0o600)
	w := newWorld(t, "", fmt.Sprintf(`routes:
  "*": {hosts: ["[%s]:%s"], tls: opportunistic, auth: {username: relay-user, password_file: %s}}
`, strings.Split(addr, ":")[0], strings.Split(addr, ":")[1], pwFile))
	id := w.send("app@example.org", []string{"someone@anywhere.test", "other@elsewhere.test"}, msg)
	w.waitFor("delivery through the smarthost", 15*time.Second, func() bool { return w.gone(id) })
	got := r.messages()
	if len(got) != 2 {
		t.Fatalf("smarthost got %d transactions, want 2 (one per domain)", len(got))
	}
	for _, m := range got {
		if m.user != "relay-user" || !m.tls || m.from != "app@example.org" || !strings.HasSuffix(m.data, msg) {
			t.Fatalf("smarthost received %+v", m)
		}
	}
}

// TestRequiredTLSWithoutSTARTTLSDefers: a route that requires TLS to a
// server that does not offer it delivers nothing and says why.
func TestRequiredTLSWithoutSTARTTLSDefers(t *testing.T) {
	r := &receiver{}
	addr := startReceiver(t, r, false)
	host, port, _ := net.SplitHostPort(addr)
	w := newWorld(t, "", fmt.Sprintf("routes:\n  \"*\": {hosts: [\"[%s]:%s\"], tls: required}\n", host, port))
	id := w.send("app@example.org", []string{"someone@anywhere.test"}, msg)
	defer func() {
		if t.Failed() {
			t.Logf("record: %+v", w.record(id).Recipients)
		}
	}()
	w.waitFor("the reason recorded", 15*time.Second, func() bool {
		return strings.Contains(w.record(id).Recipients[0].LastReply, "TLS")
	})
	time.Sleep(500 * time.Millisecond)
	if n := len(r.messages()); n != 0 {
		t.Fatalf("%d messages delivered without the required TLS", n)
	}
	if rc := w.record(id).Recipients[0]; rc.Status != spool.Queued {
		t.Fatalf("recipient %+v, want it still queued", rc)
	}
}
