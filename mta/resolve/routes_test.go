package resolve

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mtaproject/mta/mta"
)

func TestRoutes(t *testing.T) {
	s := newServer(t,
		"relay.example. 300 IN A 192.0.2.20",
		"relay.example. 300 IN AAAA 2001:db8::20",
		"relay.example. 300 IN MX 10 other.example.",
		"example.com. 300 IN MX 10 mx.example.com.",
	)
	auth := &Auth{Username: "u", Password: "p"}
	r := newResolver(t, Config{
		Port: 2525,
		Routes: map[string]Route{
			"Example.COM":     {Hosts: []string{"relay.example:587", "[192.0.2.30]"}, TLS: TLSRequired, Auth: auth},
			"literal.example": {Hosts: []string{"[::1]:26", "[192.0.2.31]:27", "192.0.2.32"}},
			"broken.example":  {Hosts: []string{"nonexistent.example"}},
			"Bücher.example.": {Hosts: []string{"[192.0.2.40]"}},
			"*":               {Hosts: []string{"relay.example"}, TLS: TLSNone},
		},
	}, s)
	ctx := context.Background()

	d, err := r.Resolve(ctx, "example.com")
	if err != nil {
		t.Fatal(err)
	}
	if d.Key != "route:relay.example:587,[192.0.2.30]:2525 tls=required auth=u" || d.TLS != TLSRequired || d.Route == nil || d.Route.Auth == nil || *d.Route.Auth != *auth {
		t.Errorf("destination %+v", d)
	}
	want := []Host{
		{Name: "relay.example", Port: 587, Addrs: addrs("192.0.2.20")},
		{Name: "", Port: 2525, Addrs: addrs("192.0.2.30")},
	}
	if len(d.Hosts) != 2 || d.Hosts[0].Name != want[0].Name || d.Hosts[0].Port != 587 || !slices.Equal(d.Hosts[0].Addrs, want[0].Addrs) ||
		d.Hosts[1].Name != "" || d.Hosts[1].Port != 2525 || !slices.Equal(d.Hosts[1].Addrs, want[1].Addrs) {
		t.Errorf("hosts %+v, want %+v", d.Hosts, want)
	}
	if d.Hosts[0].Preference >= d.Hosts[1].Preference {
		t.Errorf("route hosts share a preference (%d, %d): delivery would shuffle them", d.Hosts[0].Preference, d.Hosts[1].Preference)
	}
	if n := s.count("example.com", dns.TypeMX); n != 0 {
		t.Errorf("%d MX queries for a routed domain", n)
	}
	if n := s.count("relay.example", dns.TypeMX); n != 0 {
		t.Errorf("%d MX queries for a route host", n)
	}

	d, err = r.Resolve(ctx, "literal.example")
	if err != nil {
		t.Fatal(err)
	}
	if d.Key != "route:[::1]:26,[192.0.2.31]:27,[192.0.2.32]:2525 tls=opportunistic" || d.TLS != TLSOpportunistic {
		t.Errorf("destination %+v", d)
	}
	for i, w := range []string{"::1", "192.0.2.31", "192.0.2.32"} {
		if h := d.Hosts[i]; h.Name != "" || !slices.Equal(h.Addrs, addrs(w)) {
			t.Errorf("host %d = %+v, want literal %s", i, h, w)
		}
	}

	// The wildcard: every other domain, one Key, so one connection pool.
	d1, err := r.Resolve(ctx, "anything.example")
	if err != nil {
		t.Fatal(err)
	}
	d2, err := r.Resolve(ctx, "nxdomain.invalid")
	if err != nil {
		t.Fatal(err)
	}
	if d1.Key != "route:relay.example:2525 tls=none" || d2.Key != d1.Key || d1.TLS != TLSNone || d1.Route == nil {
		t.Errorf("wildcard destinations %+v %+v", d1, d2)
	}
	if n := s.total(); n != 1 {
		t.Errorf("%d queries in all, want the one A query of relay.example", n)
	}

	// Route domains are matched in their A-label form.
	d, err = r.Resolve(ctx, "xn--bcher-kva.example")
	if err != nil || d.Key != "route:[192.0.2.40]:2525 tls=opportunistic" {
		t.Errorf("IDN route: %+v, %v", d, err)
	}

	// A route host without an address is a local problem: temporary.
	_, err = r.Resolve(ctx, "broken.example")
	wantReply(t, err, 451, mta.Enhanced{4, 4, 3})
}

