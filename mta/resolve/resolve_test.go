package resolve

import (
	"context"
	"errors"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/mtaproject/mta/mta"
)

// clock is a settable Config.Now.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func newResolver(t *testing.T, cfg Config, servers ...*testServer) *Resolver {
	t.Helper()
	for _, s := range servers {
		cfg.Servers = append(cfg.Servers, s.addr)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 2 * time.Second
	}
	r, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// wantReply checks that err wraps a Reply with code and enhanced code.
func wantReply(t *testing.T, err error, code int, enh mta.Enhanced) {
	t.Helper()
	var rep *mta.Reply
	if !errors.As(err, &rep) {
		t.Fatalf("error %v does not wrap a *mta.Reply", err)
	}
	if rep.Code != code || rep.Enhanced != enh {
		t.Fatalf("reply %v, want %d %v", rep, code, enh)
	}
	if perm := code >= 500; mta.IsPermanent(err) != perm {
		t.Fatalf("IsPermanent(%v) = %v, want %v", err, !perm, perm)
	}
}

func names(d *Destination) []string {
	var n []string
	for _, h := range d.Hosts {
		n = append(n, h.Name)
	}
	return n
}

func addrs(ss ...string) []netip.Addr {
	var a []netip.Addr
	for _, s := range ss {
		a = append(a, netip.MustParseAddr(s))
	}
	return a
}

func TestMXPreferenceOrder(t *testing.T) {
	s := newServer(t,
		"example.com. 300 IN MX 20 mx2.example.net.",
		"example.com. 300 IN MX 10 MX1.Example.NET.",
		"example.com. 300 IN MX 30 mx3.example.net.",
		"mx1.example.net. 300 IN A 192.0.2.1",
		"mx1.example.net. 300 IN A 192.0.2.11",
		"mx2.example.net. 300 IN A 192.0.2.2",
		"mx3.example.net. 300 IN A 192.0.2.3",
		"mx3.example.net. 300 IN AAAA 2001:db8::3",
	)
	r := newResolver(t, Config{}, s)
	d, err := r.Resolve(context.Background(), "Example.COM.")
	if err != nil {
		t.Fatal(err)
	}
	if d.Domain != "example.com" || d.Route != nil || d.TLS != TLSOpportunistic {
		t.Errorf("destination %+v", d)
	}
	if want := "mx:10 mx1.example.net,20 mx2.example.net,30 mx3.example.net"; d.Key != want {
		t.Errorf("key %q, want %q", d.Key, want)
	}
	want := []Host{
		{Name: "mx1.example.net", Preference: 10, Port: 25, Addrs: addrs("192.0.2.1", "192.0.2.11")},
		{Name: "mx2.example.net", Preference: 20, Port: 25, Addrs: addrs("192.0.2.2")},
		{Name: "mx3.example.net", Preference: 30, Port: 25, Addrs: addrs("192.0.2.3")}, // no AAAA without IPv6
	}
	if len(d.Hosts) != len(want) {
		t.Fatalf("hosts %+v, want %+v", d.Hosts, want)
	}
	for i := range want {
		if g := d.Hosts[i]; g.Name != want[i].Name || g.Preference != want[i].Preference ||
			g.Port != want[i].Port || !slices.Equal(g.Addrs, want[i].Addrs) {
			t.Errorf("host %d = %+v, want %+v", i, g, want[i])
		}
	}
	if n := s.count("mx3.example.net", dns.TypeAAAA); n != 0 {
		t.Errorf("%d AAAA queries without IPv6", n)
	}
}

func TestEqualPreferenceShuffle(t *testing.T) {
	s := newServer(t,
		"example.com. 300 IN MX 10 a.example.net.",
		"example.com. 300 IN MX 10 b.example.net.",
		"example.com. 300 IN MX 5 first.example.net.",
		"example.com. 300 IN MX 50 last.example.net.",
		"a.example.net. 300 IN A 192.0.2.1",
		"b.example.net. 300 IN A 192.0.2.2",
		"first.example.net. 300 IN A 192.0.2.3",
		"last.example.net. 300 IN A 192.0.2.4",
	)
	run := func(seed uint64) []string {
		r := newResolver(t, Config{Rand: rand.New(rand.NewPCG(seed, 7))}, s)
		var orders []string
		for range 40 {
			d, err := r.Resolve(context.Background(), "example.com")
			if err != nil {
				t.Fatal(err)
			}
			n := names(d)
			if len(n) != 4 || n[0] != "first.example.net" || n[3] != "last.example.net" {
				t.Fatalf("order %v", n)
			}
			orders = append(orders, strings.Join(n[1:3], " "))
		}
		return orders
	}
	orders := run(1)
	seen := map[string]int{}
	for _, o := range orders {
		seen[o]++
	}
	if seen["a.example.net b.example.net"] == 0 || seen["b.example.net a.example.net"] == 0 {
		t.Errorf("orders seen %v, want both", seen)
	}
	if again := run(1); !slices.Equal(orders, again) {
		t.Error("the same seed gave different orders")
	}
}

