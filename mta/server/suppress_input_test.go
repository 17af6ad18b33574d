package server

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/mtaproject/mta/spool"
)

// The suppression list takes addresses only, and says when it added one.
func TestSuppressionInput(t *testing.T) {
	for a, want := range map[string]bool{
		"user@example.com": true, `"a@b"@example.com`: true, "é@example.com": true, `"a b"@example.com`: true,
		"u@[192.0.2.1]": true, "user+tag@Bücher.example": true,
		"@": false, "a@": false, "@example.com": false, "@@@": false, "a@b@c": false, "a b@example.com": false,
		"a\x0bb@example.com": false, "a\x1b[31mRED@example.com": false, "a@exa mple.com": false, "a@-bad-.com": false,
	} {
		if got := suppressibleAddress(a); got != want {
			t.Errorf("suppressibleAddress(%q) = %v, want %v", a, got, want)
		}
	}
	sp, err := spool.Open(t.TempDir(), spool.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	s := &suppressions{sp: sp, log: zap.NewNop()}
	h := s.handler(func(*http.Request) (string, error) { return "shop", nil }, "api")
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/api/v1/suppressions?address=gone@example.com", nil))
	var e spool.Suppression
	if err := json.Unmarshal(rec.Body.Bytes(), &e); err != nil || rec.Code != 200 || time.Since(e.Added) > time.Minute {
		t.Fatalf("POST: %d %s (added %v)", rec.Code, rec.Body, e.Added)
	}
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/api/v1/suppressions?address=a@b@c", nil))
	if rec.Code != http.StatusBadRequest {
		t.Fatalf("POST a@b@c: %d %s", rec.Code, rec.Body)
	}
}
