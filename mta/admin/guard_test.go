package admin

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestGuard(t *testing.T) {
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "done") })
	open := httptest.NewServer(Guard("", ok))
	defer open.Close()
	locked := httptest.NewServer(Guard("s3cret", ok))
	defer locked.Close()
	call := func(base, method string, hdr map[string]string) int {
		t.Helper()
		req, _ := http.NewRequest(method, base+"/api/v1/queue/flush", strings.NewReader("{}"))
		for k, v := range hdr {
			if k == "Host" {
				req.Host = v
				continue
			}
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	json := map[string]string{"Content-Type": "application/json"}
	for _, tc := range []struct {
		name   string
		base   string
		method string
		hdr    map[string]string
		want   int
	}{
		{"read", open.URL, "GET", nil, 200},
		{"change", open.URL, "POST", json, 200},
		{"change as a form", open.URL, "POST", map[string]string{"Content-Type": "application/x-www-form-urlencoded"}, 415},
		{"change without a type", open.URL, "DELETE", nil, 415},
		{"foreign origin", open.URL, "POST", map[string]string{"Content-Type": "application/json", "Origin": "http://evil.example"}, 403},
		{"same origin", open.URL, "POST", map[string]string{"Content-Type": "application/json", "Origin": open.URL}, 200},
		{"rebound host name", open.URL, "GET", map[string]string{"Host": "evil.example:9725"}, 421},
		{"localhost", open.URL, "GET", map[string]string{"Host": "localhost:9725"}, 200},
		{"no token", locked.URL, "GET", nil, 401},
		{"wrong token", locked.URL, "GET", map[string]string{"Authorization": "Bearer guess"}, 401},
		{"token", locked.URL, "POST", map[string]string{"Authorization": "Bearer s3cret", "Content-Type": "application/json"}, 200},
		{"scheme in lower case", locked.URL, "GET", map[string]string{"Authorization": "bearer s3cret"}, 200}, // RFC 9110 §11.1
		{"another scheme", locked.URL, "GET", map[string]string{"Authorization": "Basic s3cret"}, 401},
		{"the token alone", locked.URL, "GET", map[string]string{"Authorization": "s3cret"}, 401},
		{"an empty token", locked.URL, "GET", map[string]string{"Authorization": "Bearer "}, 401},
	} {
		if got := call(tc.base, tc.method, tc.hdr); got != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, got, tc.want)
		}
	}
}