func TestImplicitMX(t *testing.T) {
	s := newServer(t,
		"example.org. 300 IN A 192.0.2.7",
		"example.org. 300 IN TXT \"v=spf1 -all\"",
	)
	r := newResolver(t, Config{Port: 2525}, s)
	d, err := r.Resolve(context.Background(), "example.org")
	if err != nil {
		t.Fatal(err)
	}
	if d.Key != "a:example.org" || len(d.Hosts) != 1 {
		t.Fatalf("destination %+v", d)
	}
	h := d.Hosts[0]
	if h.Name != "example.org" || h.Preference != 0 || h.Port != 2525 || !slices.Equal(h.Addrs, addrs("192.0.2.7")) {
		t.Errorf("host %+v", h)
	}
}

func TestPermanentFailures(t *testing.T) {
	s := newServer(t,
		"null.example. 300 IN MX 0 .",
		"nodata.example. 300 IN TXT \"no mail here\"",
		"noaddr.example. 300 IN MX 10 gone1.example.",
		"noaddr.example. 300 IN MX 20 nodata.example.",
	)
	r := newResolver(t, Config{}, s)
	for _, tc := range []struct {
		domain string
		code   int
		enh    mta.Enhanced
		text   string
	}{
		{"null.example", 556, mta.Enhanced{5, 1, 10}, "Domain null.example does not accept mail (null MX)"},
		{"nxdomain.example", 550, mta.Enhanced{5, 1, 2}, "Domain nxdomain.example does not exist"},
		{"nodata.example", 550, mta.Enhanced{5, 1, 2}, ""},
		{"noaddr.example", 550, mta.Enhanced{5, 4, 4}, "Unable to route: no address for the MX hosts of noaddr.example"},
		{"", 550, mta.Enhanced{5, 1, 2}, ""},
		{"exa mple.com", 550, mta.Enhanced{5, 1, 2}, ""},
		{"a..b", 550, mta.Enhanced{5, 1, 2}, ""},
		{"[192.0.2.1]", 550, mta.Enhanced{5, 1, 2}, ""},
		{strings.Repeat("a", 64) + ".example", 550, mta.Enhanced{5, 1, 2}, ""},
	} {
		d, err := r.Resolve(context.Background(), tc.domain)
		if err == nil {
			t.Errorf("%q: got %+v, want an error", tc.domain, d)
			continue
		}
		wantReply(t, err, tc.code, tc.enh)
		var rep *mta.Reply
		errors.As(err, &rep)
		if tc.text != "" && rep.Text != tc.text {
			t.Errorf("%q: text %q, want %q", tc.domain, rep.Text, tc.text)
		}
	}
}

func TestMXHostFailures(t *testing.T) {
	s := newServer(t,
		"temp.example. 300 IN MX 10 broken.example.",
		"temp.example. 300 IN MX 20 gone.example.",
		"partial.example. 300 IN MX 10 broken.example.",
		"partial.example. 300 IN MX 20 ok.example.",
		"ok.example. 300 IN A 192.0.2.9",
	)
	s.set(func(s *testServer) { s.servfail["broken.example."] = true })
	r := newResolver(t, Config{}, s)
	_, err := r.Resolve(context.Background(), "temp.example")
	wantReply(t, err, 451, mta.Enhanced{4, 4, 3})

	d, err := r.Resolve(context.Background(), "partial.example")
	if err != nil {
		t.Fatal(err)
	}
	if n := names(d); !slices.Equal(n, []string{"ok.example"}) {
		t.Errorf("hosts %v, want only the one with an address", n)
	}
	// The Key is the MX set, whichever hosts resolve.
	if d.Key != "mx:10 broken.example,20 ok.example" {
		t.Errorf("key %q", d.Key)
	}
}

func TestServfailThenRecovery(t *testing.T) {
	s := newServer(t,
		"example.com. 300 IN MX 10 mx.example.com.",
		"mx.example.com. 300 IN A 192.0.2.1",
	)
	s.set(func(s *testServer) { s.servfail["example.com."] = true })
	r := newResolver(t, Config{}, s)
	_, err := r.Resolve(context.Background(), "example.com")
	wantReply(t, err, 451, mta.Enhanced{4, 4, 3})
	if !strings.Contains(err.Error(), "SERVFAIL") {
		t.Errorf("error %q does not name the cause", err)
	}
	if n := s.count("example.com", dns.TypeMX); n != 1 {
		t.Errorf("%d queries, want 1 (SERVFAIL moves on at once)", n)
	}
	s.set(func(s *testServer) { s.servfail["example.com."] = false })
	if _, err := r.Resolve(context.Background(), "example.com"); err != nil {
		t.Fatalf("after recovery: %v", err)
	}
}

