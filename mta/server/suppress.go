package server

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/mta/admin"
	"github.com/mtaproject/mta/mta/smtpd"
	"github.com/mtaproject/mta/scheduler"
	"github.com/mtaproject/mta/spool"
)

// suppressions is the suppression-list policy: who a recipient's mail
// belongs to, which refusals put it on the list, and the reply for one
// that is on it. docs/suppression.md.
type suppressions struct {
	sp      *spool.Spool
	tenants tenantSet
	codes   []string // bounce_codes
	log     *zap.Logger
}

// tenant is the list a message's submitter uses: an API tenant's own, or
// the default one.
func (s *suppressions) tenant(authUser string) string { return s.tenants.of(authUser) }

// refuse returns the refusal of a suppressed recipient, or nil. A spool
// error lets the mail through (logged): the list must not stop mail.
func (s *suppressions) refuse(tenant, address string) *mta.Reply {
	if s == nil {
		return nil
	}
	e, err := s.sp.Suppressed(tenant, address)
	if err != nil {
		if !errors.Is(err, mta.ErrNotFound) {
			s.log.Warn("suppression list lookup failed; the recipient is not refused", zap.String("tenant", tenant), zap.Error(err))
		}
		return nil
	}
	return &mta.Reply{Code: 550, Enhanced: mta.Enhanced{5, 7, 1},
		Text: "Recipient " + printableAddress(address) + " is on the suppression list (" + e.Source + " on " + e.Added.UTC().Format("2006-01-02") + ")"}
}

// outcome adds the recipient of a remote permanent failure whose enhanced
// code is one of bounce_codes.
func (s *suppressions) outcome(e scheduler.OutcomeEvent) {
	if s == nil || e.Outcome != "failed" || e.Reply == nil || e.Reply.Local || e.Message == nil || e.Message.From == "" {
		return
	}
	if !s.matches(e.Reply.Enhanced.String()) {
		return
	}
	entry := spool.Suppression{Tenant: s.tenant(e.Message.AuthUser), Address: e.Recipient, Source: "bounce", Reason: e.Reply.Error()}
	if err := s.sp.Suppress(entry); err != nil {
		s.log.Warn("could not add a hard bounce to the suppression list", zap.String("rcpt", e.Recipient), zap.Error(err))
		return
	}
	s.log.Info("recipient suppressed", zap.String("tenant", entry.Tenant), zap.String("rcpt", e.Recipient), zap.String("reason", entry.Reason))
}

func (s *suppressions) matches(code string) bool {
	for _, p := range s.codes {
		if prefix, ok := strings.CutSuffix(p, "*"); ok && strings.HasPrefix(code, prefix) || p == code {
			return true
		}
	}
	return false
}

// printableAddress keeps a reply to one line of printable ASCII.
func printableAddress(a string) string {
	b := []byte(a)
	for i, c := range b {
		if c < 33 || c > 126 {
			b[i] = '?'
		}
	}
	if len(b) > 200 {
		return string(b[:200]) + "..."
	}
	return string(b)
}

// maxSuppressionPage bounds one listing page.
const maxSuppressionPage = 1000

