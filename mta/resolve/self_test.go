package resolve

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/mtaproject/mta/mta"
)

func TestDropSelf(t *testing.T) {
	self := &Self{
		Names:  []string{"mx.example.net"},
		Listen: []netip.AddrPort{netip.MustParseAddrPort("192.0.2.1:25"), netip.MustParseAddrPort("0.0.0.0:2525")},
		Local:  func(a netip.Addr) bool { return a == netip.MustParseAddr("198.51.100.7") },
	}
	host := func(name string, pref uint16, port int, addr string) Host {
		return Host{Name: name, Preference: pref, Port: port, Addrs: []netip.Addr{netip.MustParseAddr(addr)}}
	}
	other := host("other.test", 10, 25, "203.0.113.5")
	for _, tc := range []struct {
		name  string
		dest  Destination
		keep  int
		loops bool
	}{
		{"no self", Destination{Hosts: []Host{other}}, 1, false},
		{"self by address, better than the other", Destination{Hosts: []Host{host("a.test", 5, 25, "192.0.2.1"), other}}, 0, true},
		{"self as a backup", Destination{Hosts: []Host{other, host("b.test", 20, 25, "192.0.2.1")}}, 1, false},
		{"self with the same preference", Destination{Hosts: []Host{other, host("c.test", 10, 25, "192.0.2.1")}}, 0, true},
		{"self by name", Destination{Hosts: []Host{host("MX.example.net.", 10, 25, "203.0.113.9")}}, 0, true},
		{"loopback on a wildcard listener", Destination{Hosts: []Host{host("lo.test", 0, 2525, "127.0.0.1")}}, 0, true},
		{"a local address on a wildcard listener", Destination{Hosts: []Host{host("if.test", 0, 2525, "198.51.100.7")}}, 0, true},
		{"same address, another port", Destination{Hosts: []Host{host("d.test", 0, 2526, "192.0.2.1")}}, 1, false},
		{"route: self and the hosts after it", Destination{Route: &Route{}, Hosts: []Host{host("r1.test", 0, 25, "203.0.113.5"), host("r2.test", 0, 25, "192.0.2.1"), host("r3.test", 0, 25, "203.0.113.6")}}, 1, false},
	} {
		d := tc.dest
		d.Domain = "example.com"
		err := self.dropSelf(&d)
		if (err != nil) != tc.loops || len(d.Hosts) != tc.keep && err == nil {
			t.Errorf("%s: %d hosts kept, err %v", tc.name, len(d.Hosts), err)
		}
		if err != nil && (!mta.IsPermanent(err) || !strings.Contains(err.Error(), "554 5.4.6 mail for example.com loops back to myself")) {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
	var none *Self
	if err := none.dropSelf(&Destination{Hosts: []Host{other}}); err != nil {
		t.Fatal(err)
	}
}