func TestTimeout(t *testing.T) {
	s := newServer(t, "example.com. 300 IN MX 10 mx.example.com.")
	s.set(func(s *testServer) { s.dropAll = true })
	r := newResolver(t, Config{Timeout: 200 * time.Millisecond}, s)
	start := time.Now()
	_, err := r.Resolve(context.Background(), "example.com")
	wantReply(t, err, 451, mta.Enhanced{4, 4, 3})
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("took %v", el)
	}
	if n := s.count("example.com", dns.TypeMX); n != 2 {
		t.Errorf("%d attempts, want 2", n)
	}
}

func TestSecondServerAfterTimeout(t *testing.T) {
	dead := newServer(t)
	dead.set(func(s *testServer) { s.dropAll = true })
	good := newServer(t,
		"example.com. 300 IN MX 10 mx.example.com.",
		"mx.example.com. 300 IN A 192.0.2.1",
	)
	r := newResolver(t, Config{Timeout: 200 * time.Millisecond, Attempts: 1}, dead, good)
	d, err := r.Resolve(context.Background(), "example.com")
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Hosts) != 1 {
		t.Fatalf("hosts %+v", d.Hosts)
	}
	if dead.count("example.com", dns.TypeMX) != 1 || good.count("example.com", dns.TypeMX) != 1 {
		t.Errorf("queries: dead %d, good %d", dead.count("example.com", dns.TypeMX), good.count("example.com", dns.TypeMX))
	}
}

