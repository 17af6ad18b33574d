package smtpd

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/mtaproject/mta/mta/certs"
	"github.com/mtaproject/mta/spool"
)

type fixedAuth map[string]string

func (a fixedAuth) Authenticate(u, p string) bool { pw, ok := a[u]; return ok && pw == p }

// MaySend lets "restricted" use only addresses at restricted.test.
func (a fixedAuth) MaySend(u, from string) bool {
	return u != "restricted" || strings.HasSuffix(from, "@restricted.test")
}

type testServer struct {
	addr    string
	srv     *Server
	spool   *spool.Spool
	metrics *Metrics
	tls     *tls.Config
}

// startServer runs a listener on 127.0.0.1:0 over a real spool in a temp
// dir. edit may change the options before start.
func startServer(t *testing.T, edit func(*Options)) *testServer {
	t.Helper()
	sp, err := spool.Open(t.TempDir(), spool.Options{Sync: true})
	if err != nil {
		t.Fatal(err)
	}
	tlsCfg, err := certs.SelfSigned(t.TempDir(), "mx.test")
	if err != nil {
		t.Fatal(err)
	}
	m := NewMetrics(prometheus.NewRegistry())
	opts := Options{
		Name:         "smtp",
		Hostname:     "mx.test",
		LocalDomains: []string{"local.test"},
		Policy: Policy{
			Trusted:                   func(ip netip.Addr) bool { return ip.IsLoopback() },
			MaxMessageSize:            64 << 10,
			MaxRecipients:             5,
			MaxLineLength:             1000,
			CommandTimeout:            5 * time.Second,
			DataTimeout:               5 * time.Second,
			BareLineEndings:           RejectBareLineEndings,
			BareLineEndingsTrusted:    NormalizeBareLineEndings,
			RejectEarlyData:           true,
			CleartextAuthFromLoopback: true,
		},
		TLS:              tlsCfg,
		Spool:            sp,
		Auth:             fixedAuth{"alice": "s3cret"},
		Limits:           NewConnLimits(100, 100),
		Metrics:          m,
		AuthFailureDelay: time.Millisecond,
	}
	if edit != nil {
		edit(&opts)
	}
	s := New(opts)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Shutdown(ctx)
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		sp.Close()
	})
	return &testServer{addr: l.Addr().String(), srv: s, spool: sp, metrics: m, tls: tlsCfg}
}

func (ts *testServer) rejections(reason string) float64 {
	return testutil.ToFloat64(ts.metrics.rejected.WithLabelValues("smtp", reason))
}

// wire is a raw SMTP client for checking replies byte for byte.
type wire struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func dial(t *testing.T, addr string) *wire {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	w := &wire{t: t, conn: c, r: bufio.NewReader(c)}
	w.expect("220 ")
	return w
}

// reply reads one possibly multi-line reply and returns it whole.
func (w *wire) reply() string {
	w.t.Helper()
	_ = w.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	var all []string
	for {
		line, err := w.r.ReadString('\n')
		if err != nil {
			w.t.Fatalf("reading reply: %v (so far %q)", err, all)
		}
		all = append(all, strings.TrimRight(line, "\r\n"))
		if len(line) < 4 || line[3] != '-' {
			return strings.Join(all, "\n")
		}
	}
}

func (w *wire) send(s string) {
	w.t.Helper()
	if _, err := w.conn.Write([]byte(s)); err != nil {
		w.t.Fatal(err)
	}
}

// cmd sends a command line and returns the reply.
func (w *wire) cmd(line string) string {
	w.t.Helper()
	w.send(line + "\r\n")
	return w.reply()
}

func (w *wire) expect(prefix string) string {
	w.t.Helper()
	r := w.reply()
	if !strings.HasPrefix(r, prefix) {
		w.t.Fatalf("reply %q, want prefix %q", r, prefix)
	}
	return r
}

func (w *wire) cmdExpect(line, prefix string) string {
	w.t.Helper()
	r := w.cmd(line)
	if !strings.HasPrefix(r, prefix) {
		w.t.Fatalf("%s → %q, want prefix %q", line, r, prefix)
	}
	return r
}

// queuedID extracts the queue ID from a 250 reply to end of data.
func queuedID(t *testing.T, reply string) string {
	t.Helper()
	const marker = "250 2.0.0 Ok: queued as "
	if !strings.HasPrefix(reply, marker) {
		t.Fatalf("end of data reply %q, want %q<ID>", reply, marker)
	}
	id := strings.TrimPrefix(reply, marker)
	if !spool.ValidID(id) {
		t.Fatalf("bad queue ID %q", id)
	}
	return id
}

// storedMessage returns the spool record and the bytes after our Received:
// header.
func storedMessage(t *testing.T, sp *spool.Spool, id string) (*spool.Message, string) {
	t.Helper()
	m, err := sp.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	b, err := sp.Body(id)
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	if !strings.HasPrefix(s, "Received: from ") {
		t.Fatalf("stored message does not start with our Received: header: %q", s)
	}
	// The header ends at the first line that does not start with a tab.
	i := 0
	for {
		j := strings.Index(s[i:], "\r\n")
		i += j + 2
		if i >= len(s) || s[i] != '\t' {
			break
		}
	}
	return m, s[i:]
}

func newReader(c net.Conn) *bufio.Reader { return bufio.NewReader(c) }

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

// hasBareLineEnding reports whether b has a CR or LF outside a CRLF pair:
// the slow, obvious check the tests compare the reader's findings with.
func hasBareLineEnding(b []byte) bool {
	crlf := bytes.Count(b, []byte("\r\n"))
	return crlf != bytes.Count(b, []byte("\n")) || crlf != bytes.Count(b, []byte("\r"))
}
