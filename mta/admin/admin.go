// Package admin is the queue administration API that the `mta queue`
// commands use: Pebble allows one process per database, so the CLI talks to
// the running server over HTTP on its loopback port instead of opening the
// spool. This package holds the JSON types, the HTTP handler and the client.
package admin

import (
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/spool"
)

// Store is what the API needs from the spool.
type Store interface {
	List(after string, limit int) ([]*spool.Message, error)
	Get(id string) (*spool.Message, error)
	Hold(id string) error
	Release(id string) error
	Remove(id string) error
	Bounce(id string) error // fail the remaining recipients now and bounce them
	Flush() (int, error)
	// FlushMessage makes the queued recipients of message id due now
	// (unless it is held); EndBackoffs ends every destination's backoff,
	// so that flushed mail is tried at once rather than postponed again.
	FlushMessage(id string) error
	EndBackoffs()
	// Destinations returns what delivery knows of each destination, busiest
	// first; nil when delivery is not running.
	Destinations() []Destination
	// Reload applies the configuration file again (as SIGHUP does).
	Reload() error
	// Suspend stops delivery to a domain for d (0: until Resume); Resume
	// ends it (mta.ErrNotFound if it was not suspended); Suspensions lists
	// them with their end (zero: until resumed).
	Suspend(domain string, d time.Duration)
	Resume(domain string) error
	Suspensions() map[string]time.Time
}

// Destination is one destination (a next-hop set) as delivery sees it.
type Destination struct {
	Key         string     `json:"key"`
	Class       string     `json:"class"` // mx, route or local
	Queued      int        `json:"queued"`
	Connections int        `json:"connections"`
	Window      int        `json:"window"`
	BackedOff   bool       `json:"backed_off"`
	BackoffEnds *time.Time `json:"backoff_until,omitempty"`
	Failures    int        `json:"failures"`
	LastError   string     `json:"last_error,omitempty"`
	LastErrorAt *time.Time `json:"last_error_at,omitempty"`
}

// Message is one queued message as the API shows it.
type Message struct {
	ID         string      `json:"id"`
	From       string      `json:"from"`
	EnvID      string      `json:"envid,omitempty"`
	Ret        string      `json:"ret,omitempty"`
	ClientIP   string      `json:"client_ip"`
	HELO       string      `json:"helo"`
	AuthUser   string      `json:"auth_user,omitempty"`
	Received   time.Time   `json:"received"`
	Size       int64       `json:"size"`
	Held       bool        `json:"held"`
	State      string      `json:"state"` // queued (not tried yet), deferred or held
	Recipients []Recipient `json:"recipients"`
}

// Recipient is one recipient of a queued message and its delivery state.
type Recipient struct {
	Address     string     `json:"address"`
	Status      string     `json:"status"` // queued, delivered, failed (a message leaves the queue once none is queued)
	Notify      string     `json:"notify,omitempty"`
	ORcpt       string     `json:"orcpt,omitempty"`
	Attempts    int        `json:"attempts"`
	NextAttempt *time.Time `json:"next_attempt,omitempty"`
	LastAttempt *time.Time `json:"last_attempt,omitempty"`
	LastReply   string     `json:"last_reply,omitempty"`
}

// Page is one page of the queue listing.
type Page struct {
	Messages []Message `json:"messages"`
	Next     string    `json:"next,omitempty"` // pass as ?after= for the next page
}

// Result is the answer to an action.
type Result struct {
	ID          string `json:"id,omitempty"`
	Action      string `json:"action"`
	Rescheduled int    `json:"rescheduled,omitempty"`
}

// BulkResult is the answer to an action on the messages a filter selects.
type BulkResult struct {
	Action  string `json:"action"`
	Matched int    `json:"matched"`          // messages acted on
	Failed  int    `json:"failed,omitempty"` // messages the action failed on
}

// maxScanned bounds the messages one filtered listing request reads.
const maxScanned = 100_000

