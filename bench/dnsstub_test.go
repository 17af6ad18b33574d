package bench

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func startTestStub(t *testing.T) *DNSStub {
	t.Helper()
	d, err := StartDNSStub()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Error(err)
		}
	})
	return d
}

// stubQuery asks d about name over network ("udp" or "tcp"), with EDNS0 if
// edns > 0.
func stubQuery(t *testing.T, d *DNSStub, network, name string, qtype uint16, edns uint16) *dns.Msg {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	if edns > 0 {
		m.SetEdns0(edns, false)
	}
	c := &dns.Client{Net: network, Timeout: 3 * time.Second, UDPSize: edns}
	r, _, err := c.Exchange(m, d.Addr())
	if err != nil {
		t.Fatalf("%s %s over %s: %v", name, dns.TypeToString[qtype], network, err)
	}
	if !r.Response || r.Id != m.Id || len(r.Question) != 1 || r.Question[0].Name != dns.Fqdn(name) {
		t.Fatalf("reply does not match the question: %v", r)
	}
	return r
}

// rrStrings renders records without their headers' TTL, e.g.
// "mx.test. MX 10 a.test.".
func rrStrings(rrs []dns.RR) []string {
	var out []string
	for _, rr := range rrs {
		if rr.Header().Rrtype == dns.TypeOPT {
			continue
		}
		f := strings.Fields(rr.String())
		out = append(out, strings.Join(append([]string{f[0]}, f[3:]...), " "))
	}
	slices.Sort(out)
	return out
}

func wantRRs(t *testing.T, what string, got []dns.RR, want ...string) {
	t.Helper()
	slices.Sort(want)
	if g := rrStrings(got); !slices.Equal(g, want) {
		t.Errorf("%s: got %q, want %q", what, g, want)
	}
}

func wantRcode(t *testing.T, what string, r *dns.Msg, rcode int) {
	t.Helper()
	if r.Rcode != rcode {
		t.Errorf("%s: rcode %s, want %s", what, dns.RcodeToString[r.Rcode], dns.RcodeToString[rcode])
	}
}

// wantNegative checks an NXDOMAIN or NODATA reply: no answer and the SOA
// of zone in the authority section.
func wantNegative(t *testing.T, what string, r *dns.Msg, rcode int, zone string, ttl uint32) {
	t.Helper()
	wantRcode(t, what, r, rcode)
	if len(r.Answer) != 0 || len(r.Ns) != 1 {
		t.Fatalf("%s: answer %v, authority %v", what, r.Answer, r.Ns)
	}
	soa, ok := r.Ns[0].(*dns.SOA)
	if !ok || soa.Hdr.Name != zone || soa.Minttl != ttl || soa.Hdr.Ttl != ttl {
		t.Errorf("%s: authority %v, want the SOA of %s with TTL %d", what, r.Ns[0], zone, ttl)
	}
}