func TestTCPFallback(t *testing.T) {
	s := newServer(t,
		"big.example. 300 IN MX 10 mx.example.",
		"mx.example. 300 IN A 192.0.2.1",
	)
	s.set(func(s *testServer) { s.truncate["big.example."] = true })
	r := newResolver(t, Config{}, s)
	d, err := r.Resolve(context.Background(), "big.example")
	if err != nil {
		t.Fatal(err)
	}
	if n := names(d); !slices.Equal(n, []string{"mx.example"}) {
		t.Errorf("hosts %v", n)
	}
	if u, c := s.count("big.example", dns.TypeMX, "udp"), s.count("big.example", dns.TypeMX, "tcp"); u != 1 || c != 1 {
		t.Errorf("udp %d, tcp %d queries; want 1 each", u, c)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, size := range s.edns {
		if size != 1232 {
			t.Errorf("EDNS0 UDP size %d, want 1232", size)
		}
	}
}

func TestCNAME(t *testing.T) {
	records := []string{
		"alias.example. 300 IN CNAME hop1.example.",
		"hop1.example. 200 IN CNAME hop2.example.",
		"hop2.example. 300 IN CNAME real.example.",
		"real.example. 300 IN MX 10 mxalias.example.",
		"mxalias.example. 300 IN CNAME mx.example.",
		"mx.example. 300 IN A 192.0.2.5",
		"loop1.example. 300 IN CNAME loop2.example.",
		"loop2.example. 300 IN CNAME loop1.example.",
	}
	// long0 -> long1 -> ... -> long9 -> real: 10 CNAMEs.
	for i := range 10 {
		next := "long" + string(rune('0'+i+1)) + ".example."
		if i == 9 {
			next = "real.example."
		}
		records = append(records, "long"+string(rune('0'+i))+".example. 300 IN CNAME "+next)
	}
	for _, noChase := range []bool{false, true} {
		s := newServer(t, records...)
		s.set(func(s *testServer) { s.noChase = noChase })
		r := newResolver(t, Config{}, s)
		d, err := r.Resolve(context.Background(), "alias.example")
		if err != nil {
			t.Fatalf("noChase %v: %v", noChase, err)
		}
		if d.Key != "mx:10 mxalias.example" || len(d.Hosts) != 1 || !slices.Equal(d.Hosts[0].Addrs, addrs("192.0.2.5")) {
			t.Errorf("noChase %v: destination %+v", noChase, d)
		}
		if noChase && s.count("hop1.example", dns.TypeMX) != 1 {
			t.Errorf("CNAME target not queried")
		}
		_, err = r.Resolve(context.Background(), "loop1.example")
		wantReply(t, err, 451, mta.Enhanced{4, 4, 3})
		if !strings.Contains(err.Error(), "CNAME loop") {
			t.Errorf("loop error %v", err)
		}
		_, err = r.Resolve(context.Background(), "long0.example")
		wantReply(t, err, 451, mta.Enhanced{4, 4, 3})
		if !strings.Contains(err.Error(), "too long") {
			t.Errorf("long chain error %v", err)
		}
		// long2 is 8 CNAMEs from real.example: the limit.
		if _, err := r.Resolve(context.Background(), "long2.example"); err != nil {
			t.Errorf("chain of 8: %v", err)
		}
	}
}

func TestCacheTTL(t *testing.T) {
	s := newServer(t,
		"example.com. 300 IN MX 10 mx.example.com.",
		"mx.example.com. 600 IN A 192.0.2.1",
		"short.example. 1 IN MX 10 mx.example.com.",
		"long.example. 86400 IN MX 10 mx.example.com.",
	)
	clk := newClock()
	r := newResolver(t, Config{Now: clk.Now}, s)
	ctx := context.Background()
	resolve := func(d string) {
		t.Helper()
		if _, err := r.Resolve(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	want := func(name string, qtype uint16, n int) {
		t.Helper()
		if got := s.count(name, qtype); got != n {
			t.Errorf("%s %s: %d queries, want %d", name, dns.TypeToString[qtype], got, n)
		}
	}
	resolve("example.com")
	resolve("example.com")
	want("example.com", dns.TypeMX, 1)
	want("mx.example.com", dns.TypeA, 1)

	clk.Advance(299 * time.Second)
	resolve("example.com")
	want("example.com", dns.TypeMX, 1)
	clk.Advance(2 * time.Second)
	resolve("example.com")
	want("example.com", dns.TypeMX, 2)
	want("mx.example.com", dns.TypeA, 1)
	clk.Advance(300 * time.Second)
	resolve("example.com")
	want("mx.example.com", dns.TypeA, 2)

	// TTL 1 is raised to MinTTL (5s), 86400 lowered to MaxTTL (1h).
	resolve("short.example")
	resolve("long.example")
	clk.Advance(4 * time.Second)
	resolve("short.example")
	want("short.example", dns.TypeMX, 1)
	clk.Advance(2 * time.Second)
	resolve("short.example")
	want("short.example", dns.TypeMX, 2)
	clk.Advance(time.Hour)
	resolve("long.example")
	want("long.example", dns.TypeMX, 2)
}

func TestNegativeCache(t *testing.T) {
	s := newServer(t, "nodata.example. 300 IN TXT \"x\"")
	clk := newClock()
	r := newResolver(t, Config{Now: clk.Now}, s)
	ctx := context.Background()
	for _, d := range []string{"nx.example", "nodata.example"} {
		for range 2 {
			_, err := r.Resolve(ctx, d)
			wantReply(t, err, 550, mta.Enhanced{5, 1, 2})
		}
	}
	if s.count("nx.example", dns.TypeMX) != 1 || s.count("nodata.example", dns.TypeMX) != 1 || s.count("nodata.example", dns.TypeA) != 1 {
		t.Error("negative answers not cached")
	}
	clk.Advance(61 * time.Second) // SOA minimum 60
	r.Resolve(ctx, "nx.example")
	if n := s.count("nx.example", dns.TypeMX); n != 2 {
		t.Errorf("%d queries after the negative TTL, want 2", n)
	}

	// A large SOA minimum is capped at 5 minutes.
	s.set(func(s *testServer) { s.soaMin = 86400 })
	r.Resolve(ctx, "nx2.example")
	clk.Advance(299 * time.Second)
	r.Resolve(ctx, "nx2.example")
	clk.Advance(2 * time.Second)
	r.Resolve(ctx, "nx2.example")
	if n := s.count("nx2.example", dns.TypeMX); n != 2 {
		t.Errorf("%d queries, want 2 (negative TTL capped at 5m)", n)
	}
}

func TestFormerrWithoutEDNS(t *testing.T) {
	s := newServer(t,
		"example.com. 300 IN MX 10 mx.example.com.",
		"mx.example.com. 300 IN A 192.0.2.1",
	)
	s.set(func(s *testServer) { s.noEDNS = true })
	r := newResolver(t, Config{}, s)
	if _, err := r.Resolve(context.Background(), "example.com"); err != nil {
		t.Fatal(err)
	}
	if n := s.count("example.com", dns.TypeMX); n != 2 {
		t.Errorf("%d queries, want 2 (with EDNS0, then without)", n)
	}
}

func BenchmarkResolveCached(b *testing.B) {
	s := newServer(b,
		"example.com. 300 IN MX 10 mx1.example.com.",
		"example.com. 300 IN MX 10 mx2.example.com.",
		"mx1.example.com. 300 IN A 192.0.2.1",
		"mx2.example.com. 300 IN A 192.0.2.2",
	)
	r, err := New(Config{Servers: []string{s.addr}})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	if _, err := r.Resolve(ctx, "example.com"); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := r.Resolve(ctx, "example.com"); err != nil {
			b.Fatal(err)
		}
	}
}
