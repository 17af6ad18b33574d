package inject

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"net/mail"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/mtaproject/mta/mta"
)

// memStore keeps what is accepted; full makes it refuse with
// mta.ErrStorageFull.
type memStore struct {
	mu      sync.Mutex
	n       int
	msgs    []Message
	batches int
	full    bool
}

func (s *memStore) NewID() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.n++
	return fmt.Sprintf("ID%06d", s.n)
}

func (s *memStore) AcceptAll(msgs []Message) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.full {
		return mta.ErrStorageFull
	}
	s.batches++
	s.msgs = append(s.msgs, msgs...)
	return nil
}

const token = "0123456789abcdef-shop"

func newTestHandler(store *memStore, edit func(*Options)) http.Handler {
	opts := Options{
		Hostname:       "mx.test",
		Tenants:        []Tenant{{Name: "shop", Token: token, FromDomains: []string{"shop.example"}}, {Name: "other", Token: "fedcba9876543210-other"}},
		MaxRequestSize: 1 << 20,
		MaxRecipients:  100,
		MaxMessageSize: 64 << 10,
		Store:          store,
		Now:            func() time.Time { return time.Date(2026, 12, 2, 10, 0, 0, 0, time.UTC) },
	}
	if edit != nil {
		edit(&opts)
	}
	return Handler(opts)
}

