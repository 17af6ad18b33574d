package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/mtaproject/mta/mta"
)

// listenField is one listener address with its field name.
type listenField struct {
	field string
	host  netip.Addr // invalid for all addresses
	port  int
}

// validateListen checks that every listener address is an IP address (or
// nothing, for all addresses) and a port, that no two listeners would bind
// the same port on overlapping addresses, that the admin API is not open
// to the network without a token, and warns about a host name that other
// mail servers would not accept on a listener they can reach.
func (c *Config) validateListen(bad func(field, format string, args ...any)) {
	var ok []listenField
	public := false
	for _, l := range []struct{ field, addr string }{
		{"listen.smtp", c.Listen.SMTP}, {"listen.submission", c.Listen.Submission},
		{"listen.pop3", c.Listen.POP3}, {"listen.pop3s", c.Listen.POP3S}, {"listen.http", c.Listen.HTTP},
		{"listen.api", c.Listen.API},
	} {
		if l.addr == "" {
			continue
		}
		lf, err := parseListen(l.addr)
		if err != nil {
			bad(l.field, "%q: %v", l.addr, err)
			continue
		}
		lf.field = l.field
		for _, o := range ok {
			if lf.port != 0 && lf.port == o.port && (!lf.host.IsValid() || !o.host.IsValid() || lf.host == o.host) {
				bad(l.field, "%q: the same port as %s (%q)", l.addr, o.field, o.host)
			}
		}
		ok = append(ok, lf)
		loopback := lf.host.IsValid() && lf.host.IsLoopback()
		if !loopback && l.field != "listen.http" {
			public = true
		}
		if l.field == "listen.api" && !loopback && !c.API.TLS {
			bad(l.field, "%q is not a loopback address, and the tenants' bearer tokens would cross the network in clear: set api.tls: true", l.addr)
		}
		if l.field == "listen.http" && !loopback && c.Admin.TokenFile == "" {
			if c.Admin.Enabled {
				bad(l.field, "%q is not a loopback address, and the queue admin API it serves (list, hold, delete mail) would be open to the network: set admin.token_file, or admin.enabled: false to serve only /metrics, /healthz and /readyz", l.addr)
			}
			if c.Debug.Pprof {
				bad("debug.pprof", "profiles show memory contents: with listen.http on %q, set admin.token_file (pprof then needs the token too)", l.addr)
			}
		}
	}
	if public && !strings.Contains(strings.TrimSuffix(c.Hostname, "."), ".") {
		c.warnings = append(c.warnings, fmt.Sprintf("hostname %q is not a fully qualified domain name, and a listener is on a non-loopback address: other mail servers expect the FQDN of this host (with matching DNS) in the banner, EHLO and Received:", c.Hostname))
	}
}

// parseListen parses "ip:port", "[ipv6]:port" or ":port" (all addresses).
func parseListen(addr string) (listenField, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return listenField{}, errors.New("not an ip:port address")
	}
	var lf listenField
	if lf.port, err = strconv.Atoi(port); err != nil || lf.port < 0 || lf.port > 65535 {
		return lf, fmt.Errorf("bad port %q", port)
	}
	switch host {
	case "", "0.0.0.0", "::":
	case "localhost":
		lf.host = netip.MustParseAddr("127.0.0.1")
	default:
		if lf.host, err = netip.ParseAddr(host); err != nil {
			return lf, fmt.Errorf("%q is not an IP address (listen on an address, or leave the host out for all)", host)
		}
	}
	return lf, nil
}

// checkRouteHost checks a route host as the resolver reads it: "host",
// "host:port", "[ip]" or "[ip]:port", with a port from 1 to 65535.
func checkRouteHost(h string) error {
	host, port := h, ""
	switch {
	case strings.HasPrefix(h, "["):
		end := strings.IndexByte(h, ']')
		if end < 0 {
			return errors.New("no closing ]")
		}
		host, port = h[1:end], h[end+1:]
		if port != "" {
			if port[0] != ':' {
				return errors.New("want [ip]:port")
			}
			port = port[1:]
		}
		if _, err := netip.ParseAddr(host); err != nil {
			return fmt.Errorf("%q is not an IP address", host)
		}
	case strings.Contains(h, ":"):
		var err error
		if host, port, err = net.SplitHostPort(h); err != nil {
			return errors.New("want host, host:port, [ip] or [ip]:port")
		}
		if _, err := netip.ParseAddr(host); err == nil {
			break
		}
		fallthrough
	default:
		if _, ok := mta.NormalizeDomain(host); !ok {
			return fmt.Errorf("%q is not a host name", host)
		}
	}
	if h != "" && port != "" {
		if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
			return fmt.Errorf("bad port %q", port)
		}
	}
	return nil
}
