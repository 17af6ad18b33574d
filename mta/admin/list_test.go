package admin

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/spool"
)

// listStore is a Store whose List serves a fixed queue in ID order; the
// other methods are not used here.
type listStore struct {
	Store
	msgs []*spool.Message
}

func (l listStore) List(after string, limit int) ([]*spool.Message, error) {
	var out []*spool.Message
	for _, m := range l.msgs {
		if m.ID > after && len(out) < limit {
			out = append(out, m)
		}
	}
	return out, nil
}

// TestFilteredListingPages: a page that fills in the middle of the last
// batch still says where to go on, and following Next lists every match.
func TestFilteredListingPages(t *testing.T) {
	var st listStore
	for i, dom := range []string{"a.test", "a.test", "b.test", "a.test", "a.test"} {
		m := &spool.Message{ID: fmt.Sprintf("06H3800000000%03d", i), Received: time.Now(),
			Recipients: []spool.RecipientState{{Recipient: mta.Recipient{Address: "x@" + dom}, Domain: dom}}}
		st.msgs = append(st.msgs, m)
	}
	h := Handler(st, "")
	var all []string
	for after, pages := "", 0; pages < 5; pages++ {
		req := httptest.NewRequest(http.MethodGet, "/api/v1/queue?domain=a.test&limit=3&after="+after, nil)
		req.Host = "127.0.0.1"
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		var p Page
		if err := json.Unmarshal(rec.Body.Bytes(), &p); err != nil || rec.Code != http.StatusOK {
			t.Fatalf("%d %s", rec.Code, rec.Body)
		}
		for _, m := range p.Messages {
			all = append(all, m.ID)
		}
		if p.Next == "" {
			break
		}
		after = p.Next
	}
	if got := len(all); got != 4 {
		t.Errorf("listed %v, want the 4 messages of a.test", all)
	}
}
