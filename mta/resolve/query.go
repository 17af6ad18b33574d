package resolve

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

var (
	qtypesA     = []uint16{dns.TypeA}
	qtypesAAAAA = []uint16{dns.TypeA, dns.TypeAAAA}
)

// addrResult is the addresses of one host, or why there are none: err is a
// temporary failure; nil with no addresses means NXDOMAIN or no data.
type addrResult struct {
	addrs []netip.Addr
	err   error
}

// hostAddrs looks up the addresses of each name (A, then AAAA with IPv6).
// Answers in the cache are used directly; the others are queried
// concurrently.
func (r *Resolver) hostAddrs(ctx context.Context, names []string) []addrResult {
	qtypes := qtypesA
	if r.ipv6 {
		qtypes = qtypesAAAAA
	}
	nq := len(qtypes)
	entries := make([]*entry, len(names)*nq)
	var errs []error // only when some are not cached
	var miss []int
	for i := range entries {
		if entries[i] = r.cached(cacheKey{names[i/nq], qtypes[i%nq]}); entries[i] == nil {
			miss = append(miss, i)
		}
	}
	if len(miss) > 0 {
		errs = make([]error, len(entries))
	}
	switch len(miss) {
	case 0:
	case 1:
		i := miss[0]
		entries[i], errs[i] = r.lookup(ctx, names[i/nq], qtypes[i%nq])
	default:
		var wg sync.WaitGroup
		for _, i := range miss {
			wg.Go(func() {
				entries[i], errs[i] = r.lookup(ctx, names[i/nq], qtypes[i%nq])
			})
		}
		wg.Wait()
	}

	res := make([]addrResult, len(names))
	for i := range res {
		n := 0
		for j := range nq {
			if e := entries[i*nq+j]; e != nil {
				n += len(e.addrs)
			}
		}
		if n > 0 {
			res[i].addrs = make([]netip.Addr, 0, n)
		}
		for j := range nq {
			if e := entries[i*nq+j]; e != nil {
				res[i].addrs = append(res[i].addrs, e.addrs...)
			} else if res[i].err == nil {
				res[i].err = errs[i*nq+j]
			}
		}
	}
	return res
}

// Errors of fetch; all temporary.
var (
	errCNAMELoop    = errors.New("CNAME loop")
	errCNAMETooLong = errors.New("CNAME chain too long")
)

// fetch queries (name, qtype), follows CNAMEs and returns the definitive
// answer, or an error for a temporary failure.
func (r *Resolver) fetch(ctx context.Context, name string, qtype uint16) (*entry, error) {
	qname := name
	chain := []string{name}
	ttl := uint32(math.MaxUint32)
	for {
		resp, err := r.exchange(ctx, qname, qtype)
		if err != nil {
			return nil, err
		}
		// Walk the chain in the answer section from qname; records owned by
		// names off the chain are ignored.
		cur := qname
		var rrs []dns.RR
		for {
			var target string
			var targetTTL uint32
			for _, rr := range resp.Answer {
				h := rr.Header()
				if h.Class != dns.ClassINET || !sameName(h.Name, cur) {
					continue
				}
				switch {
				case h.Rrtype == qtype:
					rrs = append(rrs, rr)
					ttl = min(ttl, h.Ttl)
				case h.Rrtype == dns.TypeCNAME && target == "":
					target, targetTTL = rr.(*dns.CNAME).Target, h.Ttl
				}
			}
			if len(rrs) > 0 || target == "" {
				break
			}
			ttl = min(ttl, targetTTL)
			next := strings.ToLower(strings.TrimSuffix(target, "."))
			if next == "" {
				return r.negative(statusNoData, resp, ttl), nil
			}
			if slices.Contains(chain, next) {
				return nil, fmt.Errorf("%s: %w", name, errCNAMELoop)
			}
			if len(chain) > r.maxCNAME {
				return nil, fmt.Errorf("%s: %w", name, errCNAMETooLong)
			}
			chain = append(chain, next)
			cur = next
		}
		switch {
		case len(rrs) > 0:
			return r.positive(qtype, rrs, ttl), nil
		case resp.Rcode == dns.RcodeNameError:
			return r.negative(statusNXDomain, resp, ttl), nil
		case cur == qname:
			return r.negative(statusNoData, resp, ttl), nil
		}
		// The answer ends in a CNAME without the target's records: ask
		// for the target itself.
		qname = cur
	}
}

// sameName reports whether the owner name fqdn (with its trailing dot) is
// name (lower case, without one).
func sameName(fqdn, name string) bool {
	return len(fqdn) == len(name)+1 && fqdn[len(name)] == '.' && strings.EqualFold(fqdn[:len(name)], name)
}

