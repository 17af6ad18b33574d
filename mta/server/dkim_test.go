package server

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/mta/dkim"
)

// TestSigningHonoursTheSenderList: an SMTP AUTH user whose users-file
// sender list is @shop.example gets its From: shop.example mail signed,
// not mail whose From: is another domain the appliance has a key for (one
// customer must not get DMARC-passing mail as another); a user without a
// list and the trusted networks still get any From domain signed.
func TestSigningHonoursTheSenderList(t *testing.T) {
	dir := t.TempDir()
	var keys []dkim.Key
	for _, d := range []string{"shop.example", "bank.example"} {
		pem, _, err := dkim.Generate(dkim.Ed25519, d, "s1")
		if err != nil {
			t.Fatal(err)
		}
		f := filepath.Join(dir, d+".pem")
		if err := os.WriteFile(f, pem, 0o600); err != nil {
			t.Fatal(err)
		}
		keys = append(keys, dkim.Key{Domain: d, Selector: "s1", KeyFile: f})
	}
	sg, err := dkim.New(keys, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := newSigning(prometheus.NewRegistry(), sg, zap.NewNop())
	s.tenants, s.limited, s.tenant = tenantSet{}, map[string]bool{}, map[string]string{}
	s.maySend = func(user, from string) bool { return user != "alice" || strings.HasSuffix(from, "@shop.example") }
	for _, tc := range []struct {
		user, from, want string // want: the d= of the signature, "" for none
	}{
		{"alice", "orders@shop.example", "shop.example"},
		{"alice", "ceo@bank.example", ""},
		{"bob", "ceo@bank.example", "bank.example"},
		{"", "ceo@bank.example", "bank.example"}, // a trusted network
	} {
		env := &mta.Envelope{Submitted: true, AuthUser: tc.user}
		header, _ := s.sign("id", env, []byte("From: "+tc.from+"\r\nSubject: x\r\n\r\n"), []byte("hello\r\n"))
		sig, _, _ := strings.Cut(string(header), "\r\nFrom:")
		switch {
		case tc.want == "" && strings.HasPrefix(sig, "DKIM-Signature"):
			t.Errorf("%s as %s: signed: %s", tc.user, tc.from, sig)
		case tc.want != "" && !strings.Contains(sig, "d="+tc.want+";"):
			t.Errorf("%s as %s: %q, want a signature of %s", tc.user, tc.from, sig, tc.want)
		}
	}
}
