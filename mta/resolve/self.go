package resolve

import (
	"net/netip"
	"strings"

	"github.com/mtaproject/mta/mta"
)

// Self describes this server, so that the resolver can tell when the hosts
// of a destination are the server itself: an MX record or a route that
// points back here would make a message go round in circles.
//
// Its fields may be set after New (the listeners' ports are known only
// once they are bound) but must not change once delivery runs.
type Self struct {
	// Names are this server's host names; an MX or route host of one of
	// these names is this server.
	Names []string
	// Listen are the addresses of this server's SMTP listeners. A host
	// address with the same IP and port is this server; an unspecified IP
	// (0.0.0.0, ::) stands for every local address on that port.
	Listen []netip.AddrPort
	// Local reports whether an address belongs to this machine; nil: only
	// loopback addresses do.
	Local func(netip.Addr) bool
}

// is reports whether h is this server.
func (s *Self) is(h Host) bool {
	for _, n := range s.Names {
		if n != "" && strings.EqualFold(strings.TrimSuffix(h.Name, "."), strings.TrimSuffix(n, ".")) {
			return true
		}
	}
	for _, a := range h.Addrs {
		a = a.Unmap()
		for _, l := range s.Listen {
			if int(l.Port()) != h.Port {
				continue
			}
			if la := l.Addr().Unmap(); la == a || la.IsUnspecified() && (a.IsLoopback() || s.Local != nil && s.Local(a)) {
				return true
			}
		}
	}
	return false
}

// dropSelf applies RFC 5321 §5.1 to dest: when one of its MX hosts is this
// server, that host and every host of equal or higher preference value
// are dropped (they would hand the mail back or around); for a route,
// whose hosts are tried in order, the host and those after it. When
// nothing remains, the mail for the domain loops back to this server: a
// permanent failure, 554 5.4.6, as Postfix reports it.
func (s *Self) dropSelf(dest *Destination) error {
	if s == nil {
		return nil
	}
	cut := -1
	for i, h := range dest.Hosts {
		if s.is(h) {
			cut = i
			break
		}
	}
	if cut < 0 {
		return nil
	}
	if dest.Route == nil {
		// Hosts are sorted by preference, and equal ones shuffled: go back
		// to the first host of the same preference.
		for p := dest.Hosts[cut].Preference; cut > 0 && dest.Hosts[cut-1].Preference == p; cut-- {
		}
	}
	dest.Hosts = dest.Hosts[:cut]
	if len(dest.Hosts) == 0 {
		return &mta.Reply{Code: 554, Enhanced: mta.Enhanced{5, 4, 6}, Text: "mail for " + dest.Domain + " loops back to myself"}
	}
	return nil
}