func TestDNSStubRecords(t *testing.T) {
	d := startTestStub(t)
	d.SetMX("Example.COM", MX{10, "mx1.example.com"}, MX{20, "MX2.example.net."})
	d.SetA("mx1.example.com", "192.0.2.1", "2001:db8::1")
	d.SetA("mx2.example.net", "192.0.2.2")
	for _, network := range []string{"udp", "tcp"} {
		r := stubQuery(t, d, network, "example.com", dns.TypeMX, 0)
		wantRcode(t, network, r, dns.RcodeSuccess)
		if !r.Authoritative {
			t.Errorf("%s: not authoritative", network)
		}
		wantRRs(t, network+" MX answer", r.Answer, "example.com. MX 10 mx1.example.com.", "example.com. MX 20 mx2.example.net.")
		wantRRs(t, network+" MX additional", r.Extra, "mx1.example.com. A 192.0.2.1", "mx1.example.com. AAAA 2001:db8::1", "mx2.example.net. A 192.0.2.2")
		if r.Answer[0].Header().Ttl != 300 {
			t.Errorf("default TTL %d", r.Answer[0].Header().Ttl)
		}
	}
	// Case-insensitive, the owner name as asked.
	r := stubQuery(t, d, "udp", "EXAMPLE.com", dns.TypeMX, 1232)
	wantRRs(t, "upper case", r.Answer, "EXAMPLE.com. MX 10 mx1.example.com.", "EXAMPLE.com. MX 20 mx2.example.net.")
	if r.IsEdns0() == nil {
		t.Error("no OPT in the reply to an EDNS0 query")
	}
	wantRRs(t, "A", stubQuery(t, d, "udp", "mx1.example.com", dns.TypeA, 0).Answer, "mx1.example.com. A 192.0.2.1")
	wantRRs(t, "AAAA", stubQuery(t, d, "tcp", "mx1.example.com", dns.TypeAAAA, 0).Answer, "mx1.example.com. AAAA 2001:db8::1")

	// NODATA: the name exists, the type does not.
	wantNegative(t, "A of example.com", stubQuery(t, d, "udp", "example.com", dns.TypeA, 0), dns.RcodeSuccess, "example.com.", 300)
	wantNegative(t, "TXT of mx1", stubQuery(t, d, "udp", "mx1.example.com", dns.TypeTXT, 0), dns.RcodeSuccess, "example.com.", 300)
	wantNegative(t, "AAAA of mx2", stubQuery(t, d, "udp", "mx2.example.net", dns.TypeAAAA, 0), dns.RcodeSuccess, "example.net.", 300)
	// NXDOMAIN, with the SOA of the closest existing ancestor.
	d.SetTTL(60)
	wantNegative(t, "unknown under a known domain", stubQuery(t, d, "udp", "nope.example.com", dns.TypeMX, 0), dns.RcodeNameError, "example.com.", 60)
	wantNegative(t, "unknown", stubQuery(t, d, "tcp", "unknown.invalid", dns.TypeA, 0), dns.RcodeNameError, ".", 60)
	if ttl := stubQuery(t, d, "udp", "example.com", dns.TypeMX, 0).Answer[0].Header().Ttl; ttl != 60 {
		t.Errorf("TTL %d after SetTTL(60)", ttl)
	}

	// Null MX.
	d.SetNullMX("nomail.test")
	r = stubQuery(t, d, "udp", "nomail.test", dns.TypeMX, 0)
	wantRRs(t, "null MX", r.Answer, "nomail.test. MX 0 .")
	if len(r.Extra) != 0 {
		t.Errorf("null MX additional %v", r.Extra)
	}

	// Empty non-terminals exist until their last descendant goes.
	d.SetA("a.b.c.test", "192.0.2.9")
	wantNegative(t, "empty non-terminal", stubQuery(t, d, "udp", "b.c.test", dns.TypeA, 0), dns.RcodeSuccess, "b.c.test.", 60)
	d.SetA("a.b.c.test")
	wantNegative(t, "removed", stubQuery(t, d, "udp", "b.c.test", dns.TypeA, 0), dns.RcodeNameError, "test.", 60) // test. is above nomail.test
	wantNegative(t, "removed", stubQuery(t, d, "udp", "a.b.c.test", dns.TypeA, 0), dns.RcodeNameError, "test.", 60)

	// SERVFAIL on and off.
	d.SetServFail("EXAMPLE.COM.", true)
	wantRcode(t, "servfail", stubQuery(t, d, "udp", "example.com", dns.TypeMX, 0), dns.RcodeServerFailure)
	wantRcode(t, "servfail tcp", stubQuery(t, d, "tcp", "example.com", dns.TypeA, 0), dns.RcodeServerFailure)
	wantRcode(t, "other name", stubQuery(t, d, "udp", "mx1.example.com", dns.TypeA, 0), dns.RcodeSuccess)
	d.SetServFail("example.com", false)
	wantRcode(t, "servfail off", stubQuery(t, d, "udp", "example.com", dns.TypeMX, 0), dns.RcodeSuccess)

	// Query counter.
	before := d.Queries()
	for range 5 {
		stubQuery(t, d, "udp", "example.com", dns.TypeMX, 0)
		stubQuery(t, d, "tcp", "nope.test", dns.TypeMX, 0)
	}
	if n := d.Queries() - before; n != 10 {
		t.Errorf("%d queries counted, want 10", n)
	}
}

