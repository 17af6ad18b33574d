// Package resolve turns a recipient domain into the ordered list of hosts and
// addresses to deliver to: MX lookup with github.com/miekg/dns, implicit MX,
// null MX, a TTL cache, and static routes.
package resolve

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/mtaproject/mta/mta"
)

// TLSPolicy says how a route uses STARTTLS.
type TLSPolicy string

// The STARTTLS policies.
const (
	TLSNone          TLSPolicy = "none"          // never STARTTLS
	TLSOpportunistic TLSPolicy = "opportunistic" // STARTTLS when offered, unverified
	TLSRequired      TLSPolicy = "required"      // STARTTLS or no delivery
)

// Auth is SMTP AUTH credentials for a smarthost route.
type Auth struct{ Username, Password string }

// Route is a static next hop that replaces MX lookup for a domain.
type Route struct {
	// Hosts are the next hops, tried in the order given: "host:port",
	// "[1.2.3.4]:port", "[::1]:port", "[1.2.3.4]" or "host"; without a port,
	// Config.Port is used. A bracketed (or bare) IP address is used as is,
	// with no lookup. A host name is resolved by A (and AAAA with
	// Config.IPv6) only, never by MX: a route names relay hosts.
	Hosts []string
	TLS   TLSPolicy // "" means Config.DefaultTLS
	Auth  *Auth     // nil: no AUTH
}

// Config configures a Resolver. The zero value of each field selects its
// default.
type Config struct {
	// Servers are the recursive DNS servers, "host:port" (":53" when the port
	// is left out), tried in order. Empty: the nameservers of
	// /etc/resolv.conf; New fails if that cannot be read.
	Servers []string
	// Timeout bounds one query attempt (per transport), default 5s.
	Timeout time.Duration
	// Attempts is the number of timed-out attempts per server before moving
	// on to the next, default 2. SERVFAIL, REFUSED and network errors move on
	// at once.
	Attempts int
	// Port is the SMTP port of MX and implicit-MX hosts and of route hosts
	// given without one, default 25.
	Port int
	// Routes maps a domain (case-insensitive), or "*" for every domain
	// without its own route, to a static next hop.
	Routes map[string]Route
	// DefaultTLS is the TLS policy of MX destinations and of routes without
	// their own, default TLSOpportunistic.
	DefaultTLS TLSPolicy
	// IPv6 also looks up AAAA records; each host's addresses are its IPv4
	// ones first, then its IPv6 ones.
	IPv6 bool
	// MaxCNAME bounds a CNAME chain, default 8.
	MaxCNAME int
	// CacheSize bounds the number of cached (name, type) answers, default
	// 100000. When full, expired answers are evicted first, then arbitrary ones.
	CacheSize int
	// MinTTL and MaxTTL clamp the time answers are cached, default 5s and 1h.
	// Negative answers (NXDOMAIN, no data) are cached for the SOA minimum
	// (RFC 2308), clamped to [MinTTL, 5m]; MinTTL without an SOA. Temporary
	// failures are never cached.
	MinTTL, MaxTTL time.Duration
	// Now is the clock, nil for time.Now.
	Now func() time.Time
	// Rand shuffles MX hosts of equal preference; nil uses the global source.
	// The Resolver serializes its use.
	Rand *rand.Rand
	// Self, if non-nil, describes this server: destinations whose hosts
	// are this server lose them (RFC 5321 §5.1), and a domain left with
	// none fails with 554 5.4.6.
	Self *Self
	// Registerer, if non-nil, gets the metrics mta_dns_queries_total{qtype,
	// result} and mta_dns_cache_hits_total.
	Registerer prometheus.Registerer
}

// Host is one next-hop host with its addresses, in the order to try.
type Host struct {
	Name       string       // MX target or route host; "" for a literal IP
	Preference uint16       // MX preference; 0 for an implicit MX; a route's position in its list
	Port       int          // SMTP port
	Addrs      []netip.Addr // at least one; IPv4 first, then IPv6
}

