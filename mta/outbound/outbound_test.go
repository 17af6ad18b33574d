package outbound

import (
	"errors"
	"io"
	"testing"

	"github.com/mtaproject/mta/mta"
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
