package mta

import (
	"errors"
	"fmt"
	"testing"
)

func TestDomain(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"bob@Example.COM", "example.com"},
		{"\"a@b\"@example.org", "example.org"},
		{"postmaster", ""},
		{"", ""},
	} {
		if got := Domain(tc.in); got != tc.want {
			t.Errorf("Domain(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestNotifyString(t *testing.T) {
	for _, tc := range []struct {
		in   Notify
		want string
	}{
		{0, ""},
		{NotifyNever, "NEVER"},
		{NotifyFailure | NotifyDelay, "FAILURE,DELAY"},
		{NotifySuccess | NotifyFailure | NotifyDelay, "SUCCESS,FAILURE,DELAY"},
	} {
		if got := tc.in.String(); got != tc.want {
			t.Errorf("%d.String() = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestReplyClassification(t *testing.T) {
	perm := ReplyRelayDenied.With("no")
	temp := ReplySpoolError.With("later")
	if !IsPermanent(fmt.Errorf("wrapped: %w", perm)) {
		t.Error("wrapped 554 is not permanent")
	}
	if IsPermanent(temp) || !temp.Temporary() {
		t.Error("451 classified wrong")
	}
	if IsPermanent(errors.New("unknown")) {
		t.Error("unknown errors must be temporary")
	}
	if got, want := perm.Error(), "554 5.7.1 no"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	if got, want := (&Reply{Code: 250, Text: "ok"}).Error(), "250 ok"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}