// Destination is where mail for a domain goes.
type Destination struct {
	// Domain is the recipient domain: lower case, without a trailing dot.
	Domain string
	// Key identifies the next-hop set and its policy, so that domains with
	// the same one share connection limits and connections, and no others
	// do: "mx:" and the MX records as "preference host" in preference order,
	// joined by ","; "a:" and the domain for an implicit MX; "route:", the
	// route's hosts as "host:port" joined by ",", " tls=" and its policy,
	// and " auth=" and the user name when it authenticates.
	Key string
	// Hosts in the order to try: ascending preference, equal preferences
	// shuffled on each call. Hosts without any address are left out.
	Hosts []Host
	// Route is the static route used, or nil. It is shared: do not modify.
	Route *Route
	// TLS is the effective STARTTLS policy.
	TLS TLSPolicy
}

// Defaults.
const (
	defaultTimeout   = 5 * time.Second
	defaultAttempts  = 2
	defaultPort      = 25
	defaultMaxCNAME  = 8
	defaultCacheSize = 100000
	defaultMinTTL    = 5 * time.Second
	defaultMaxTTL    = time.Hour
	maxNegativeTTL   = 5 * time.Minute
	ednsUDPSize      = 1232
	// maxMXHosts bounds the MX hosts whose addresses are looked up, so
	// that a domain with thousands of MX records costs a bounded amount.
	maxMXHosts = 20
)

// Resolver finds destinations. It is safe for concurrent use.
type Resolver struct {
	servers  []string
	udp, tcp *dns.Client
	attempts int
	port     int
	ipv6     bool
	maxCNAME int
	minTTL   time.Duration
	maxTTL   time.Duration
	now      func() time.Time
	self     *Self
	table    atomic.Pointer[table] // routes and default TLS policy, replaced whole by SetRoutes
	metrics  *metrics

	randMu sync.Mutex
	rand   *rand.Rand

	cache *cache

	flightMu sync.Mutex
	flights  map[cacheKey]*flight
}

// New returns a Resolver for cfg.
func New(cfg Config) (*Resolver, error) {
	r := &Resolver{
		attempts: orDefault(cfg.Attempts, defaultAttempts),
		port:     orDefault(cfg.Port, defaultPort),
		ipv6:     cfg.IPv6,
		maxCNAME: orDefault(cfg.MaxCNAME, defaultMaxCNAME),
		minTTL:   orDefault(cfg.MinTTL, defaultMinTTL),
		maxTTL:   orDefault(cfg.MaxTTL, defaultMaxTTL),
		now:      cfg.Now,
		self:     cfg.Self,
		rand:     cfg.Rand,
		cache:    newCache(orDefault(cfg.CacheSize, defaultCacheSize)),
		flights:  make(map[cacheKey]*flight),
	}
	if r.now == nil {
		r.now = time.Now
	}
	if r.port > 65535 {
		return nil, fmt.Errorf("resolve: bad port %d", r.port)
	}
	if r.maxTTL < r.minTTL {
		return nil, fmt.Errorf("resolve: MaxTTL %v below MinTTL %v", r.maxTTL, r.minTTL)
	}
	timeout := orDefault(cfg.Timeout, defaultTimeout)
	r.udp = &dns.Client{Net: "udp", Timeout: timeout, UDPSize: ednsUDPSize}
	r.tcp = &dns.Client{Net: "tcp", Timeout: timeout}

	servers := cfg.Servers
	port := "53"
	if len(servers) == 0 {
		cc, err := dns.ClientConfigFromFile("/etc/resolv.conf")
		if err != nil {
			return nil, fmt.Errorf("resolve: no DNS servers configured: %w", err)
		}
		servers, port = cc.Servers, cc.Port
		if len(servers) == 0 {
			return nil, errors.New("resolve: no DNS servers configured or in /etc/resolv.conf")
		}
	}
	for _, s := range servers {
		if _, _, err := net.SplitHostPort(s); err != nil {
			s = net.JoinHostPort(strings.Trim(s, "[]"), port)
		}
		r.servers = append(r.servers, s)
	}

	if err := r.SetRoutes(cfg.Routes, cfg.DefaultTLS); err != nil {
		return nil, err
	}

	if cfg.Registerer != nil {
		m, err := newMetrics(cfg.Registerer)
		if err != nil {
			return nil, err
		}
		r.metrics = m
	}
	return r, nil
}

