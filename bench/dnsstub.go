package bench

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/miekg/dns"
)

// MX is one mail exchanger of a domain.
type MX struct {
	Pref uint16
	Host string
}

// DNSStub is an authoritative-looking DNS server on loopback, over UDP and
// TCP on the same port, answering MX, A and AAAA queries for synthetic
// domains. Names are case-insensitive, with or without the trailing dot.
//
// A name exists if it has records of its own, is an ancestor of a name that
// has (an empty non-terminal), is a wildcard suffix or is under one. An
// existing name without records of the asked type gets NOERROR with no
// answer (NODATA), a name that does not exist NXDOMAIN; both carry an SOA
// in the authority section whose TTL and MINIMUM are the stub's TTL. MX
// answers carry the A and AAAA records of their targets in the additional
// section. UDP answers larger than 512 bytes (or the client's EDNS0 size)
// are truncated with TC set, so that clients retry over TCP.
type DNSStub struct {
	udp, tcp *dns.Server
	done     [2]chan error
	addr     string

	mu       sync.RWMutex
	names    map[string]*stubName // by lower-case FQDN
	ents     map[string]int       // ancestors of names with records: how many such names are below
	wild     map[string]MX        // wildcard suffix (lower-case FQDN) -> MX
	servfail map[string]bool
	ttl      uint32

	queries   atomic.Int64
	closeOnce sync.Once
}

// stubName holds the records of one name.
type stubName struct {
	mx    []MX
	addrs []netip.Addr // A and AAAA
}

func (n *stubName) empty() bool { return len(n.mx) == 0 && len(n.addrs) == 0 }

// StartDNSStub starts a DNS stub on 127.0.0.1 with a random port, bound for
// both UDP and TCP, and returns once both serve.
func StartDNSStub() (*DNSStub, error) {
	d := &DNSStub{
		names:    make(map[string]*stubName),
		ents:     make(map[string]int),
		wild:     make(map[string]MX),
		servfail: make(map[string]bool),
		ttl:      300,
	}
	var pc net.PacketConn
	var ln net.Listener
	var err error
	for range 20 {
		pc, err = net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		port := pc.LocalAddr().(*net.UDPAddr).Port
		ln, err = net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err == nil {
			break
		}
		pc.Close()
	}
	if err != nil {
		return nil, fmt.Errorf("bench: DNS stub: no port free for both UDP and TCP: %w", err)
	}
	d.addr = pc.LocalAddr().String()
	h := dns.HandlerFunc(d.serve)
	d.udp = &dns.Server{PacketConn: pc, Handler: h}
	d.tcp = &dns.Server{Listener: ln, Handler: h}
	for i, srv := range []*dns.Server{d.udp, d.tcp} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		d.done[i] = make(chan error, 1)
		go func() { d.done[i] <- srv.ActivateAndServe() }()
		select {
		case <-started:
		case err := <-d.done[i]:
			d.done[i] <- err
			d.Close()
			return nil, fmt.Errorf("bench: DNS stub: %w", err)
		}
	}
	return d, nil
}

// Addr returns "127.0.0.1:port", the address for both UDP and TCP.
func (d *DNSStub) Addr() string { return d.addr }

// Close stops both servers and waits for them.
func (d *DNSStub) Close() error {
	var err error
	d.closeOnce.Do(func() {
		for i, srv := range []*dns.Server{d.udp, d.tcp} {
			if srv == nil {
				continue
			}
			if d.done[i] != nil {
				srv.Shutdown() // fails if it never started; done says how it ended
			}
			if srv.PacketConn != nil {
				srv.PacketConn.Close()
			} else {
				srv.Listener.Close()
			}
			if d.done[i] == nil {
				continue
			}
			if e := <-d.done[i]; e != nil && !errors.Is(e, net.ErrClosed) {
				err = errors.Join(err, e)
			}
		}
	})
	return err
}

// Queries returns the number of queries received (UDP and TCP).
func (d *DNSStub) Queries() int64 { return d.queries.Load() }

// stubCanonical returns the lower-case FQDN of name.
func stubCanonical(name string) string { return strings.ToLower(dns.Fqdn(name)) }

