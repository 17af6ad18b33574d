package certs

import (
	"crypto/x509"
	"path/filepath"
	"testing"
)

func TestSelfSignedIsGeneratedOnceAndCoversLoopback(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	a, err := SelfSigned(dir, "mx.test")
	if err != nil {
		t.Fatal(err)
	}
	b, err := SelfSigned(dir, "mx.test")
	if err != nil {
		t.Fatal(err)
	}
	if string(a.Certificates[0].Certificate[0]) != string(b.Certificates[0].Certificate[0]) {
		t.Fatal("certificate regenerated on second start")
	}
	cert, err := x509.ParseCertificate(a.Certificates[0].Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []string{"mx.test", "localhost", "127.0.0.1", "::1"} {
		if err := cert.VerifyHostname(h); err != nil {
			t.Errorf("certificate does not cover %s: %v", h, err)
		}
	}
}