func orDefault[T int | time.Duration](v, def T) T {
	if v <= 0 {
		return def
	}
	return v
}

func validTLS(p TLSPolicy) bool {
	return p == TLSNone || p == TLSOpportunistic || p == TLSRequired
}

// The replies are built per error, so callers may keep or change them. d is
// always the checked ASCII form of the domain, safe in a reply.
func errNoDomain(d string) error {
	return &mta.Reply{Code: 550, Enhanced: mta.Enhanced{5, 1, 2}, Text: "Domain " + d + " does not exist"}
}

func errBadDomain(d string) error {
	if len(d) > 100 {
		d = d[:100] + "..."
	}
	return &mta.Reply{Code: 550, Enhanced: mta.Enhanced{5, 1, 2}, Text: "Bad destination domain " + strconv.Quote(d)}
}

func errNoMailHost(d string) error {
	return &mta.Reply{Code: 550, Enhanced: mta.Enhanced{5, 1, 2}, Text: "Domain " + d + " has no MX or address records"}
}

func errNullMX(d string) error {
	return &mta.Reply{Code: 556, Enhanced: mta.Enhanced{5, 1, 10}, Text: "Domain " + d + " does not accept mail (null MX)"}
}

func errNoMXAddress(d string) error {
	return &mta.Reply{Code: 550, Enhanced: mta.Enhanced{5, 4, 4}, Text: "Unable to route: no address for the MX hosts of " + d}
}

// errTemporary is the 451 4.4.3 reply, wrapping cause for the log.
func errTemporary(d string, cause error) error {
	rep := &mta.Reply{Code: 451, Enhanced: mta.Enhanced{4, 4, 3}, Text: "DNS lookup for " + d + " failed temporarily"}
	if cause == nil {
		return rep
	}
	return fmt.Errorf("%w: %w", rep, cause)
}

// normalize is the shared syntax check and canonical form of a domain.
func normalize(domain string) (string, bool) { return mta.NormalizeDomain(domain) }

// Resolve returns the destination for domain, without the hosts that are
// this server (Config.Self). Errors wrap *mta.Reply, so mta.IsPermanent
// tells a bounce (5xx) from a deferral (4xx): NXDOMAIN, null MX, no MX and
// no address, MX hosts that all lack addresses, or hosts that all loop
// back to this server are permanent; DNS failures (SERVFAIL, REFUSED, timeouts, network errors,
// CNAME loops) are temporary.
func (r *Resolver) Resolve(ctx context.Context, domain string) (*Destination, error) {
	dest, err := r.resolve(ctx, domain)
	if err != nil {
		return nil, err
	}
	if err := r.self.dropSelf(dest); err != nil {
		return nil, err
	}
	return dest, nil
}

// resolve is Resolve before the hosts that are this server are dropped.
func (r *Resolver) resolve(ctx context.Context, domain string) (*Destination, error) {
	name, ok := normalize(domain)
	if !ok {
		return nil, errBadDomain(domain)
	}
	display := strings.ToLower(strings.TrimSuffix(domain, "."))

	tbl := r.table.Load()
	if rt := tbl.routes[name]; rt != nil {
		return r.resolveRoute(ctx, display, name, rt)
	}
	if rt := tbl.routes["*"]; rt != nil {
		return r.resolveRoute(ctx, display, name, rt)
	}

	mx, err := r.lookup(ctx, name, dns.TypeMX)
	if err != nil {
		return nil, errTemporary(name, err)
	}
	switch {
	case mx.status == statusNXDomain:
		return nil, errNoDomain(name)
	case mx.status == statusNoData:
		return r.implicitMX(ctx, display, name, tbl.defaultTLS)
	case mx.nullMX:
		return nil, errNullMX(name)
	}

	hosts := mx.mx
	if len(hosts) > maxMXHosts {
		hosts = hosts[:maxMXHosts]
	}
	names := make([]string, len(hosts))
	for i, h := range hosts {
		names[i] = h.host
	}
	res := r.hostAddrs(ctx, names)
	dest := &Destination{Domain: display, Key: mx.key, Hosts: make([]Host, 0, len(hosts)), TLS: tbl.defaultTLS}
	var tempErr error
	for i, h := range hosts {
		if len(res[i].addrs) == 0 {
			if res[i].err != nil && tempErr == nil {
				tempErr = res[i].err
			}
			continue
		}
		dest.Hosts = append(dest.Hosts, Host{Name: h.host, Preference: h.pref, Port: r.port, Addrs: res[i].addrs})
	}
	if len(dest.Hosts) == 0 {
		if tempErr != nil {
			return nil, errTemporary(name, tempErr)
		}
		return nil, errNoMXAddress(name)
	}
	r.shuffle(dest.Hosts)
	return dest, nil
}