// Error is the body of every non-2xx answer.
type Error struct {
	Error string `json:"error"`
}

func fromSpool(m *spool.Message) Message {
	out := Message{ID: m.ID, From: m.From, EnvID: m.EnvID, Ret: string(m.Ret), ClientIP: m.ClientIP,
		HELO: m.HELO, AuthUser: m.AuthUser, Received: m.Received, Size: m.Size, Held: m.Held, State: State(m)}
	for _, r := range m.Recipients {
		rr := Recipient{Address: r.Address, Status: r.Status.String(), Notify: r.Notify.String(),
			Attempts: r.Attempts, LastReply: r.LastReply}
		if r.ORcpt != "" {
			rr.ORcpt = r.ORcptType + ";" + r.ORcpt
		}
		if r.Status == spool.Queued && !m.Held {
			t := r.NextAttempt
			rr.NextAttempt = &t
		}
		if !r.LastAttempt.IsZero() {
			t := r.LastAttempt
			rr.LastAttempt = &t
		}
		out.Recipients = append(out.Recipients, rr)
	}
	return out
}

// Handler serves the API under /api/v1/queue. With a non-empty token, every
// request must carry "Authorization: Bearer <token>" (401 otherwise).
func Handler(store Store, token string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/v1/queue", func(w http.ResponseWriter, r *http.Request) {
		limit := 100
		if v := r.URL.Query().Get("limit"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 10000 {
				writeJSON(w, http.StatusBadRequest, Error{"limit must be 1 to 10000"})
				return
			}
			limit = n
		}
		after := r.URL.Query().Get("after")
		if after != "" && !spool.ValidID(after) {
			writeJSON(w, http.StatusBadRequest, Error{"after: not a queue ID"})
			return
		}
		f, err := ParseFilter(r.URL.Query())
		if err != nil {
			writeJSON(w, http.StatusBadRequest, Error{err.Error()})
			return
		}
		page := Page{Messages: []Message{}}
		now := time.Now()
		// With a filter, read on until the page is full, but look at no
		// more than maxScanned messages per request: Next says where to
		// go on.
		for scanned := 0; len(page.Messages) < limit && scanned < maxScanned; {
			msgs, err := store.List(after, min(limit, 1000))
			if err != nil {
				writeJSON(w, http.StatusInternalServerError, Error{err.Error()})
				return
			}
			used := 0 // messages of this batch looked at
			for _, m := range msgs {
				after = m.ID
				scanned++
				used++
				if f.Match(m, now) {
					page.Messages = append(page.Messages, fromSpool(m))
					if len(page.Messages) == limit {
						break
					}
				}
			}
			if len(msgs) < min(limit, 1000) && used == len(msgs) {
				after = "" // the end of the queue, every message of it looked at
				break
			}
		}
		page.Next = after
		writeJSON(w, http.StatusOK, page)
	})
	bulk := func(name string, fn func(string) error) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			f, err := ParseFilter(r.URL.Query())
			if err != nil {
				writeJSON(w, http.StatusBadRequest, Error{err.Error()})
				return
			}
			if f.Empty() && r.URL.Query().Get("all") != "true" {
				writeJSON(w, http.StatusBadRequest, Error{name + " of every message: give a filter, or all=true"})
				return
			}
			res := BulkResult{Action: name}
			now := time.Now()
			for after := ""; ; {
				msgs, err := store.List(after, 1000)
				if err != nil {
					writeJSON(w, http.StatusInternalServerError, Error{err.Error()})
					return
				}
				for _, m := range msgs {
					after = m.ID
					if !f.Match(m, now) || name == "hold" && m.Held || name == "release" && !m.Held {
						continue // (counted are the messages changed, as postsuper -H says)
					}
					err := fn(m.ID)
					switch {
					case errors.Is(err, ErrHeld):
						continue // a bulk flush leaves held mail alone
					case err != nil && !errors.Is(err, mta.ErrNotFound):
						res.Failed++
						continue
					}
					res.Matched++
				}
				if len(msgs) < 1000 {
					break
				}
			}
			writeJSON(w, http.StatusOK, res)
		}
	}
	mux.HandleFunc("GET /api/v1/queue/shape", func(w http.ResponseWriter, r *http.Request) {
		top := 20
		if v := r.URL.Query().Get("top"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 1000 {
				writeJSON(w, http.StatusBadRequest, Error{"top must be 1 to 1000"})
				return
			}
			top = n
		}
		f, err := ParseFilter(r.URL.Query())
		if err != nil {
			writeJSON(w, http.StatusBadRequest, Error{err.Error()})
			return
		}
		sh, err := shapeOf(store, f, top, nil)
		if err != nil {
			writeJSON(w, http.StatusInternalServerError, Error{err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, sh)
	})
	mux.HandleFunc("POST /api/v1/reload", func(w http.ResponseWriter, r *http.Request) {
		if err := store.Reload(); err != nil {
			writeJSON(w, http.StatusUnprocessableEntity, Error{err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, Result{Action: "reload"})
	})
	mux.HandleFunc("GET /api/v1/suspensions", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, store.Suspensions())
	})
	mux.HandleFunc("POST /api/v1/destinations/{domain}/suspend", func(w http.ResponseWriter, r *http.Request) {
		domain, ok := mta.NormalizeDomain(r.PathValue("domain"))
		if !ok {
			writeJSON(w, http.StatusBadRequest, Error{"not a domain: " + r.PathValue("domain")})
			return
		}
		var d time.Duration
		if v := r.URL.Query().Get("for"); v != "" {
			var err error
			if d, err = time.ParseDuration(v); err != nil || d <= 0 {
				writeJSON(w, http.StatusBadRequest, Error{"for: not a positive duration (such as 2h): " + v})
				return
			}
		}
		store.Suspend(domain, d)
		writeJSON(w, http.StatusOK, Result{ID: domain, Action: "suspend"})
	})
	mux.HandleFunc("POST /api/v1/destinations/{domain}/resume", func(w http.ResponseWriter, r *http.Request) {
		domain, _ := mta.NormalizeDomain(r.PathValue("domain"))
		if err := store.Resume(domain); err != nil {
			if errors.Is(err, mta.ErrNotFound) {
				writeJSON(w, http.StatusNotFound, Error{domain + " is not suspended"})
				return
			}
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, Result{ID: domain, Action: "resume"})
	})
	mux.HandleFunc("GET /api/v1/destinations", func(w http.ResponseWriter, r *http.Request) {
		d := store.Destinations()
		if d == nil {
			d = []Destination{}
		}
		writeJSON(w, http.StatusOK, d)
	})
	mux.HandleFunc("POST /api/v1/queue/hold", bulk("hold", store.Hold))
	mux.HandleFunc("POST /api/v1/queue/release", bulk("release", store.Release))
	mux.HandleFunc("POST /api/v1/queue/bounce", bulk("bounce", store.Bounce))
	mux.HandleFunc("DELETE /api/v1/queue", bulk("remove", store.Remove))
	mux.HandleFunc("GET /api/v1/queue/{id}", withID(func(w http.ResponseWriter, id string) {
		m, err := store.Get(id)
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, fromSpool(m))
	}))
	action := func(name string, fn func(string) error) http.HandlerFunc {
		return withID(func(w http.ResponseWriter, id string) {
			if err := fn(id); err != nil {
				writeError(w, err)
				return
			}
			writeJSON(w, http.StatusOK, Result{ID: id, Action: name})
		})
	}
	mux.HandleFunc("POST /api/v1/queue/{id}/hold", action("hold", store.Hold))
	mux.HandleFunc("POST /api/v1/queue/{id}/release", action("release", store.Release))
	mux.HandleFunc("DELETE /api/v1/queue/{id}", action("remove", store.Remove))
	mux.HandleFunc("POST /api/v1/queue/{id}/bounce", action("bounce", store.Bounce))
	flushOne := action("flush", store.FlushMessage)
	mux.HandleFunc("POST /api/v1/queue/{id}/flush", func(w http.ResponseWriter, r *http.Request) {
		// A flush that will be refused (no such message, a held one)
		// changes nothing, the backoffs included.
		if m, err := store.Get(r.PathValue("id")); err == nil && !m.Held {
			store.EndBackoffs()
		}
		flushOne(w, r)
	})
	flushSome := bulk("flush", store.FlushMessage)
	mux.HandleFunc("POST /api/v1/queue/flush", func(w http.ResponseWriter, r *http.Request) {
		// With a filter: the messages it selects, as the other bulk
		// actions; without: every deferred message, in one pass over the
		// due index.
		if f, err := ParseFilter(r.URL.Query()); err != nil || !f.Empty() {
			if err == nil { // a refused filter changes nothing, backoffs included
				store.EndBackoffs()
			}
			flushSome(w, r)
			return
		}
		n, err := store.Flush()
		if err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, Result{Action: "flush", Rescheduled: n})
	})
	return Guard(token, mux)
}

