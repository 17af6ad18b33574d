package smtpclient

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"fmt"
	"io"
	"math/big"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// script configures the test server.
type script struct {
	rejectEHLO bool
	pipelining bool
	size       string // SIZE parameter; "" = not advertised
	dsn        bool
	eightBit   bool
	smtputf8   bool
	starttls   bool
	enhanced   bool
	auth       string // AUTH mechanisms advertised; "" = none
	user, pass string // accepted credentials

	// replies overrides the reply at a stage: "GREETING", "EHLO", "HELO",
	// "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "DOT", "RSET". The text is
	// the wire reply without its final CRLF (lines joined with "\r\n").
	// "STALL" never replies; "DROP" closes the connection; a reply starting
	// with 421 is sent and the connection closed.
	replies map[string]string
	rcpt    map[string]string // reply to RCPT by address
	// badTLS makes the server answer STARTTLS with 220 and then send
	// garbage instead of a TLS handshake.
	badTLS bool
	// dropAfter closes the connection after this many bytes of message data.
	dropAfter int
	delay     time.Duration // before each reply
	noRecord  bool          // don't keep messages (benchmarks)
}

// session is what the server saw on one connection.
type session struct {
	mu       sync.Mutex
	raw      bytes.Buffer // every byte read, decrypted after STARTTLS
	reads    []string     // each Read, for pipelining checks
	cmds     []string     // command lines
	msgs     []string     // message data as received (dot-stuffed, with ".\r\n")
	tls      bool
	authUser string
}

func (s *session) snapshot() (raw string, reads, cmds, msgs []string, tls bool, user string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.raw.String(), append([]string(nil), s.reads...), append([]string(nil), s.cmds...),
		append([]string(nil), s.msgs...), s.tls, s.authUser
}

type testServer struct {
	t        testing.TB
	ln       net.Listener
	sc       script
	cert     tls.Certificate
	mu       sync.Mutex
	sessions []*session
	conns    []net.Conn
	wg       sync.WaitGroup
}

func newServer(t testing.TB, sc script) *testServer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &testServer{t: t, ln: ln, sc: sc, cert: testCert(t)}
	s.wg.Add(1)
	go s.accept()
	t.Cleanup(func() {
		ln.Close()
		s.mu.Lock()
		for _, c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
	return s
}

func (s *testServer) addr() string { return s.ln.Addr().String() }

// session returns the i-th connection's session, waiting briefly for it.
func (s *testServer) session(i int) *session {
	for range 200 {
		s.mu.Lock()
		if i < len(s.sessions) {
			ss := s.sessions[i]
			s.mu.Unlock()
			return ss
		}
		s.mu.Unlock()
		time.Sleep(5 * time.Millisecond)
	}
	s.t.Fatalf("no session %d", i)
	return nil
}

func (s *testServer) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sessions)
}

func (s *testServer) accept() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		ss := &session{}
		s.mu.Lock()
		s.sessions = append(s.sessions, ss)
		s.conns = append(s.conns, c)
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer c.Close()
			h := &handler{s: s, ss: ss, plain: c}
			h.setConn(c)
			h.run()
		}()
	}
}

// recConn records what is read from a connection.
type recConn struct {
	net.Conn
	ss *session
}

func (r recConn) Read(p []byte) (int, error) {
	n, err := r.Conn.Read(p)
	if n > 0 {
		r.ss.mu.Lock()
		r.ss.raw.Write(p[:n])
		r.ss.reads = append(r.ss.reads, string(p[:n]))
		r.ss.mu.Unlock()
	}
	return n, err
}

type handler struct {
	s        *testServer
	ss       *session
	plain    net.Conn
	conn     net.Conn
	br       *bufio.Reader
	isTLS    bool
	mailOK   bool
	accepted int
}

var errStop = fmt.Errorf("stop")

func (h *handler) setConn(c net.Conn) {
	h.conn = c
	h.br = bufio.NewReader(recConn{c, h.ss})
}

