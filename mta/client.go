package mta

import "net/netip"

// ClientNetwork is what limits per client count together: an IPv4
// address alone, an IPv6 address with its /64, which one host or one
// customer usually holds whole (and can draw addresses from at will).
func ClientNetwork(ip netip.Addr) netip.Prefix {
	if ip.Is4() {
		return netip.PrefixFrom(ip, 32)
	}
	p, _ := ip.Prefix(64)
	return p
}