// update changes the records of name, keeping the empty non-terminals right.
func (d *DNSStub) update(name string, fn func(n *stubName)) {
	name = stubCanonical(name)
	d.mu.Lock()
	defer d.mu.Unlock()
	n := d.names[name]
	if n == nil {
		n = &stubName{}
	}
	had := !n.empty()
	fn(n)
	has := !n.empty()
	if has {
		d.names[name] = n
	} else {
		delete(d.names, name)
	}
	if had == has {
		return
	}
	for p := stubParent(name); p != ""; p = stubParent(p) {
		if has {
			d.ents[p]++
		} else if d.ents[p]--; d.ents[p] <= 0 {
			delete(d.ents, p)
		}
	}
}

// stubParent returns the parent of a FQDN ("" for the root).
func stubParent(name string) string {
	if name == "." {
		return ""
	}
	i := strings.IndexByte(name, '.')
	if i == len(name)-1 {
		return "."
	}
	return name[i+1:]
}

// SetMX sets the MX records of domain, replacing any; no mx removes them.
func (d *DNSStub) SetMX(domain string, mx ...MX) {
	recs := make([]MX, len(mx))
	for i, m := range mx {
		recs[i] = MX{m.Pref, stubCanonical(m.Host)}
	}
	d.update(domain, func(n *stubName) { n.mx = recs })
}

// SetNullMX gives domain the single record "MX 0 ." (RFC 7505: the domain
// accepts no mail).
func (d *DNSStub) SetNullMX(domain string) {
	d.update(domain, func(n *stubName) { n.mx = []MX{{0, "."}} })
}

// SetA sets the addresses of host, replacing any: IPv4 addresses answer A
// queries, IPv6 ones AAAA queries. No ips removes them. It panics on an
// invalid address.
func (d *DNSStub) SetA(host string, ips ...string) {
	addrs := make([]netip.Addr, len(ips))
	for i, s := range ips {
		a, err := netip.ParseAddr(s)
		if err != nil {
			panic(fmt.Sprintf("bench: DNSStub.SetA(%q): %v", host, err))
		}
		addrs[i] = a.Unmap()
	}
	d.update(host, func(n *stubName) { n.addrs = addrs })
}

// SetServFail makes every query for name (exactly that name, any type)
// answer SERVFAIL, or stops it.
func (d *DNSStub) SetServFail(name string, on bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if on {
		d.servfail[stubCanonical(name)] = true
	} else {
		delete(d.servfail, stubCanonical(name))
	}
}

// SetTTL sets the TTL of every record served from now on, including the
// negative TTL of the SOA (default 300).
func (d *DNSStub) SetTTL(ttl uint32) {
	d.mu.Lock()
	d.ttl = ttl
	d.mu.Unlock()
}

// SetWildcard makes every name under suffix (e.g. "d123.bench.test" for
// "bench.test") that has no records of its own, and is no ancestor of one,
// answer MX with mx, as a "*.suffix" wildcard would; the longest matching
// suffix wins. An MX with an empty Host removes the wildcard.
func (d *DNSStub) SetWildcard(suffix string, mx MX) {
	suffix = stubCanonical(suffix)
	d.mu.Lock()
	defer d.mu.Unlock()
	if mx.Host == "" {
		delete(d.wild, suffix)
		return
	}
	d.wild[suffix] = MX{mx.Pref, stubCanonical(mx.Host)}
}

// wildcard returns the MX of the longest wildcard suffix covering name.
func (d *DNSStub) wildcard(name string) (MX, bool) {
	if len(d.wild) == 0 {
		return MX{}, false
	}
	for p := stubParent(name); p != ""; p = stubParent(p) {
		if mx, ok := d.wild[p]; ok {
			return mx, true
		}
	}
	return MX{}, false
}

// exists reports whether name exists without records of its own.
func (d *DNSStub) exists(name string) bool {
	_, ent := d.ents[name]
	_, wild := d.wild[name]
	return ent || wild
}

