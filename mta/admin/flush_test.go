package admin

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// flushStore is a Store that records what a flush asked of it; its other
// methods are not used here.
type flushStore struct {
	Store
	backoffsEnded int
}

func (f *flushStore) EndBackoffs() { f.backoffsEnded++ }

// A flush refused for its filter changes nothing: the destinations'
// backoffs are not ended either.
func TestRefusedFlushEndsNoBackoff(t *testing.T) {
	store := &flushStore{}
	h := Handler(store, "")
	req := httptest.NewRequest(http.MethodPost, "/api/v1/queue/flush?state=bogus", strings.NewReader("{}"))
	req.Header.Set("Content-Type", "application/json")
	req.Host = "127.0.0.1"
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code != http.StatusBadRequest || store.backoffsEnded != 0 {
		t.Fatalf("flush with a bad filter: %d, backoffs ended %d times", rec.Code, store.backoffsEnded)
	}
}