// handler serves the suppression list at /api/v1/suppressions: GET lists
// (?after=, ?limit=), POST adds (?address=, ?reason=), DELETE removes
// (?address=). tenantOf names the list a request may see (an error
// refuses it with 403); source is what an added entry says it came from.
func (s *suppressions) handler(tenantOf func(*http.Request) (string, error), source string) http.Handler {
	mux := http.NewServeMux()
	list := func(w http.ResponseWriter, r *http.Request) (string, bool) {
		tenant, err := tenantOf(r)
		if err != nil {
			writeJSONError(w, http.StatusForbidden, err.Error())
			return "", false
		}
		return tenant, true
	}
	address := func(w http.ResponseWriter, r *http.Request) (string, bool) {
		a := r.URL.Query().Get("address")
		// Checked when added; a removal takes whatever is on the list
		// (bounces add addresses as the remote servers wrote them).
		if bad := a == "" || len(a) > 320; bad || r.Method == http.MethodPost && !suppressibleAddress(a) {
			writeJSONError(w, http.StatusBadRequest, "address: want an email address, got "+strconv.Quote(a))
			return "", false
		}
		return a, true
	}
	mux.HandleFunc("GET /api/v1/suppressions", func(w http.ResponseWriter, r *http.Request) {
		tenant, ok := list(w, r)
		if !ok {
			return
		}
		limit := maxSuppressionPage
		if v := r.URL.Query().Get("limit"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				writeJSONError(w, http.StatusBadRequest, "limit: want a positive number")
				return
			}
			limit = min(n, maxSuppressionPage)
		}
		entries, err := s.sp.Suppressions(tenant, r.URL.Query().Get("after"), limit)
		if err != nil {
			writeJSONError(w, http.StatusBadRequest, err.Error())
			return
		}
		page := admin.SuppressionPage{Suppressions: entries}
		if page.Suppressions == nil {
			page.Suppressions = []spool.Suppression{}
		}
		if len(entries) == limit {
			page.Next = entries[len(entries)-1].Cursor()
		}
		writeJSONBody(w, http.StatusOK, page)
	})
	// entry is the tenant and address an edit names; "" is the default
	// tenant there.
	entry := func(w http.ResponseWriter, r *http.Request) (tenant, addr string, ok bool) {
		if tenant, ok = list(w, r); !ok {
			return "", "", false
		}
		if addr, ok = address(w, r); !ok {
			return "", "", false
		}
		if tenant == "" {
			tenant = defaultTenant
		}
		return tenant, addr, true
	}
	mux.HandleFunc("POST /api/v1/suppressions", func(w http.ResponseWriter, r *http.Request) {
		tenant, a, ok := entry(w, r)
		if !ok {
			return
		}
		e := spool.Suppression{Tenant: tenant, Address: a, Source: source, Reason: r.URL.Query().Get("reason"), Added: time.Now().UTC()}
		if err := s.sp.Suppress(e); err != nil {
			writeJSONError(w, http.StatusInternalServerError, err.Error())
			return
		}
		s.log.Info("recipient suppressed", zap.String("tenant", tenant), zap.String("rcpt", a), zap.String("source", source))
		writeJSONBody(w, http.StatusOK, e)
	})
	mux.HandleFunc("DELETE /api/v1/suppressions", func(w http.ResponseWriter, r *http.Request) {
		tenant, a, ok := entry(w, r)
		if !ok {
			return
		}
		switch err := s.sp.Unsuppress(tenant, a); {
		case errors.Is(err, mta.ErrNotFound):
			writeJSONError(w, http.StatusNotFound, a+" is not on the suppression list of "+tenant)
			return
		case err != nil:
			writeJSONError(w, http.StatusInternalServerError, err.Error())
			return
		}
		s.log.Info("recipient removed from the suppression list", zap.String("tenant", tenant), zap.String("rcpt", a))
		writeJSONBody(w, http.StatusOK, map[string]string{"tenant": tenant, "address": a, "removed": "true"})
	})
	return mux
}

// suppressibleAddress reports whether a is an address the suppression
// list can hold: a local part and a domain name, printable, at most 320
// octets. What could never be a recipient is a typo, refused rather than
// stored where it would never match.
func suppressibleAddress(a string) bool {
	at := strings.LastIndexByte(a, '@')
	if len(a) > 320 || at <= 0 || at == len(a)-1 || strings.ContainsAny(a, "<>") {
		return false
	}
	for _, r := range a {
		if r < 0x20 || r == 0x7f || r == utf8.RuneError || unicode.IsControl(r) {
			return false
		}
	}
	local, domain := a[:at], a[at+1:]
	quoted := len(local) >= 2 && local[0] == '"' && local[len(local)-1] == '"'
	if !quoted && strings.ContainsAny(local, " \t@") {
		return false // a@b@c, "a b" unquoted: only a quoted local part may hold these
	}
	if strings.HasPrefix(domain, "[") && strings.HasSuffix(domain, "]") {
		return true // an address literal
	}
	_, ok := mta.NormalizeDomain(domain)
	return ok
}

func writeJSONBody(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func writeJSONError(w http.ResponseWriter, code int, msg string) {
	writeJSONBody(w, code, map[string]string{"error": msg})
}

// injectionRefusal is how the injection API refuses a recipient, as the
// SMTP edge does at RCPT: an address of a local domain without a mailbox
// (or whose mailbox is full), then the suppression list (refuse, may be
// nil). Nothing is accepted that would only bounce.
func injectionRefusal(localDomains []string, mailboxes smtpd.Mailboxes, refuse func(tenant, rcpt string) *mta.Reply) func(tenant, rcpt string) *mta.Reply {
	local := map[string]bool{}
	for _, d := range localDomains {
		local[strings.ToLower(d)] = true
	}
	return func(tenant, rcpt string) *mta.Reply {
		if mailboxes != nil && local[mta.Domain(rcpt)] {
			if rep := mailboxes.Check(rcpt, 0); rep != nil {
				return rep
			}
		}
		if refuse != nil {
			return refuse(tenant, rcpt)
		}
		return nil
	}
}