// Guard protects an operator endpoint (the admin API, pprof). With a
// non-empty token every request must carry "Authorization: Bearer <token>"
// (401 otherwise). Whatever the token, the Host header must be an IP
// address or localhost, so that a web page cannot reach the API through
// DNS rebinding (421 otherwise); and a request that changes something
// (any method but GET and HEAD) must say Content-Type: application/json
// and come from no foreign Origin, which a cross-site form or fetch
// cannot fake without a CORS preflight that is never granted (415, 403).
func Guard(token string, next http.Handler) http.Handler {
	want := []byte(token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !localHost(r.Host) {
			writeJSON(w, http.StatusMisdirectedRequest, Error{"Host must be an IP address or localhost"})
			return
		}
		if got, _ := mta.BearerToken(r.Header.Get("Authorization")); token != "" && subtle.ConstantTimeCompare([]byte(got), want) != 1 {
			w.Header().Set("WWW-Authenticate", "Bearer")
			writeJSON(w, http.StatusUnauthorized, Error{"admin API token missing or wrong (--admin-token, $MTA_ADMIN_TOKEN)"})
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			if ct, _, _ := strings.Cut(r.Header.Get("Content-Type"), ";"); !strings.EqualFold(strings.TrimSpace(ct), "application/json") {
				writeJSON(w, http.StatusUnsupportedMediaType, Error{"requests that change the queue must have Content-Type: application/json"})
				return
			}
			if o := r.Header.Get("Origin"); o != "" && o != "http://"+r.Host && o != "https://"+r.Host {
				writeJSON(w, http.StatusForbidden, Error{"cross-origin requests are not allowed"})
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// localHost reports whether a Host header names an IP address or
// localhost, with or without a port.
func localHost(host string) bool {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if strings.EqualFold(host, "localhost") {
		return true
	}
	_, err := netip.ParseAddr(host)
	return err == nil
}

func withID(fn func(http.ResponseWriter, string)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		if !spool.ValidID(id) {
			writeJSON(w, http.StatusBadRequest, Error{fmt.Sprintf("%q is not a queue ID", id)})
			return
		}
		fn(w, id)
	}
}

// ErrHeld refuses to flush a held message: it is not tried until released.
var ErrHeld = errors.New("the message is held: release it to deliver it")

func writeError(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, mta.ErrNotFound):
		writeJSON(w, http.StatusNotFound, Error{err.Error()})
		return
	case errors.Is(err, ErrHeld):
		writeJSON(w, http.StatusConflict, Error{err.Error()})
		return
	}
	writeJSON(w, http.StatusInternalServerError, Error{err.Error()})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