func TestNewErrors(t *testing.T) {
	for name, cfg := range map[string]Config{
		"bad TLS":        {DefaultTLS: "sometimes"},
		"bad route TLS":  {Routes: map[string]Route{"a.example": {Hosts: []string{"h"}, TLS: "x"}}},
		"no route hosts": {Routes: map[string]Route{"a.example": {}}},
		"bad route host": {Routes: map[string]Route{"a.example": {Hosts: []string{"[not-an-ip]"}}}},
		"bad route port": {Routes: map[string]Route{"a.example": {Hosts: []string{"relay:99999"}}}},
		"bad domain":     {Routes: map[string]Route{"a b": {Hosts: []string{"relay"}}}},
		"TTLs":           {MinTTL: time.Hour, MaxTTL: time.Minute},
	} {
		cfg.Servers = []string{"127.0.0.1:53"}
		if _, err := New(cfg); err == nil {
			t.Errorf("%s: New succeeded", name)
		}
	}
	r, err := New(Config{Servers: []string{"127.0.0.1", "::1", "127.0.0.1:5353"}})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"127.0.0.1:53", "[::1]:53", "127.0.0.1:5353"}; !slices.Equal(r.servers, want) {
		t.Errorf("servers %v, want %v", r.servers, want)
	}
}

func TestKeySharing(t *testing.T) {
	s := newServer(t,
		"one.example. 300 IN MX 10 mx1.example.net.",
		"one.example. 300 IN MX 20 mx2.example.net.",
		"two.example. 300 IN MX 10 MX1.example.net.",
		"two.example. 300 IN MX 20 mx2.example.net.",
		"three.example. 300 IN MX 10 mx1.example.net.",
		"four.example. 300 IN MX 10 mx2.example.net.",
		"four.example. 300 IN MX 20 mx1.example.net.",
		"mx1.example.net. 300 IN A 192.0.2.1",
		"mx2.example.net. 300 IN A 192.0.2.2",
	)
	r := newResolver(t, Config{}, s)
	key := func(d string) string {
		dest, err := r.Resolve(context.Background(), d)
		if err != nil {
			t.Fatal(err)
		}
		return dest.Key
	}
	k1, k2, k3, k4 := key("one.example"), key("two.example"), key("three.example"), key("four.example")
	if k1 != k2 || k1 != "mx:10 mx1.example.net,20 mx2.example.net" {
		t.Errorf("same MX hosts and preferences, keys %q and %q", k1, k2)
	}
	if k3 == k1 {
		t.Errorf("different MX sets share key %q", k3)
	}
	if k4 == k1 {
		t.Errorf("the same hosts in another preference order share key %q: one domain would use the other's order", k4)
	}
}

func TestConcurrentResolveDedupe(t *testing.T) {
	s := newServer(t,
		"example.com. 300 IN MX 10 mx1.example.com.",
		"example.com. 300 IN MX 20 mx2.example.com.",
		"mx1.example.com. 300 IN A 192.0.2.1",
		"mx2.example.com. 300 IN A 192.0.2.2",
	)
	s.set(func(s *testServer) { s.delay = 100 * time.Millisecond })
	r := newResolver(t, Config{}, s)
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for range 20 {
		wg.Go(func() {
			d, err := r.Resolve(context.Background(), "example.com")
			if err == nil && len(d.Hosts) != 2 {
				err = errors.New("wrong hosts")
			}
			if err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := s.total(); n != 3 {
		t.Errorf("%d queries, want 3 (MX once, each A once)", n)
	}
}

func TestCancelWaitsNotTheQuery(t *testing.T) {
	s := newServer(t,
		"example.com. 300 IN MX 10 mx.example.com.",
		"mx.example.com. 300 IN A 192.0.2.1",
	)
	s.set(func(s *testServer) { s.delay = 300 * time.Millisecond })
	r := newResolver(t, Config{}, s)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := r.Resolve(ctx, "example.com")
	wantReply(t, err, 451, mta.Enhanced{4, 4, 3})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("error %v does not wrap the context's", err)
	}
	// The abandoned query still lands in the cache.
	if _, err := r.Resolve(context.Background(), "example.com"); err != nil {
		t.Fatal(err)
	}
	if n := s.count("example.com", dns.TypeMX); n != 1 {
		t.Errorf("%d MX queries, want 1", n)
	}
}

func TestIPv6(t *testing.T) {
	s := newServer(t,
		"example.com. 300 IN MX 10 mx.example.com.",
		"example.com. 300 IN MX 20 v6only.example.com.",
		"mx.example.com. 300 IN AAAA 2001:db8::1",
		"mx.example.com. 300 IN A 192.0.2.1",
		"mx.example.com. 300 IN AAAA 2001:db8::2",
		"v6only.example.com. 300 IN AAAA 2001:db8::3",
	)
	r := newResolver(t, Config{IPv6: true}, s)
	d, err := r.Resolve(context.Background(), "example.com")
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Hosts) != 2 {
		t.Fatalf("hosts %+v", d.Hosts)
	}
	if got, want := d.Hosts[0].Addrs, addrs("192.0.2.1", "2001:db8::1", "2001:db8::2"); !slices.Equal(got, want) {
		t.Errorf("addrs %v, want %v", got, want)
	}
	if got, want := d.Hosts[1].Addrs, addrs("2001:db8::3"); !slices.Equal(got, want) {
		t.Errorf("addrs %v, want %v", got, want)
	}

	r = newResolver(t, Config{}, s)
	d, err = r.Resolve(context.Background(), "example.com")
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Hosts) != 1 || !slices.Equal(d.Hosts[0].Addrs, addrs("192.0.2.1")) {
		t.Errorf("without IPv6: hosts %+v", d.Hosts)
	}
}