func post(t *testing.T, h http.Handler, tok string, body any) (int, string) {
	t.Helper()
	var b []byte
	switch v := body.(type) {
	case string:
		b = []byte(v)
	default:
		b, _ = json.Marshal(v)
	}
	req := httptest.NewRequest(http.MethodPost, "/api/v1/messages", bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec.Code, rec.Body.String()
}

// TestBuiltMessagePerRecipient: each recipient gets a message rendered with
// its own substitutions over the global ones, as a well-formed
// multipart/mixed with alternative text and HTML parts and an attachment;
// HTML substitutions are escaped, text ones are not.
func TestBuiltMessagePerRecipient(t *testing.T) {
	store := &memStore{}
	h := newTestHandler(store, nil)
	code, body := post(t, h, token, map[string]any{
		"message": map[string]any{
			"from":        "Shop <orders@shop.example>",
			"reply_to":    "help@shop.example",
			"subject":     "Your order {{.order}}, {{.first}} – {{.shop}}",
			"text":        "Hello {{.first}},\nyour order {{.order}} has shipped.\n",
			"html":        "<p>Hello {{.first}}, order <b>{{.order}}</b></p>",
			"headers":     map[string]string{"X-Order": "{{.order}}", "List-Unsubscribe": "<mailto:unsub@shop.example?subject={{.order}}>"},
			"attachments": []map[string]any{{"filename": "invoice €.pdf", "content_type": "application/pdf", "content": []byte("%PDF-1.4 fake")}},
		},
		"substitutions": map[string]any{"shop": "Bücher & Co"},
		"recipients": []map[string]any{
			{"email": "ann@example.org", "name": "Ann Example", "substitutions": map[string]any{"first": "Ann", "order": "A-1"}},
			{"email": "bob@example.net", "substitutions": map[string]any{"first": "<script>Bob</script>", "order": "B-2"}},
		},
	})
	if code != http.StatusOK {
		t.Fatalf("%d %s", code, body)
	}
	var res Result
	if err := json.Unmarshal([]byte(body), &res); err != nil || res.Accepted != 2 || res.Rejected != 0 {
		t.Fatalf("result %s: %v", body, err)
	}
	if len(store.msgs) != 2 || store.batches != 1 {
		t.Fatalf("%d messages in %d batches, want 2 in 1", len(store.msgs), store.batches)
	}
	for i, want := range []struct{ to, first, order string }{{"ann@example.org", "Ann", "A-1"}, {"bob@example.net", "<script>Bob</script>", "B-2"}} {
		m := store.msgs[i]
		if res.Recipients[i].ID != m.ID || res.Recipients[i].Email != want.to {
			t.Errorf("result %d: %+v for %s", i, res.Recipients[i], m.ID)
		}
		if m.Env.From != "orders@shop.example" || len(m.Env.Recipients) != 1 || m.Env.Recipients[0].Address != want.to || m.Env.AuthUser != "api:shop" {
			t.Errorf("envelope %+v", m.Env)
		}
		if !bytes.HasPrefix(m.Header, []byte("Received: from ")) {
			t.Errorf("trace header %q", m.Header)
		}
		msg, err := mail.ReadMessage(bytes.NewReader(m.Body))
		if err != nil {
			t.Fatalf("message %d: %v\n%s", i, err, m.Body)
		}
		dec := new(mime.WordDecoder)
		subject, _ := dec.DecodeHeader(msg.Header.Get("Subject"))
		if subject != "Your order "+want.order+", "+want.first+" – Bücher & Co" {
			t.Errorf("subject %q", subject)
		}
		if got := msg.Header.Get("X-Order"); got != want.order {
			t.Errorf("X-Order %q", got)
		}
		if to, _ := mail.ParseAddress(msg.Header.Get("To")); to == nil || to.Address != want.to {
			t.Errorf("To: %q", msg.Header.Get("To"))
		}
		if msg.Header.Get("Message-Id") != "<"+m.ID+"@mx.test>" || m.Env.MessageID != msg.Header.Get("Message-Id") {
			t.Errorf("Message-ID %q, envelope %q", msg.Header.Get("Message-Id"), m.Env.MessageID)
		}
		parts := walk(t, msg.Header.Get("Content-Type"), msg.Body)
		if len(parts) != 3 {
			t.Fatalf("message %d: %d leaf parts, want text, html, attachment:\n%s", i, len(parts), m.Body)
		}
		if parts[0].ctype != "text/plain" || parts[0].body != "Hello "+want.first+",\r\nyour order "+want.order+" has shipped.\r\n" {
			t.Errorf("text part %q: %q", parts[0].ctype, parts[0].body)
		}
		escaped := strings.ReplaceAll(strings.ReplaceAll(want.first, "<", "&lt;"), ">", "&gt;")
		if parts[1].ctype != "text/html" || !strings.Contains(parts[1].body, "Hello "+escaped+", order <b>"+want.order+"</b>") {
			t.Errorf("html part %q: %q", parts[1].ctype, parts[1].body)
		}
		if parts[2].ctype != "application/pdf" || parts[2].body != "%PDF-1.4 fake" || parts[2].filename != "invoice €.pdf" {
			t.Errorf("attachment %+v", parts[2])
		}
		for _, line := range strings.Split(string(m.Body), "\r\n") {
			if len(line) > 998 {
				t.Errorf("a line of %d octets", len(line))
			}
		}
	}
}

type leaf struct{ ctype, body, filename string }

// walk returns the leaf parts of a MIME entity, decoded.
func walk(t *testing.T, ctype string, r io.Reader) []leaf {
	t.Helper()
	mt, params, err := mime.ParseMediaType(ctype)
	if err != nil {
		t.Fatalf("Content-Type %q: %v", ctype, err)
	}
	if !strings.HasPrefix(mt, "multipart/") {
		b, _ := io.ReadAll(r)
		return []leaf{{ctype: mt, body: string(b)}}
	}
	var out []leaf
	mr := multipart.NewReader(r, params["boundary"])
	for {
		p, err := mr.NextPart() // decodes quoted-printable itself
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		var body io.Reader = p
		if p.Header.Get("Content-Transfer-Encoding") == "base64" {
			raw, _ := io.ReadAll(p)
			dec := make([]byte, len(raw))
			n, err := decodeBase64Lines(raw, dec)
			if err != nil {
				t.Fatalf("base64: %v", err)
			}
			body = bytes.NewReader(dec[:n])
		}
		leaves := walk(t, p.Header.Get("Content-Type"), body)
		if fn := p.FileName(); fn != "" && len(leaves) == 1 {
			leaves[0].filename = fn
		}
		out = append(out, leaves...)
	}
}

// TestRecipientsRefusedOneByOne: a bad address, a template that needs a
// missing substitution, and a rendered header with a line break are each
// refused for their recipient only, with an SMTP-style reply; the others
// are stored.
func TestRecipientsRefusedOneByOne(t *testing.T) {
	store := &memStore{}
	h := newTestHandler(store, nil)
	code, body := post(t, h, token, map[string]any{
		"message":       map[string]any{"from": "orders@shop.example", "subject": "Hi {{.first}}", "text": "x", "headers": map[string]string{"X-Ref": "{{.ref}}"}},
		"substitutions": map[string]any{"ref": "r"},
		"recipients": []map[string]any{
			{"email": "ok@example.org", "substitutions": map[string]any{"first": "A"}},
			{"email": "not an address", "substitutions": map[string]any{"first": "B"}},
			{"email": "nofirst@example.org"},
			{"email": "inject@example.org", "substitutions": map[string]any{"first": "C", "ref": "x\r\nBcc: victim@example.com"}},
		},
	})
	if code != http.StatusOK {
		t.Fatalf("%d %s", code, body)
	}
	var res Result
	json.Unmarshal([]byte(body), &res)
	if res.Accepted != 1 || res.Rejected != 3 || len(store.msgs) != 1 {
		t.Fatalf("%s", body)
	}
	want := []string{"", "550 5.1.3", "554 5.6.0", "554 5.6.0"}
	for i, w := range want {
		e := res.Recipients[i].Error
		switch {
		case w == "" && e != nil:
			t.Errorf("recipient %d refused: %+v", i, e)
		case w != "" && (e == nil || fmt.Sprintf("%d %s", e.Code, e.Enhanced) != w):
			t.Errorf("recipient %d: %+v, want %s", i, e, w)
		}
	}
	if e := res.Recipients[2].Error; e == nil || !strings.Contains(e.Text, "first") {
		t.Errorf("the missing substitution is not named: %+v", e)
	}
	if bytes.Contains(store.msgs[0].Body, []byte("victim")) {
		t.Error("a header injection went through")
	}
}

// TestRequestsRefusedWhole: authentication, the tenant's sender domains,
// the limits and malformed requests are refused with a clear 4xx and
// nothing is stored.
func TestRequestsRefusedWhole(t *testing.T) {
	store := &memStore{}
	h := newTestHandler(store, nil)
	ok := map[string]any{"message": map[string]any{"from": "a@shop.example", "subject": "s", "text": "t"}, "recipients": []map[string]any{{"email": "r@example.org"}}}
	many := make([]map[string]any, 101)
	for i := range many {
		many[i] = map[string]any{"email": fmt.Sprintf("r%d@example.org", i)}
	}
	for _, c := range []struct {
		name, token string
		body        any
		code        int
		text        string
	}{
		{"no token", "", ok, 401, "bearer token"},
		{"wrong token", "0123456789abcdef-shoq", ok, 401, "bearer token"},
		{"foreign From domain", token, map[string]any{"message": map[string]any{"from": "a@bank.example", "subject": "s", "text": "t"}, "recipients": ok["recipients"]}, 403, "may not send from bank.example"},
		{"foreign envelope", token, map[string]any{"envelope_from": "b@bank.example", "message": ok["message"], "recipients": ok["recipients"]}, 403, "envelope_from"},
		{"not JSON", token, "{\"message\": ", 400, "JSON"},
		{"unknown field", token, map[string]any{"mesage": 1, "recipients": ok["recipients"]}, 400, "mesage"},
		{"wrong type", token, map[string]any{"message": ok["message"], "recipients": "r@example.org"}, 400, "recipients"},
		{"no recipients", token, map[string]any{"message": ok["message"]}, 400, "recipients"},
		{"too many recipients", token, map[string]any{"message": ok["message"], "recipients": many}, 413, "api.max_recipients"},
		{"both bodies", token, map[string]any{"content": "From: a@shop.example\r\n\r\nx", "message": ok["message"], "recipients": ok["recipients"]}, 400, "exactly one"},
		{"bad template", token, map[string]any{"message": map[string]any{"from": "a@shop.example", "subject": "{{.x", "text": "t"}, "recipients": ok["recipients"]}, 400, "message.subject"},
		{"reserved header", token, map[string]any{"message": map[string]any{"from": "a@shop.example", "subject": "s", "text": "t", "headers": map[string]string{"bcc": "x@y"}}, "recipients": ok["recipients"]}, 400, "message.headers.bcc"},
		{"no body", token, map[string]any{"message": map[string]any{"from": "a@shop.example", "subject": "s"}, "recipients": ok["recipients"]}, 400, "text, html"},
		{"range over a number", token, map[string]any{"message": map[string]any{"from": "a@shop.example", "subject": "s", "text": "{{range 100000000}}{{end}}"}, "recipients": ok["recipients"]}, 400, "over a number"},
		{"nested range", token, map[string]any{"message": map[string]any{"from": "a@shop.example", "subject": "s", "html": "{{range .a}}{{range .a}}x{{end}}{{end}}"}, "recipients": ok["recipients"]}, 400, "inside a {{range}}"},
		{"define", token, map[string]any{"message": map[string]any{"from": "a@shop.example", "subject": "{{define \"x\"}}{{template \"x\"}}{{end}}{{template \"x\"}}", "text": "t"}, "recipients": ok["recipients"]}, 400, "not allowed"},
		{"long list", token, map[string]any{"message": ok["message"], "recipients": ok["recipients"], "substitutions": map[string]any{"items": make([]int, 1001)}}, 400, "substitutions.items: a list of 1001 items"},
		{"bad priority", token, map[string]any{"message": ok["message"], "recipients": ok["recipients"], "priority": "urgent"}, 400, "priority"},
		{"too large", token, strings.Repeat(" ", 1<<20+1), 413, "api.max_request_size"},
		{"attachment content_type with a NUL", token, map[string]any{"message": map[string]any{"from": "a@shop.example", "subject": "s", "text": "t", "attachments": []map[string]any{{"filename": "a.txt", "content_type": "text/plain; charset=\"a\u0000b\"", "content": "eA=="}}}, "recipients": ok["recipients"]}, 400, "content_type"},
		{"attachment content_type multipart", token, map[string]any{"message": map[string]any{"from": "a@shop.example", "subject": "s", "text": "t", "attachments": []map[string]any{{"filename": "a", "content_type": "multipart/mixed; boundary=x", "content": "eA=="}}}, "recipients": ok["recipients"]}, 400, "not a multipart entity"},
		{"range over a function", token, map[string]any{"message": map[string]any{"from": "a@shop.example", "subject": "s", "text": "{{range len .s}}x{{end}}"}, "recipients": ok["recipients"], "substitutions": map[string]any{"s": "abcd"}}, 400, "function's result"},
		{"deep substitutions", token, map[string]any{"message": ok["message"], "recipients": ok["recipients"], "substitutions": nested(40)}, 400, "nested over 16 levels"},
	} {
		code, body := post(t, h, c.token, c.body)
		if code != c.code || !strings.Contains(body, c.text) {
			t.Errorf("%s: %d %s, want %d with %q", c.name, code, body, c.code, c.text)
		}
	}
	if len(store.msgs) != 0 {
		t.Errorf("%d messages stored from refused requests", len(store.msgs))
	}
}

// TestRawContentAndStorageFull: raw content goes to each recipient as it
// is, keeping its Message-ID; a full spool refuses with 503 and
// Retry-After, storing nothing.
func TestRawContentAndStorageFull(t *testing.T) {
	store := &memStore{}
	h := newTestHandler(store, nil)
	raw := "From: Shop <a@shop.example>\nSubject: raw\nMessage-ID: <raw-1@shop.example>\n\nbody line\n"
	code, body := post(t, h, token, map[string]any{"content": raw, "recipients": []map[string]any{{"email": "x@example.org"}, {"email": "y@example.org"}}})
	if code != 200 || len(store.msgs) != 2 {
		t.Fatalf("%d %s", code, body)
	}
	for _, m := range store.msgs {
		if string(m.Body) != strings.ReplaceAll(raw, "\n", "\r\n") || m.Env.MessageID != "<raw-1@shop.example>" {
			t.Errorf("stored %q (%s)", m.Body, m.Env.MessageID)
		}
	}
	store.msgs = nil
	code, body = post(t, h, token, map[string]any{"content": "From: a@shop.example\nSubject: bare\n\nx\n", "recipients": []map[string]any{{"email": "x@example.org"}}})
	if code != 200 || len(store.msgs) != 1 {
		t.Fatalf("%d %s", code, body)
	}
	m := store.msgs[0]
	full, _ := mail.ReadMessage(bytes.NewReader(append(append([]byte{}, m.Header...), m.Body...)))
	if full.Header.Get("Date") == "" || full.Header.Get("Message-Id") != "<"+m.ID+"@mx.test>" || m.Env.MessageID != full.Header.Get("Message-Id") {
		t.Errorf("raw content without Date and Message-ID: %q + %q", m.Header, m.Body)
	}
	if code, body := post(t, h, token, map[string]any{"content": "From: a@shop.example\nFrom: b@bank.example\n\nx\n", "recipients": []map[string]any{{"email": "x@example.org"}}}); code != 400 || !strings.Contains(body, "2 From fields") {
		t.Errorf("two From fields: %d %s", code, body)
	}
	// The obsolete "From :" is a From field too (RFC 5322 §4.5.3).
	if code, body := post(t, h, token, map[string]any{"content": "From: a@shop.example\nFrom : b@bank.example\n\nx\n", "recipients": []map[string]any{{"email": "x@example.org"}}}); code != 400 || !strings.Contains(body, "2 From fields") {
		t.Errorf("From and \"From :\": %d %s", code, body)
	}
	// A display name in a charset net/mail does not decode is accepted.
	if code, body := post(t, h, token, map[string]any{"content": "From: =?windows-1252?Q?Caf=E9?= <a@shop.example>\nSubject: x\n\nx\n", "recipients": []map[string]any{{"email": "x@example.org"}}}); code != 200 {
		t.Errorf("a windows-1252 display name: %d %s", code, body)
	}
	store.full = true
	req := httptest.NewRequest(http.MethodPost, "/api/v1/messages", strings.NewReader(`{"content": "From: a@shop.example\n\nx", "recipients": [{"email": "z@example.org"}]}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+token)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code != 503 || rec.Header().Get("Retry-After") == "" || !strings.Contains(rec.Body.String(), "452") {
		t.Errorf("storage full: %d %v %s", rec.Code, rec.Header(), rec.Body)
	}
}

func decodeBase64Lines(raw, dst []byte) (int, error) {
	return base64StdDecode(dst, bytes.ReplaceAll(raw, []byte("\r\n"), nil))
}

var base64StdDecode = base64.StdEncoding.Decode

// TestMemoryBudget: the request and each rendered message are charged to
// the shared budget and given back; a batch is stored early to make room,
// and a message that cannot fit even then gets 451 4.3.2.
func TestMemoryBudget(t *testing.T) {
	store := &memStore{}
	budget := mta.NewBudget(3000)
	h := newTestHandler(store, func(o *Options) { o.Memory = budget })
	req := map[string]any{"message": map[string]any{"from": "a@shop.example", "subject": "s", "text": strings.Repeat("x", 800)},
		"recipients": []map[string]any{{"email": "a@example.org"}, {"email": "b@example.org"}, {"email": "c@example.org"}, {"email": "d@example.org"}}}
	code, body := post(t, h, token, req)
	if code != 200 || !strings.Contains(body, `"accepted":4`) || store.batches < 2 {
		t.Fatalf("%d %s (%d batches): want all 4 stored, in more than one batch", code, body, store.batches)
	}
	if used := budget.Used(); used != 0 {
		t.Errorf("%d bytes of the budget still held after the request", used)
	}
	req["message"].(map[string]any)["text"] = strings.Repeat("y", 2800)
	code, body = post(t, h, token, req)
	if code != 422 || !strings.Contains(body, `"enhanced":"4.3.2"`) || budget.Used() != 0 {
		t.Errorf("messages larger than the budget: %d %s, %d held", code, body, budget.Used())
	}
}

// nested is a map n levels deep.
func nested(n int) map[string]any {
	m := map[string]any{"leaf": "x"}
	for i := 0; i < n; i++ {
		m = map[string]any{"k": m}
	}
	return m
}

// A printf that would cost time and memory for nothing (a huge width,
// printing into a variable, past the output cap's sight) is refused at
// render, per recipient.
func TestTemplatePrintfIsBounded(t *testing.T) {
	store := &memStore{}
	h := newTestHandler(store, nil)
	code, body := post(t, h, token, map[string]any{
		"message":    map[string]any{"from": "a@shop.example", "subject": "s", "text": `{{$x := printf "%0999999d" 0}}done`},
		"recipients": []map[string]any{{"email": "a@example.org"}},
	})
	if code != 422 || !strings.Contains(body, "width or precision over 256") {
		t.Fatalf("%d %s", code, body)
	}
	if code, body := post(t, h, token, map[string]any{
		"message":    map[string]any{"from": "a@shop.example", "subject": "s", "text": `{{printf "%05d|%.2f|%s" 42 3.14159 "ok"}}`},
		"recipients": []map[string]any{{"email": "a@example.org"}},
	}); code != 200 || len(store.msgs) != 1 || !strings.Contains(string(store.msgs[0].Body), "00042|3.14|ok") {
		t.Fatalf("an ordinary printf: %d %s", code, body)
	}
	for _, f := range []string{"%*d", "%.*f", "%[1]d", "%257s", "%.300f"} {
		if checkFormat(f) == nil {
			t.Errorf("checkFormat(%q) allowed it", f)
		}
	}
}

// The request body is charged to the memory budget as it arrives: a
// client that announces nothing and sends slowly holds what it sent, not
// the most a request may be; one that announces too much is refused at
// once.
func TestRequestBodyIsChargedAsItArrives(t *testing.T) {
	budget := mta.NewBudget(8 << 20)
	h := newTestHandler(&memStore{}, func(o *Options) { o.Memory = budget })
	pr, pw := io.Pipe()
	req := httptest.NewRequest(http.MethodPost, "/api/v1/messages", pr)
	req.ContentLength = -1
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+token)
	done := make(chan int)
	go func() {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		done <- rec.Code
	}()
	if _, err := pw.Write([]byte(`{"content": "`)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if used := budget.Used(); used > 1024 {
		t.Errorf("%d bytes of the budget held for a body of 13 bytes so far", used)
	}
	pw.Close()
	<-done
	if used := budget.Used(); used != 0 {
		t.Errorf("%d bytes still held after the request", used)
	}

	big := httptest.NewRequest(http.MethodPost, "/api/v1/messages", strings.NewReader("{}"))
	big.ContentLength = 2 << 20 // over MaxRequestSize (1 MiB), though the body is short
	big.Header.Set("Content-Type", "application/json")
	big.Header.Set("Authorization", "Bearer "+token)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, big)
	if rec.Code != 413 {
		t.Errorf("Content-Length over the limit: %d, want 413 at once", rec.Code)
	}
}

// The media type is compared as one (RFC 9110 §8.3.1: any case,
// parameters allowed), not as a prefix of the header.
func TestContentTypeIsAMediaType(t *testing.T) {
	h := newTestHandler(&memStore{}, nil)
	for ct, want := range map[string]int{"Application/JSON": 200, "application/json; charset=utf-8": 200, "application/jsonp": 415, "application/json-seq": 415} {
		b, _ := json.Marshal(map[string]any{"message": map[string]any{"from": "a@shop.example", "subject": "s", "text": "t"}, "recipients": []map[string]any{{"email": "r@example.org"}}})
		req := httptest.NewRequest(http.MethodPost, "/api/v1/messages", bytes.NewReader(b))
		req.Header.Set("Content-Type", ct)
		req.Header.Set("Authorization", "Bearer "+token)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != want {
			t.Errorf("Content-Type %q: %d, want %d", ct, rec.Code, want)
		}
	}
}

// Requests are counted by tenant and reply code, messages by tenant.
func TestRequestsAreCounted(t *testing.T) {
	reg := prometheus.NewRegistry()
	h := newTestHandler(&memStore{}, func(o *Options) { o.Registerer = reg })
	ok := map[string]any{"message": map[string]any{"from": "a@shop.example", "subject": "s", "text": "t"},
		"recipients": []map[string]any{{"email": "a@example.org"}, {"email": "b@example.org"}}}
	post(t, h, token, ok)
	post(t, h, "0123456789abcdef-wrong", ok)
	post(t, h, token, map[string]any{"message": map[string]any{"from": "a@bank.example", "subject": "s", "text": "t"}, "recipients": ok["recipients"]})
	want := map[string]float64{
		`mta_api_requests_total{code="200",tenant="shop"}`:    1,
		`mta_api_requests_total{code="401",tenant="unknown"}`: 1,
		`mta_api_requests_total{code="403",tenant="shop"}`:    1,
		`mta_api_messages_accepted_total{tenant="shop"}`:      2,
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			labels := []string{}
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			got[mf.GetName()+"{"+strings.Join(labels, ",")+"}"] = m.GetCounter().GetValue()
		}
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v (all: %v)", k, got[k], v, got)
		}
	}
}

// A key that is not an identifier is reached with index, and may be
// ranged over; index with a key computed by a function may not.
func TestRangeOverAnIndexedKey(t *testing.T) {
	store := &memStore{}
	h := newTestHandler(store, nil)
	code, body := post(t, h, token, map[string]any{
		"message":       map[string]any{"from": "a@shop.example", "subject": "s", "text": `{{range index . "order-items"}}[{{.}}]{{end}}`},
		"recipients":    []map[string]any{{"email": "a@example.org"}},
		"substitutions": map[string]any{"order-items": []string{"tea", "cake"}},
	})
	if code != 200 || len(store.msgs) != 1 || !strings.Contains(string(store.msgs[0].Body), "[tea][cake]") {
		t.Fatalf("%d %s", code, body)
	}
	if code, body := post(t, h, token, map[string]any{
		"message":    map[string]any{"from": "a@shop.example", "subject": "s", "text": `{{range index . (printf "%s" "k")}}x{{end}}`},
		"recipients": []map[string]any{{"email": "a@example.org"}},
	}); code != 400 {
		t.Fatalf("index with a computed key: %d %s", code, body)
	}
}
