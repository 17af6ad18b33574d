package admin

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/spool"
)

// flushStore is a Store that records what a flush asked of it; its other
// methods are not used here.
type flushStore struct {
	Store
	backoffsEnded int
	held          *spool.Message
}

func (f *flushStore) EndBackoffs() { f.backoffsEnded++ }

func (f *flushStore) Get(id string) (*spool.Message, error) {
	if f.held != nil && id == f.held.ID {
		return f.held, nil
	}
	return nil, mta.ErrNotFound
}

func (f *flushStore) FlushMessage(id string) error {
	if f.held != nil && id == f.held.ID {
		return ErrHeld
	}
	return mta.ErrNotFound
}

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

// Flushing a held message, or one that does not exist, is refused and
// ends no backoff.
func TestRefusedFlushOfOneMessage(t *testing.T) {
	store := &flushStore{held: &spool.Message{ID: "06H3XGYT94QBZ8FF", Held: true}}
	h := Handler(store, "")
	for id, want := range map[string]int{"06H3XGYT94QBZ8FF": http.StatusConflict, "0000000000000000": http.StatusNotFound} {
		req := httptest.NewRequest(http.MethodPost, "/api/v1/queue/"+id+"/flush", strings.NewReader("{}"))
		req.Header.Set("Content-Type", "application/json")
		req.Host = "127.0.0.1"
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != want || store.backoffsEnded != 0 {
			t.Errorf("flush of %s: %d (want %d), backoffs ended %d times", id, rec.Code, want, store.backoffsEnded)
		}
	}
}