func TestInternationalizedDomain(t *testing.T) {
	s := newServer(t,
		"xn--bcher-kva.example. 300 IN MX 10 mx.example.",
		"mx.example. 300 IN A 192.0.2.1",
	)
	r := newResolver(t, Config{}, s)
	d, err := r.Resolve(context.Background(), "Bücher.example")
	if err != nil {
		t.Fatal(err)
	}
	if d.Domain != "bücher.example" || len(d.Hosts) != 1 {
		t.Errorf("destination %+v", d)
	}
}

func TestMetricsAndEviction(t *testing.T) {
	s := newServer(t,
		"a.example. 300 IN A 192.0.2.1",
		"b.example. 300 IN A 192.0.2.2",
		"c.example. 300 IN A 192.0.2.3",
	)
	reg := prometheus.NewRegistry()
	r := newResolver(t, Config{Registerer: reg, CacheSize: 2}, s)
	if _, err := New(Config{Servers: []string{s.addr}, Registerer: reg}); err != nil {
		t.Fatalf("second Resolver on one registry: %v", err)
	}
	ctx := context.Background()
	for _, d := range []string{"a.example", "a.example", "b.example", "c.example"} {
		if _, err := r.Resolve(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	if n := r.cache.len(); n > 2 {
		t.Errorf("cache holds %d entries, over its size 2", n)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			k := mf.GetName()
			for _, l := range m.GetLabel() {
				k += " " + l.GetValue()
			}
			got[k] = m.GetCounter().GetValue()
		}
	}
	// a.example: MX nodata, A ok, then two cache hits; b, c likewise
	// without hits.
	want := map[string]float64{
		"mta_dns_queries_total MX nodata": 3,
		"mta_dns_queries_total A ok":      3,
		"mta_dns_cache_hits_total":        2,
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v (all: %v)", k, got[k], v, got)
		}
	}
}

func TestRoutesWithOtherPoliciesDoNotShare(t *testing.T) {
	s := newServer(t, "relay.example. 300 IN A 192.0.2.20")
	r := newResolver(t, Config{Routes: map[string]Route{
		"plain.example":  {Hosts: []string{"relay.example:587"}, TLS: TLSNone},
		"tls.example":    {Hosts: []string{"relay.example:587"}, TLS: TLSRequired},
		"auth.example":   {Hosts: []string{"relay.example:587"}, TLS: TLSRequired, Auth: &Auth{Username: "a", Password: "x"}},
		"other.example":  {Hosts: []string{"relay.example:587"}, TLS: TLSRequired, Auth: &Auth{Username: "b", Password: "y"}},
		"plain2.example": {Hosts: []string{"relay.example:587"}, TLS: TLSNone},
	}}, s)
	keys := map[string]string{}
	for _, d := range []string{"plain.example", "tls.example", "auth.example", "other.example", "plain2.example"} {
		dest, err := r.Resolve(context.Background(), d)
		if err != nil {
			t.Fatal(err)
		}
		keys[d] = dest.Key
	}
	if keys["plain.example"] != keys["plain2.example"] {
		t.Errorf("the same route twice: keys %q and %q", keys["plain.example"], keys["plain2.example"])
	}
	seen := map[string]string{}
	for _, d := range []string{"plain.example", "tls.example", "auth.example", "other.example"} {
		if o, dup := seen[keys[d]]; dup {
			t.Errorf("%s and %s share key %q despite other TLS or AUTH", o, d, keys[d])
		}
		seen[keys[d]] = d
	}
}
