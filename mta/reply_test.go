package mta

import "testing"

// TestReplyError: a reply renders as it appears on the wire, with its
// enhanced code only when it has one.
func TestReplyError(t *testing.T) {
	for _, c := range []struct {
		r    Reply
		want string
	}{
		{Reply{Code: 250, Enhanced: Enhanced{2, 0, 0}, Text: "Ok: queued as 1A2B"}, "250 2.0.0 Ok: queued as 1A2B"},
		{Reply{Code: 550, Enhanced: Enhanced{5, 1, 10}, Text: "no such user"}, "550 5.1.10 no such user"},
		{Reply{Code: 421, Text: "closing"}, "421 closing"},
		{Reply{Code: 250}, "250 "},
	} {
		if got := c.r.Error(); got != c.want {
			t.Errorf("%+v: %q, want %q", c.r, got, c.want)
		}
	}
	if s := (Enhanced{}).String(); s != "" {
		t.Errorf("zero enhanced code: %q", s)
	}
}