func (d *DNSStub) serve(w dns.ResponseWriter, req *dns.Msg) {
	d.queries.Add(1)
	m := new(dns.Msg)
	m.SetReply(req)
	m.Authoritative = true
	maxSize := dns.MinMsgSize
	if opt := req.IsEdns0(); opt != nil {
		maxSize = max(int(opt.UDPSize()), dns.MinMsgSize)
		m.SetEdns0(uint16(min(maxSize, 4096)), false)
	}
	switch {
	case req.Opcode != dns.OpcodeQuery:
		m.Rcode = dns.RcodeNotImplemented
	case len(req.Question) != 1:
		m.Rcode = dns.RcodeFormatError
	default:
		d.answer(m, req.Question[0])
	}
	if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
		m.Truncate(maxSize)
	}
	w.WriteMsg(m)
}

// answer fills in the reply to question q.
func (d *DNSStub) answer(m *dns.Msg, q dns.Question) {
	name := stubCanonical(q.Name)
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.servfail[name] {
		m.Rcode = dns.RcodeServerFailure
		return
	}
	if q.Qclass != dns.ClassINET && q.Qclass != dns.ClassANY {
		m.Rcode = dns.RcodeRefused
		return
	}
	n := d.names[name]
	mxs := []MX(nil)
	if n != nil {
		mxs = n.mx
	} else if mx, ok := d.wildcard(name); ok && !d.exists(name) {
		mxs = []MX{mx}
	} else if !d.exists(name) {
		m.Rcode = dns.RcodeNameError
		m.Ns = append(m.Ns, d.soa(name))
		return
	}
	hdr := func(owner string, t uint16) dns.RR_Header {
		return dns.RR_Header{Name: owner, Rrtype: t, Class: dns.ClassINET, Ttl: d.ttl}
	}
	if q.Qtype == dns.TypeMX || q.Qtype == dns.TypeANY {
		for _, mx := range mxs {
			m.Answer = append(m.Answer, &dns.MX{Hdr: hdr(q.Name, dns.TypeMX), Preference: mx.Pref, Mx: mx.Host})
			if t := d.names[mx.Host]; t != nil {
				m.Extra = append(m.Extra, d.addrRRs(mx.Host, t.addrs, dns.TypeANY)...)
			}
		}
	}
	if n != nil && q.Qtype != dns.TypeMX {
		m.Answer = append(m.Answer, d.addrRRs(q.Name, n.addrs, q.Qtype)...)
	}
	if len(m.Answer) == 0 {
		m.Ns = append(m.Ns, d.soa(name))
	}
}

// addrRRs returns the A (qtype A), AAAA (AAAA) or both (ANY) records of
// owner.
func (d *DNSStub) addrRRs(owner string, addrs []netip.Addr, qtype uint16) []dns.RR {
	var rrs []dns.RR
	for _, a := range addrs {
		h := dns.RR_Header{Name: owner, Class: dns.ClassINET, Ttl: d.ttl}
		switch {
		case a.Is4() && (qtype == dns.TypeA || qtype == dns.TypeANY):
			h.Rrtype = dns.TypeA
			rrs = append(rrs, &dns.A{Hdr: h, A: a.AsSlice()})
		case a.Is6() && (qtype == dns.TypeAAAA || qtype == dns.TypeANY):
			h.Rrtype = dns.TypeAAAA
			rrs = append(rrs, &dns.AAAA{Hdr: h, AAAA: a.AsSlice()})
		}
	}
	return rrs
}

// soa returns the SOA for a negative answer about name. Its owner, taken
// as the zone apex, is the closest of name and its ancestors that has MX
// records, is a wildcard suffix or an empty non-terminal (the root if none).
func (d *DNSStub) soa(name string) dns.RR {
	zone := "."
	for p := name; p != "" && p != "."; p = stubParent(p) {
		if n := d.names[p]; (n != nil && len(n.mx) > 0) || d.exists(p) {
			zone = p
			break
		}
	}
	return &dns.SOA{
		Hdr:     dns.RR_Header{Name: zone, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: d.ttl},
		Ns:      "ns.dnsstub.test.",
		Mbox:    "hostmaster.dnsstub.test.",
		Serial:  1,
		Refresh: 3600,
		Retry:   600,
		Expire:  86400,
		Minttl:  d.ttl,
	}
}