func TestDNSStubWildcard(t *testing.T) {
	d := startTestStub(t)
	d.SetWildcard("Bench.Test", MX{10, "mx.bench.test"})
	d.SetA("mx.bench.test", "127.0.0.1")
	d.SetMX("special.bench.test", MX{5, "other.test"})
	for _, name := range []string{"d123.bench.test", "D7.BENCH.test", "a.b.bench.test"} {
		r := stubQuery(t, d, "udp", name, dns.TypeMX, 0)
		wantRRs(t, name, r.Answer, dns.Fqdn(name)+" MX 10 mx.bench.test.")
		wantRRs(t, name+" additional", r.Extra, "mx.bench.test. A 127.0.0.1")
	}
	wantNegative(t, "A of a wildcard name", stubQuery(t, d, "udp", "d1.bench.test", dns.TypeA, 0), dns.RcodeSuccess, "bench.test.", 300)
	wantNegative(t, "the suffix itself", stubQuery(t, d, "udp", "bench.test", dns.TypeMX, 0), dns.RcodeSuccess, "bench.test.", 300)
	wantNegative(t, "MX of the MX host", stubQuery(t, d, "udp", "mx.bench.test", dns.TypeMX, 0), dns.RcodeSuccess, "bench.test.", 300)
	wantRRs(t, "own records win", stubQuery(t, d, "tcp", "special.bench.test", dns.TypeMX, 0).Answer, "special.bench.test. MX 5 other.test.")
	wantNegative(t, "outside", stubQuery(t, d, "udp", "d1.other.test", dns.TypeMX, 0), dns.RcodeNameError, "test.", 300)

	d.SetWildcard("sub.bench.test", MX{20, "mx2.bench.test"})
	wantRRs(t, "longest suffix", stubQuery(t, d, "udp", "x.sub.bench.test", dns.TypeMX, 0).Answer, "x.sub.bench.test. MX 20 mx2.bench.test.")
	d.SetWildcard("sub.bench.test", MX{})
	wantRRs(t, "removed", stubQuery(t, d, "udp", "x.sub.bench.test", dns.TypeMX, 0).Answer, "x.sub.bench.test. MX 10 mx.bench.test.")
}

func TestDNSStubTruncation(t *testing.T) {
	d := startTestStub(t)
	var mx []MX
	for i := range 40 {
		mx = append(mx, MX{uint16(i), fmt.Sprintf("a-rather-long-mail-exchanger-name-%02d.example.org", i)})
	}
	d.SetMX("big.test", mx...)
	r := stubQuery(t, d, "udp", "big.test", dns.TypeMX, 0)
	if !r.Truncated || len(r.Answer) >= 40 {
		t.Errorf("UDP without EDNS0: truncated %v with %d answers", r.Truncated, len(r.Answer))
	}
	if r := stubQuery(t, d, "tcp", "big.test", dns.TypeMX, 0); r.Truncated || len(r.Answer) != 40 {
		t.Errorf("TCP: truncated %v with %d answers", r.Truncated, len(r.Answer))
	}
	if r := stubQuery(t, d, "udp", "big.test", dns.TypeMX, 4096); r.Truncated || len(r.Answer) != 40 {
		t.Errorf("UDP with EDNS0 4096: truncated %v with %d answers", r.Truncated, len(r.Answer))
	}
}

func TestDNSStubConcurrent(t *testing.T) {
	d := startTestStub(t)
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := range 200 {
			name := fmt.Sprintf("d%d.test", i%10)
			d.SetMX(name, MX{10, "mx." + name})
			d.SetA("mx."+name, "192.0.2.1")
			d.SetServFail(name, i%3 == 0)
		}
	})
	for w := range 4 {
		wg.Go(func() {
			c := &dns.Client{Net: "udp", Timeout: 3 * time.Second}
			for i := range 50 {
				m := new(dns.Msg)
				m.SetQuestion(fmt.Sprintf("d%d.test.", (i+w)%10), dns.TypeMX)
				if _, _, err := c.Exchange(m, d.Addr()); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if n := d.Queries(); n != 200 {
		t.Errorf("%d queries counted, want 200", n)
	}
	if err := d.Close(); err != nil {
		t.Error(err)
	}
	if err := d.Close(); err != nil {
		t.Error(err)
	}
}