// positive makes the entry of an answer; ttl is the least TTL of the records
// and CNAMEs used.
func (r *Resolver) positive(qtype uint16, rrs []dns.RR, ttl uint32) *entry {
	d := min(max(time.Duration(ttl)*time.Second, r.minTTL), r.maxTTL)
	e := &entry{expires: r.now().Add(d), status: statusOK}
	switch qtype {
	case dns.TypeMX:
		nulls := 0
		for _, rr := range rrs {
			mx, ok := rr.(*dns.MX)
			if !ok {
				continue
			}
			host := strings.ToLower(strings.TrimSuffix(mx.Mx, "."))
			if host == "" {
				nulls++
				continue
			}
			if i := slices.IndexFunc(e.mx, func(h mxHost) bool { return h.host == host }); i >= 0 {
				e.mx[i].pref = min(e.mx[i].pref, mx.Preference)
				continue
			}
			e.mx = append(e.mx, mxHost{host: host, pref: mx.Preference})
		}
		if len(e.mx) == 0 && nulls > 0 {
			e.nullMX = true
		} else {
			e.key = sortMX(e.mx)
		}
	case dns.TypeA, dns.TypeAAAA:
		for _, rr := range rrs {
			var ip net.IP
			switch rr := rr.(type) {
			case *dns.A:
				ip = rr.A.To4()
			case *dns.AAAA:
				if ip = rr.AAAA.To16(); ip.To4() != nil {
					continue // an IPv4-mapped AAAA is not an IPv6 address
				}
			}
			if a, ok := netip.AddrFromSlice(ip); ok && !slices.Contains(e.addrs, a) {
				e.addrs = append(e.addrs, a)
			}
		}
		if len(e.addrs) == 0 {
			e.status = statusNoData
		}
	}
	return e
}

// negative makes the entry of an NXDOMAIN or no-data answer, cached for the
// SOA minimum (RFC 2308 §5) clamped to [MinTTL, 5m]; ttl bounds it further
// when CNAMEs led there.
func (r *Resolver) negative(st status, resp *dns.Msg, ttl uint32) *entry {
	d := r.minTTL
	for _, rr := range resp.Ns {
		if soa, ok := rr.(*dns.SOA); ok {
			d = time.Duration(min(soa.Hdr.Ttl, soa.Minttl, ttl)) * time.Second
			d = max(min(d, maxNegativeTTL), r.minTTL)
			break
		}
	}
	return &entry{expires: r.now().Add(d), status: st}
}

// exchange sends the query to each server in turn until one gives a
// definitive answer (NOERROR or NXDOMAIN). A server is asked up to Attempts
// times while it times out; SERVFAIL, REFUSED, other failure codes and
// network errors move on to the next server at once.
func (r *Resolver) exchange(ctx context.Context, name string, qtype uint16) (*dns.Msg, error) {
	var last error
servers:
	for _, srv := range r.servers {
		for range r.attempts {
			resp, err := r.exchangeOne(ctx, srv, name, qtype)
			if err == nil {
				if resp.Rcode == dns.RcodeSuccess || resp.Rcode == dns.RcodeNameError {
					return resp, nil
				}
				last = fmt.Errorf("%s %s from %s: %s", name, dns.TypeToString[qtype], srv, dns.RcodeToString[resp.Rcode])
				continue servers
			}
			last = err
			if ctx.Err() != nil {
				return nil, last
			}
			if !isTimeout(err) {
				continue servers
			}
		}
	}
	return nil, last
}

// exchangeOne asks one server once: over UDP with EDNS0, again over TCP when
// the answer is truncated, and again without EDNS0 if the server answers
// FORMERR to it.
func (r *Resolver) exchangeOne(ctx context.Context, srv, name string, qtype uint16) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	m.SetEdns0(ednsUDPSize, false)
	start := time.Now()
	defer func() { r.metrics.took(time.Since(start)) }()
	resp, err := r.send(ctx, srv, m)
	if err == nil && resp.Rcode == dns.RcodeFormatError {
		m.Extra = nil
		m.Id = dns.Id()
		resp, err = r.send(ctx, srv, m)
	}
	if err == nil && (resp.Rcode == dns.RcodeSuccess || resp.Rcode == dns.RcodeNameError) {
		if q := resp.Question; !resp.Response || len(q) != 1 || q[0].Qtype != qtype || !strings.EqualFold(q[0].Name, m.Question[0].Name) {
			err = errors.New("response does not match the question")
		}
	}
	r.metrics.query(qtype, resultOf(resp, err))
	if err != nil {
		return nil, fmt.Errorf("%s %s to %s: %w", name, dns.TypeToString[qtype], srv, err)
	}
	return resp, nil
}

// send exchanges m over UDP, falling back to TCP on truncation. A truncated
// UDP reply may fail to parse; its header is enough to tell.
func (r *Resolver) send(ctx context.Context, srv string, m *dns.Msg) (*dns.Msg, error) {
	resp, _, err := r.udp.ExchangeContext(ctx, m, srv)
	if resp != nil && resp.Truncated {
		resp, _, err = r.tcp.ExchangeContext(ctx, m, srv)
	}
	if err == nil && resp == nil {
		err = errors.New("no response")
	}
	return resp, err
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout())
}

// resultOf names the outcome of one exchange for the metrics.
func resultOf(resp *dns.Msg, err error) string {
	switch {
	case err != nil && isTimeout(err):
		return "timeout"
	case err != nil:
		return "error"
	case resp.Rcode == dns.RcodeNameError:
		return "nxdomain"
	case resp.Rcode == dns.RcodeServerFailure:
		return "servfail"
	case resp.Rcode != dns.RcodeSuccess:
		return "error"
	case len(resp.Answer) == 0:
		return "nodata"
	}
	return "ok"
}
