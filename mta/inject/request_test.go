package inject

import (
	"github.com/prometheus/client_golang/prometheus"
	"strings"
	"testing"
)

// TestDuplicateKeysAreRefused: a field given twice in one object is an
// error, at any depth, not the last one winning; the same key in two
// objects is fine.
func TestDuplicateKeysAreRefused(t *testing.T) {
	for _, tc := range []struct{ body, dup string }{
		{`{"recipients":[{"email":"a@x.test"}],"message":{"from":"f@x.test"},"recipients":[{"email":"b@x.test"}]}`, "recipients"},
		{`{"recipients":[{"email":"a@x.test","email":"b@x.test"}]}`, "email"},
		{`{"recipients":[{"email":"a@x.test","substitutions":{"n":{"k":1,"k":2}}}]}`, "k"},
		{`{"recipients":[{"email":"a@x.test","metadata":{"k":"1"}},{"email":"b@x.test","metadata":{"k":"2"}}],"message":{"from":"f@x.test","subject":"s"}}`, ""},
	} {
		_, err := decode([]byte(tc.body))
		switch {
		case tc.dup == "" && err != nil:
			t.Errorf("%s: %v", tc.body, err)
		case tc.dup != "" && (err == nil || !strings.Contains(err.Error(), `"`+tc.dup+`" is given twice`)):
			t.Errorf("%s: %v, want %q given twice", tc.body, err, tc.dup)
		}
	}
}

// TestRenderedMessageOverTheLimit: a template that renders a message over
// the size limit gets 552 5.3.4, as docs/injection.md says, not a
// template error.
func TestRenderedMessageOverTheLimit(t *testing.T) {
	h := newTestHandler(&memStore{}, nil) // MaxMessageSize 64 KiB
	big := strings.Repeat("x", 40<<10)
	code, body := post(t, h, token, map[string]any{
		"message":    map[string]any{"from": "orders@shop.example", "subject": "s", "text": "{{.a}}{{.a}}"},
		"recipients": []map[string]any{{"email": "ann@example.org", "substitutions": map[string]any{"a": big}}},
	})
	if !strings.Contains(body, `"code":552`) || !strings.Contains(body, `"enhanced":"5.3.4"`) {
		t.Errorf("%d %s, want the recipient refused with 552 5.3.4", code, body)
	}
}

// TestMetricsExistFromTheStart: the API's counters have their tenants'
// series before the first request, so that dashboards and absent()
// alerts do not start empty (docs/operations.md).
func TestMetricsExistFromTheStart(t *testing.T) {
	reg := prometheus.NewRegistry()
	newTestHandler(&memStore{}, func(o *Options) { o.Registerer = reg })
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	series := map[string]int{}
	for _, mf := range mfs {
		series[mf.GetName()] = len(mf.GetMetric())
	}
	if series["mta_api_requests_total"] < 2 || series["mta_api_messages_accepted_total"] != 2 {
		t.Errorf("series at the start: %v, want both tenants'", series)
	}
}