// implicitMX handles a domain without MX records (RFC 5321 §5.1): the domain
// itself is the host.
func (r *Resolver) implicitMX(ctx context.Context, display, name string, tls TLSPolicy) (*Destination, error) {
	res := r.hostAddrs(ctx, []string{name})[0]
	if len(res.addrs) == 0 {
		if res.err != nil {
			return nil, errTemporary(name, res.err)
		}
		return nil, errNoMailHost(name)
	}
	return &Destination{
		Domain: display,
		Key:    "a:" + name,
		Hosts:  []Host{{Name: name, Port: r.port, Addrs: res.addrs}},
		TLS:    tls,
	}, nil
}

// shuffle randomizes the order of hosts of equal preference, which are
// already sorted by preference.
func (r *Resolver) shuffle(hosts []Host) {
	if len(hosts) < 2 {
		return
	}
	if r.rand != nil {
		r.randMu.Lock()
		defer r.randMu.Unlock()
	}
	for i := 0; i < len(hosts); {
		j := i + 1
		for j < len(hosts) && hosts[j].Preference == hosts[i].Preference {
			j++
		}
		group := hosts[i:j]
		for k := len(group) - 1; k > 0; k-- {
			var n int
			if r.rand != nil {
				n = r.rand.IntN(k + 1)
			} else {
				n = rand.IntN(k + 1)
			}
			group[k], group[n] = group[n], group[k]
		}
		i = j
	}
}

// sortMX orders MX records by preference, ties by name (the shuffle happens
// per call), and returns the Key of the set: the preferences and names in
// that order, so that two domains share a destination (its connections and
// limits) only when they would try the same hosts in the same order.
func sortMX(mx []mxHost) string {
	sort.Slice(mx, func(i, j int) bool {
		if mx[i].pref != mx[j].pref {
			return mx[i].pref < mx[j].pref
		}
		return mx[i].host < mx[j].host
	})
	names := make([]string, len(mx))
	for i, h := range mx {
		names[i] = strconv.Itoa(int(h.pref)) + " " + h.host
	}
	return "mx:" + strings.Join(names, ",")
}

// table is what SetRoutes replaces.
type table struct {
	routes     map[string]*route
	defaultTLS TLSPolicy
}

// SetRoutes replaces the static routes (Config.Routes) and the default TLS
// policy (Config.DefaultTLS; "" is opportunistic) while the resolver is in
// use: lookups that start afterwards see the new ones. On an error the
// ones in use stay.
func (r *Resolver) SetRoutes(routes map[string]Route, defaultTLS TLSPolicy) error {
	if defaultTLS == "" {
		defaultTLS = TLSOpportunistic
	}
	if !validTLS(defaultTLS) {
		return fmt.Errorf("resolve: bad DefaultTLS %q", defaultTLS)
	}
	m := make(map[string]*route, len(routes))
	for dom, rt := range routes {
		key := dom
		if key != "*" {
			var ok bool
			if key, ok = normalize(dom); !ok {
				return fmt.Errorf("resolve: bad route domain %q", dom)
			}
		}
		p, err := r.prepareRoute(rt, defaultTLS)
		if err != nil {
			return fmt.Errorf("resolve: route %q: %w", dom, err)
		}
		m[key] = p
	}
	r.table.Store(&table{routes: m, defaultTLS: defaultTLS})
	return nil
}
