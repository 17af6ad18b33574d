package resolve

import (
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// testServer is a real DNS server on 127.0.0.1, UDP and TCP on one port,
// answering from a map like a recursive resolver would, with behaviour that
// tests control per name.
type testServer struct {
	addr string

	mu       sync.Mutex
	rrs      map[string][]dns.RR // by lower-case FQDN
	servfail map[string]bool     // answer SERVFAIL
	drop     map[string]bool     // never answer
	dropAll  bool
	truncate map[string]bool // UDP answers are empty with TC set
	noChase  bool            // answer a CNAME without following it
	noEDNS   bool            // answer FORMERR to queries with EDNS0
	delay    time.Duration   // before answering
	soaMin   uint32          // SOA minimum of negative answers
	counts   map[string]int  // by "name TYPE", and "name TYPE udp|tcp"
	edns     []uint16        // EDNS0 UDP sizes seen, 0 without EDNS0
}

// newServer starts a server with the given zone records in presentation
// format, e.g. "example.com. 300 IN MX 10 mx.example.net.".
func newServer(t testing.TB, records ...string) *testServer {
	t.Helper()
	s := &testServer{
		rrs:      make(map[string][]dns.RR),
		servfail: make(map[string]bool),
		drop:     make(map[string]bool),
		truncate: make(map[string]bool),
		counts:   make(map[string]int),
		soaMin:   60,
	}
	s.add(t, records...)

	var pc net.PacketConn
	var ln net.Listener
	for try := 0; ; try++ {
		var err error
		pc, err = net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := pc.LocalAddr().(*net.UDPAddr).Port
		ln, err = net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err == nil {
			break
		}
		pc.Close()
		if try == 20 {
			t.Fatalf("no port free for both UDP and TCP: %v", err)
		}
	}
	s.addr = pc.LocalAddr().String()

	start := func(srv *dns.Server) {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		errc := make(chan error, 1)
		go func() { errc <- srv.ActivateAndServe() }()
		select {
		case <-started:
		case err := <-errc:
			t.Fatalf("DNS server: %v", err)
		}
		t.Cleanup(func() { srv.Shutdown() })
	}
	start(&dns.Server{PacketConn: pc, Handler: s})
	start(&dns.Server{Listener: ln, Handler: s})
	return s
}

func (s *testServer) add(t testing.TB, records ...string) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, rec := range records {
		rr, err := dns.NewRR(rec)
		if err != nil {
			t.Fatalf("record %q: %v", rec, err)
		}
		name := strings.ToLower(rr.Header().Name)
		s.rrs[name] = append(s.rrs[name], rr)
	}
}

// set changes the behaviour under the lock.
func (s *testServer) set(f func(s *testServer)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f(s)
}

// count returns the number of queries for name (without the trailing dot)
// and qtype, with an optional transport "udp" or "tcp".
func (s *testServer) count(name string, qtype uint16, transport ...string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := dns.Fqdn(name) + " " + dns.TypeToString[qtype]
	if len(transport) > 0 {
		k += " " + transport[0]
	}
	return s.counts[k]
}

// total returns the number of queries of any kind.
func (s *testServer) total() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for k, c := range s.counts {
		if strings.Count(k, " ") == 1 {
			n += c
		}
	}
	return n
}

func (s *testServer) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	if len(req.Question) != 1 {
		return
	}
	q := req.Question[0]
	name := strings.ToLower(q.Name)
	transport := "tcp"
	if _, ok := w.RemoteAddr().(*net.UDPAddr); ok {
		transport = "udp"
	}

	s.mu.Lock()
	k := name + " " + dns.TypeToString[q.Qtype]
	s.counts[k]++
	s.counts[k+" "+transport]++
	var size uint16
	if opt := req.IsEdns0(); opt != nil {
		size = opt.UDPSize()
	}
	s.edns = append(s.edns, size)
	drop, servfail := s.dropAll || s.drop[name], s.servfail[name]
	truncate, noChase, delay, soaMin := s.truncate[name], s.noChase, s.delay, s.soaMin
	formerr := s.noEDNS && size != 0
	s.mu.Unlock()

	if delay > 0 {
		time.Sleep(delay)
	}
	if drop {
		return
	}
	m := new(dns.Msg)
	m.SetReply(req)
	m.RecursionAvailable = true
	switch {
	case servfail:
		m.Rcode = dns.RcodeServerFailure
	case formerr:
		m.Rcode = dns.RcodeFormatError
	case truncate && transport == "udp":
		m.Truncated = true
	default:
		s.answer(m, name, q.Qtype, noChase, soaMin)
	}
	w.WriteMsg(m)
}

// answer fills m like a recursive resolver: the CNAME chain (unless noChase)
// and the records, or NXDOMAIN / no data with an SOA.
func (s *testServer) answer(m *dns.Msg, name string, qtype uint16, noChase bool, soaMin uint32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cur := name
loop:
	for range 20 {
		rrs, exists := s.rrs[cur]
		if !exists {
			m.Rcode = dns.RcodeNameError
			break
		}
		var next string
		found := false
		for _, rr := range rrs {
			switch {
			case rr.Header().Rrtype == qtype:
				m.Answer = append(m.Answer, dns.Copy(rr))
				found = true
			case rr.Header().Rrtype == dns.TypeCNAME && qtype != dns.TypeCNAME:
				m.Answer = append(m.Answer, dns.Copy(rr))
				next = strings.ToLower(rr.(*dns.CNAME).Target)
			}
		}
		switch {
		case found:
			return
		case next == "":
			break loop // no data
		case noChase:
			return
		}
		cur = next
	}
	soa, _ := dns.NewRR("test. 3600 IN SOA ns.test. admin.test. 1 3600 600 86400 " + strconv.Itoa(int(soaMin)))
	m.Ns = append(m.Ns, soa)
}
