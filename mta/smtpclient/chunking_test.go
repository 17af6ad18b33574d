package smtpclient

import (
	"bytes"
	"context"
	"io"
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/emersion/go-smtp"

	"github.com/mtaproject/mta/mta"
)

// goSMTPReceiver is emersion/go-smtp's server, which offers CHUNKING: an
// independent implementation to check BDAT against.
type goSMTPReceiver struct {
	mu   sync.Mutex
	got  [][]byte
	rcpt [][]string
}

func (r *goSMTPReceiver) NewSession(*smtp.Conn) (smtp.Session, error) {
	return &goSMTPSession{r: r}, nil
}

type goSMTPSession struct {
	r  *goSMTPReceiver
	to []string
}

func (s *goSMTPSession) Mail(string, *smtp.MailOptions) error { s.to = nil; return nil }
func (s *goSMTPSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	if strings.HasPrefix(to, "bad") {
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
	}
	s.to = append(s.to, to)
	return nil
}
func (s *goSMTPSession) Data(r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	s.r.mu.Lock()
	s.r.got = append(s.r.got, b)
	s.r.rcpt = append(s.r.rcpt, s.to)
	s.r.mu.Unlock()
	return nil
}
func (s *goSMTPSession) Reset()        {}
func (s *goSMTPSession) Logout() error { return nil }

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func startGoSMTP(t *testing.T) (string, *goSMTPReceiver, *lockedBuffer) {
	t.Helper()
	r := &goSMTPReceiver{}
	srv := smtp.NewServer(r)
	srv.Domain = "gosmtp.test"
	trace := &lockedBuffer{}
	srv.Debug = trace
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().String(), r, trace
}

func TestBDATWhenChunkingIsOffered(t *testing.T) {
	addr, recv, trace := startGoSMTP(t)
	c, err := Dial(context.Background(), addr, "gosmtp.test", Options{LocalName: "client.test", TLS: TLSNone})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	bodies := []string{
		"Subject: one\r\n\r\n.starts with a dot\r\n.\r\nend\r\n",
		"Subject: two\r\n\r\nno final line break",
		"Subject: three\r\n\r\nx\r\n",
	}
	for i, body := range bodies {
		res, err := c.Send(context.Background(), &Message{From: "a@example.org", Data: []byte(body),
			Recipients: []mta.Recipient{{Address: "ok1@x.test"}, {Address: "bad@x.test"}, {Address: "ok2@x.test"}}})
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if res.Recipients[0].Code != 250 || res.Recipients[2].Code != 250 || res.Recipients[1].Code != 550 {
			t.Fatalf("message %d results: %v %v %v", i, res.Recipients[0], res.Recipients[1], res.Recipients[2])
		}
	}
	if !strings.Contains(trace.String(), "BDAT ") || strings.Contains(trace.String(), "\r\nDATA\r\n") {
		t.Fatal("the transactions did not use BDAT")
	}
	recv.mu.Lock()
	defer recv.mu.Unlock()
	if len(recv.got) != 3 {
		t.Fatalf("receiver got %d messages", len(recv.got))
	}
	for i, body := range bodies {
		want := body
		if !strings.HasSuffix(want, "\r\n") {
			want += "\r\n"
		}
		if string(recv.got[i]) != want {
			t.Fatalf("message %d arrived as %q, want %q", i, recv.got[i], want)
		}
		if strings.Join(recv.rcpt[i], ",") != "ok1@x.test,ok2@x.test" {
			t.Fatalf("message %d recipients %v", i, recv.rcpt[i])
		}
	}
}

func TestBDATNoRecipientKeepsTheConnectionInStep(t *testing.T) {
	addr, recv, _ := startGoSMTP(t)
	c, err := Dial(context.Background(), addr, "gosmtp.test", Options{LocalName: "client.test", TLS: TLSNone})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	res, err := c.Send(context.Background(), &Message{From: "a@example.org", Data: []byte("Subject: x\r\n\r\ny\r\n"),
		Recipients: []mta.Recipient{{Address: "bad1@x.test"}, {Address: "bad2@x.test"}}})
	if err != nil || res.Recipients[0].Code != 550 || res.Recipients[1].Code != 550 {
		t.Fatalf("all refused: %v %+v", err, res)
	}
	if !c.Usable() {
		t.Fatal("connection unusable after a refused BDAT")
	}
	res, err = c.Send(context.Background(), &Message{From: "a@example.org", Data: []byte("Subject: z\r\n\r\nw\r\n"),
		Recipients: []mta.Recipient{{Address: "ok@x.test"}}})
	if err != nil || res.Recipients[0].Code != 250 {
		t.Fatalf("next message: %v %+v", err, res)
	}
	recv.mu.Lock()
	defer recv.mu.Unlock()
	if len(recv.got) != 1 || string(recv.got[0]) != "Subject: z\r\n\r\nw\r\n" {
		t.Fatalf("receiver got %q", recv.got)
	}
}

func TestNoChunkingUsesDATA(t *testing.T) {
	addr, _, trace := startGoSMTP(t)
	c, err := Dial(context.Background(), addr, "gosmtp.test", Options{LocalName: "client.test", TLS: TLSNone, NoChunking: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Send(context.Background(), &Message{From: "a@example.org", Data: []byte("x\r\n"),
		Recipients: []mta.Recipient{{Address: "ok@x.test"}}}); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(trace.String(), "BDAT") {
		t.Fatal("BDAT used with NoChunking")
	}
}

// TestExtensionsAreForgottenOnHELO: every extension, CHUNKING included, is
// forgotten before a new EHLO or HELO.
func TestExtensionsAreForgottenOnHELO(t *testing.T) {
	c := &Conn{chunking: true, pipelining: true, has8bit: true, hasSize: true, sizeLimit: 10, ext: map[string]string{"CHUNKING": ""}}
	c.resetExtensions()
	if c.chunking || c.pipelining || c.has8bit || c.hasSize || c.sizeLimit != 0 || len(c.ext) != 0 {
		t.Fatalf("after reset: %+v", c)
	}
}

func TestNeedsUTF8(t *testing.T) {
	ascii := &Message{From: "a@example.org", Recipients: []mta.Recipient{{Address: "b@example.com"}}, Data: []byte("Subject: plain\r\n\r\nk\xc3\xa4se in the body only\r\n")}
	if needsUTF8(ascii) {
		t.Error("an ASCII envelope and header need no SMTPUTF8 (8-bit body is 8BITMIME's business)")
	}
	for name, m := range map[string]*Message{
		"sender":    {From: "j\xc3\xbcrgen@example.org", Recipients: ascii.Recipients, Data: ascii.Data},
		"recipient": {From: ascii.From, Recipients: []mta.Recipient{{Address: "\xc3\xa9@example.com"}}, Data: ascii.Data},
		"header":    {From: ascii.From, Recipients: ascii.Recipients, Data: []byte("Subject: k\xc3\xa4se\r\n\r\nx\r\n")},
	} {
		if !needsUTF8(m) {
			t.Errorf("UTF-8 in the %s not seen", name)
		}
	}
}