// reply sends the reply for stage: the script's override, or def.
func (h *handler) reply(stage, def string) error {
	r, ok := h.s.sc.replies[stage]
	if !ok {
		r = def
	}
	return h.send(r)
}

func (h *handler) send(r string) error {
	if h.s.sc.delay > 0 {
		time.Sleep(h.s.sc.delay)
	}
	switch {
	case r == "STALL":
		io.Copy(io.Discard, h.conn)
		return errStop
	case r == "DROP":
		return errStop
	}
	if _, err := io.WriteString(h.conn, r+"\r\n"); err != nil {
		return errStop
	}
	if strings.HasPrefix(r, "421") {
		return errStop
	}
	return nil
}

func (h *handler) readLine() (string, error) {
	line, err := h.br.ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimSuffix(line, "\r\n"), nil
}

func (h *handler) run() {
	sc := &h.s.sc
	if h.reply("GREETING", "220 mx.test ESMTP test") != nil {
		return
	}
	for {
		line, err := h.readLine()
		if err != nil {
			return
		}
		h.ss.mu.Lock()
		h.ss.cmds = append(h.ss.cmds, line)
		h.ss.mu.Unlock()
		verb, arg, _ := strings.Cut(line, " ")
		switch strings.ToUpper(verb) {
		case "EHLO":
			if sc.rejectEHLO {
				err = h.send("502 5.5.2 Error: command not recognized")
				break
			}
			err = h.reply("EHLO", h.ehlo())
		case "HELO":
			err = h.reply("HELO", "250 mx.test")
		case "STARTTLS":
			err = h.startTLS()
		case "AUTH":
			err = h.auth(arg)
		case "MAIL":
			def := "250 2.1.0 Ok"
			if r, ok := sc.replies["MAIL"]; ok {
				def = r
			}
			h.mailOK = strings.HasPrefix(def, "2")
			h.accepted = 0
			err = h.send(def)
		case "RCPT":
			r := "250 2.1.5 Ok"
			if !h.mailOK {
				r = "503 5.5.1 Error: need MAIL command"
			} else if x, ok := sc.rcpt[pathOf(arg)]; ok {
				r = x
			} else if x, ok := sc.replies["RCPT"]; ok {
				r = x
			}
			if strings.HasPrefix(r, "2") {
				h.accepted++
			}
			err = h.send(r)
		case "DATA":
			err = h.data()
		case "RSET":
			h.mailOK, h.accepted = false, 0
			err = h.reply("RSET", "250 2.0.0 Ok")
		case "NOOP":
			err = h.send("250 2.0.0 Ok")
		case "QUIT":
			h.send("221 2.0.0 Bye")
			return
		default:
			err = h.send("502 5.5.2 Error: command not recognized")
		}
		if err != nil {
			return
		}
	}
}

// pathOf returns the address between angle brackets.
func pathOf(arg string) string {
	_, rest, _ := strings.Cut(arg, "<")
	addr, _, _ := strings.Cut(rest, ">")
	return addr
}

func (h *handler) ehlo() string {
	sc := &h.s.sc
	lines := []string{"mx.test"}
	add := func(ok bool, s string) {
		if ok {
			lines = append(lines, s)
		}
	}
	add(sc.pipelining, "PIPELINING")
	add(sc.size != "", "SIZE "+sc.size)
	add(sc.starttls && !h.isTLS, "STARTTLS")
	add(sc.auth != "", "AUTH "+sc.auth)
	add(sc.enhanced, "ENHANCEDSTATUSCODES")
	add(sc.eightBit, "8BITMIME")
	add(sc.dsn, "DSN")
	add(sc.smtputf8, "SMTPUTF8")
	var b strings.Builder
	for i, l := range lines {
		sep := "-"
		if i == len(lines)-1 {
			sep = " "
		}
		if i > 0 {
			b.WriteString("\r\n")
		}
		b.WriteString("250" + sep + l)
	}
	return b.String()
}

