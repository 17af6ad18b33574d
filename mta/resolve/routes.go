package resolve

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// route is a Route prepared for use.
type route struct {
	route *Route
	hosts []routeHost
	key   string
	tls   TLSPolicy
}

// routeHost is one parsed Route.Hosts entry: name is "" for a literal.
type routeHost struct {
	name string
	addr netip.Addr
	port int
}

// prepareRoute parses and checks a Route.
func (r *Resolver) prepareRoute(rt Route, defaultTLS TLSPolicy) (*route, error) {
	if len(rt.Hosts) == 0 {
		return nil, errors.New("no hosts")
	}
	p := &route{tls: rt.TLS}
	if p.tls == "" {
		p.tls = defaultTLS
	}
	if !validTLS(p.tls) {
		return nil, fmt.Errorf("bad TLS policy %q", rt.TLS)
	}
	cp := rt
	cp.Hosts = append([]string(nil), rt.Hosts...)
	if rt.Auth != nil {
		a := *rt.Auth
		cp.Auth = &a
	}
	p.route = &cp
	keys := make([]string, 0, len(rt.Hosts))
	for _, h := range rt.Hosts {
		rh, err := parseRouteHost(h, r.port)
		if err != nil {
			return nil, err
		}
		p.hosts = append(p.hosts, rh)
		host := rh.name
		if host == "" {
			host = "[" + rh.addr.String() + "]"
		}
		keys = append(keys, host+":"+strconv.Itoa(rh.port))
	}
	// Routes that share hosts but not their TLS policy or credentials must
	// not share connections: the policy is part of the identity.
	p.key = "route:" + strings.Join(keys, ",") + " tls=" + string(p.tls)
	if rt.Auth != nil {
		p.key += " auth=" + rt.Auth.Username
	}
	return p, nil
}

// parseRouteHost parses "host", "host:port", "[ip]", "[ip]:port" or a bare IP.
func parseRouteHost(s string, defPort int) (routeHost, error) {
	rh := routeHost{port: defPort}
	host := s
	if strings.HasPrefix(s, "[") {
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return rh, fmt.Errorf("bad route host %q", s)
		}
		host = s[1:end]
		switch rest := s[end+1:]; {
		case rest == "":
		case rest[0] == ':':
			p, err := parsePort(rest[1:])
			if err != nil {
				return rh, fmt.Errorf("bad route host %q: %w", s, err)
			}
			rh.port = p
		default:
			return rh, fmt.Errorf("bad route host %q", s)
		}
		a, err := netip.ParseAddr(host)
		if err != nil || a.Zone() != "" {
			return rh, fmt.Errorf("bad route host %q: not an IP address", s)
		}
		rh.addr = a.Unmap()
		return rh, nil
	}
	if a, err := netip.ParseAddr(s); err == nil && a.Zone() == "" {
		rh.addr = a.Unmap()
		return rh, nil
	}
	if strings.IndexByte(s, ':') >= 0 {
		h, p, err := net.SplitHostPort(s)
		if err != nil {
			return rh, fmt.Errorf("bad route host %q: %w", s, err)
		}
		if rh.port, err = parsePort(p); err != nil {
			return rh, fmt.Errorf("bad route host %q: %w", s, err)
		}
		host = h
		if a, err := netip.ParseAddr(h); err == nil && a.Zone() == "" {
			rh.addr = a.Unmap()
			return rh, nil
		}
	}
	name, ok := normalize(host)
	if !ok {
		return rh, fmt.Errorf("bad route host %q", s)
	}
	rh.name = name
	return rh, nil
}

func parsePort(s string) (int, error) {
	p, err := strconv.Atoi(s)
	if err != nil || p < 1 || p > 65535 {
		return 0, fmt.Errorf("bad port %q", s)
	}
	return p, nil
}

// resolveRoute builds the destination of a static route. A route is local
// configuration, so failing to find its hosts' addresses is temporary: the
// mail waits for the configuration or DNS to be fixed rather than bouncing.
func (r *Resolver) resolveRoute(ctx context.Context, display, name string, rt *route) (*Destination, error) {
	var names []string
	for _, h := range rt.hosts {
		if h.name != "" {
			names = append(names, h.name)
		}
	}
	var res []addrResult
	if len(names) > 0 {
		res = r.hostAddrs(ctx, names)
	}
	dest := &Destination{Domain: display, Key: rt.key, Route: rt.route, TLS: rt.tls}
	var lastErr error
	j := 0
	for i, h := range rt.hosts {
		// A route's hosts are tried in the order given (a primary relay,
		// then its backup): each its own preference, so that delivery's
		// shuffle of equally preferred hosts leaves them in order.
		pref := uint16(min(i, 65535))
		if h.name == "" {
			dest.Hosts = append(dest.Hosts, Host{Preference: pref, Port: h.port, Addrs: []netip.Addr{h.addr}})
			continue
		}
		a := res[j]
		j++
		if len(a.addrs) == 0 {
			if a.err != nil {
				lastErr = a.err
			} else {
				lastErr = fmt.Errorf("no address for relay host %s", h.name)
			}
			continue
		}
		dest.Hosts = append(dest.Hosts, Host{Name: h.name, Preference: pref, Port: h.port, Addrs: a.addrs})
	}
	if len(dest.Hosts) == 0 {
		return nil, errTemporary(name, lastErr)
	}
	return dest, nil
}
