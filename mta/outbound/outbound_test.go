package outbound

import (
	"errors"
	"io"
	"net/netip"
	"slices"
	"testing"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/mta/resolve"
	"github.com/mtaproject/mta/mta/smtpclient"
)

// TestStale: only a reused connection whose RSET got no reply is stale
// (retried at once without an attempt); a connection lost later may have
// delivered the message, and counts as an attempt.
func TestStale(t *testing.T) {
	for _, tc := range []struct {
		err   error
		stale bool
	}{
		{&smtpclient.Error{Stage: "rset", Err: io.EOF}, true},
		{&smtpclient.Error{Stage: "rset", Reply: &mta.Reply{Code: 421}}, true}, // closed for being idle too long
		{&smtpclient.Error{Stage: "rset", Reply: &mta.Reply{Code: 550}}, false},
		{&smtpclient.Error{Stage: "mail", Err: io.EOF}, false},
		{&smtpclient.Error{Stage: "data", Err: io.EOF}, false},
		{&smtpclient.Error{Stage: "dot", Err: io.EOF}, false},
		{errors.New("other"), false},
	} {
		if got := stale(tc.err); got != tc.stale {
			t.Errorf("stale(%v) = %v", tc.err, got)
		}
	}
}

// TestCandidatesTryFailingAddressesLast: an address that failed lately is
// dialled after the others, within the same MaxAddresses, and otherHost
// says whether one that has not failed is left.
func TestCandidatesTryFailingAddressesLast(t *testing.T) {
	d := &resolve.Destination{Key: "x", Hosts: []resolve.Host{
		{Name: "mx1", Preference: 10, Port: 25, Addrs: []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")}},
		{Name: "mx2", Preference: 20, Port: 25, Addrs: []netip.Addr{netip.MustParseAddr("192.0.2.3")}},
	}}
	tr := &Transport{}
	addrs := func(limit int) (out []string) {
		for _, c := range tr.candidates(d, limit) {
			out = append(out, c.addr)
		}
		return out
	}
	if got := addrs(5); !slices.Equal(got, []string{"192.0.2.1:25", "192.0.2.2:25", "192.0.2.3:25"}) {
		t.Errorf("candidates %v, want preference order", got)
	}
	tr.failing.mark("192.0.2.1:25")
	if got := addrs(2); !slices.Equal(got, []string{"192.0.2.2:25", "192.0.2.3:25"}) {
		t.Errorf("candidates %v after the first failed, want it last and cut", got)
	}
	if !tr.otherHost(d, "192.0.2.1:25") {
		t.Error("otherHost: two addresses have not failed")
	}
	tr.failing.mark("192.0.2.2:25")
	tr.failing.mark("192.0.2.3:25")
	if tr.otherHost(d, "192.0.2.3:25") {
		t.Error("otherHost: every address failed")
	}
	if got := addrs(5); len(got) != 3 {
		t.Errorf("candidates %v: with every address failing, all are still tried", got)
	}
}

// TestClosing: a 421 during the transaction is the server closing (the
// next host may take the mail); a 421 to RSET is stale; other replies and
// I/O errors are neither.
func TestClosing(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&smtpclient.Error{Stage: "mail", Reply: &mta.Reply{Code: 421}}, true},
		{&smtpclient.Error{Stage: "dot", Reply: &mta.Reply{Code: 421}}, true},
		{&smtpclient.Error{Stage: "rset", Reply: &mta.Reply{Code: 421}}, false},
		{&smtpclient.Error{Stage: "mail", Reply: &mta.Reply{Code: 451}}, false},
		{&smtpclient.Error{Stage: "dot", Err: io.EOF}, false},
	} {
		if got := closing(tc.err); got != tc.want {
			t.Errorf("closing(%v) = %v", tc.err, got)
		}
	}
}