func (h *handler) startTLS() error {
	if err := h.reply("STARTTLS", "220 2.0.0 Ready to start TLS"); err != nil {
		return err
	}
	if r, ok := h.s.sc.replies["STARTTLS"]; ok && !strings.HasPrefix(r, "220") {
		return nil
	}
	if h.s.sc.badTLS {
		io.WriteString(h.plain, "this is not TLS\r\n")
		return errStop
	}
	tc := tls.Server(h.plain, &tls.Config{Certificates: []tls.Certificate{h.s.cert}})
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err != nil {
		return errStop
	}
	tc.SetDeadline(time.Time{})
	h.setConn(tc)
	h.isTLS = true
	h.ss.mu.Lock()
	h.ss.tls = true
	h.ss.mu.Unlock()
	return nil
}

func (h *handler) auth(arg string) error {
	sc := &h.s.sc
	mech, ir, _ := strings.Cut(arg, " ")
	var user, pass string
	switch strings.ToUpper(mech) {
	case "PLAIN":
		dec, _ := base64.StdEncoding.DecodeString(ir)
		parts := strings.Split(string(dec), "\x00")
		if len(parts) == 3 {
			user, pass = parts[1], parts[2]
		}
	case "LOGIN":
		var vals []string
		for _, prompt := range []string{"334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"} {
			if err := h.send(prompt); err != nil {
				return err
			}
			line, err := h.readLine()
			if err != nil {
				return err
			}
			dec, _ := base64.StdEncoding.DecodeString(line)
			vals = append(vals, string(dec))
		}
		user, pass = vals[0], vals[1]
	default:
		return h.send("504 5.5.4 Unrecognized authentication type")
	}
	if user != sc.user || pass != sc.pass {
		return h.reply("AUTH", "535 5.7.8 Error: authentication failed")
	}
	h.ss.mu.Lock()
	h.ss.authUser = user
	h.ss.mu.Unlock()
	return h.reply("AUTH", "235 2.7.0 Authentication successful")
}

func (h *handler) data() error {
	sc := &h.s.sc
	def := "354 End data with <CR><LF>.<CR><LF>"
	if h.accepted == 0 {
		def = "554 5.5.1 Error: no valid recipients"
	}
	r, ok := sc.replies["DATA"]
	if !ok {
		r = def
	}
	if err := h.send(r); err != nil || !strings.HasPrefix(r, "354") {
		return err
	}
	var msg strings.Builder
	for {
		line, err := h.br.ReadString('\n')
		if err != nil {
			return errStop
		}
		if !sc.noRecord || line == ".\r\n" {
			msg.WriteString(line)
		}
		if sc.dropAfter > 0 && msg.Len() >= sc.dropAfter {
			return errStop
		}
		if line == ".\r\n" {
			break
		}
	}
	if !sc.noRecord {
		h.ss.mu.Lock()
		h.ss.msgs = append(h.ss.msgs, msg.String())
		h.ss.mu.Unlock()
	}
	h.mailOK, h.accepted = false, 0
	return h.reply("DOT", "250 2.0.0 Ok: queued as TEST")
}

var (
	certOnce sync.Once
	certVal  tls.Certificate
	certErr  error
)

// testCert returns a self-signed certificate for localhost and 127.0.0.1.
func testCert(t testing.TB) tls.Certificate {
	certOnce.Do(func() {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			certErr = err
			return
		}
		tmpl := &x509.Certificate{
			SerialNumber:          big.NewInt(1),
			Subject:               pkix.Name{CommonName: "localhost"},
			DNSNames:              []string{"localhost"},
			IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
			NotBefore:             time.Now().Add(-time.Hour),
			NotAfter:              time.Now().Add(24 * time.Hour),
			KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
			ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
			BasicConstraintsValid: true,
			IsCA:                  true,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
		if err != nil {
			certErr = err
			return
		}
		leaf, _ := x509.ParseCertificate(der)
		certVal = tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
	})
	if certErr != nil {
		t.Fatal(certErr)
	}
	return certVal
}
