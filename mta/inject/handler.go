package inject

import (
	"bytes"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"mime"
	"net"
	"net/http"
	"net/mail"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
)

// AuthPrefix marks a message's AuthUser as an API tenant's ("api:shop"):
// a users-file name cannot hold a colon, so no SMTP user can pass for a
// tenant.
const AuthPrefix = "api:"

// Tenant is one application allowed to inject.
type Tenant struct {
	Name  string
	Token string // its bearer token
	// FromDomains are the domains its envelope sender and From: may use;
	// empty: any.
	FromDomains []string
}

// Message is one rendered message for the store.
type Message struct {
	ID           string
	Env          *mta.Envelope
	Header, Body []byte
	VERP         bool // its return path is a VERP address: keep what matches a later bounce
}

// Store keeps accepted messages.
type Store interface {
	NewID() string
	// AcceptAll stores the messages durably, all or none, and hands them
	// to delivery; mta.ErrStorageFull means no room.
	AcceptAll(msgs []Message) error
}

// Options configure the handler.
type Options struct {
	Hostname       string
	Tenants        []Tenant
	MaxRequestSize int64 // bytes of one request body
	MaxRecipients  int   // recipients of one request
	MaxMessageSize int64 // bytes of one rendered message (smtp.max_message_size)
	Store          Store
	// Memory bounds the bytes held by requests being handled, shared with
	// SMTP: a request past it gets 503; nil: unbounded.
	Memory *mta.Budget
	// Refuse, when set, may refuse a recipient of a tenant (the
	// suppression list) with the reply it gives; nil: none refused.
	Refuse func(tenant, address string) *mta.Reply
	// ReturnPath, when set, is the VERP return path of message id to
	// rcpt; nil: requests may not ask for one.
	ReturnPath func(id, rcpt string) string
	// OnAccepted is told of every message stored (the accounting log).
	OnAccepted func(id string, env *mta.Envelope, size int)
	// Registerer, when set, gets the API's metrics: requests by tenant and
	// reply code, messages accepted by tenant.
	Registerer prometheus.Registerer
	Logger     *zap.Logger
	Now        func() time.Time
}

// Result is the reply to an injection.
type Result struct {
	Accepted   int               `json:"accepted"`
	Rejected   int               `json:"rejected"`
	Recipients []RecipientResult `json:"recipients"`
}

// RecipientResult is one recipient's outcome, in the order given: its
// queue ID, or why it was refused.
type RecipientResult struct {
	Email string      `json:"email"`
	ID    string      `json:"id,omitempty"`
	Error *ReplyError `json:"error,omitempty"`
}

// ReplyError is a refusal in SMTP terms, so that an application handles
// both injection paths alike.
type ReplyError struct {
	Code     int    `json:"code"`
	Enhanced string `json:"enhanced"`
	Text     string `json:"text"`
}

// ErrorBody is the body of a refused request.
type ErrorBody struct {
	Error string `json:"error"`
}

// batchBytes and batchMessages bound one spool batch: large requests are
// stored in several, each one sync.
const (
	batchBytes    = 16 << 20
	batchMessages = 1000
)

// Handler serves POST /api/v1/messages.
func Handler(opts Options) http.Handler {
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	h := &handler{opts: opts,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mta_api_requests_total",
			Help: "Injection API requests by tenant (unknown: no valid token) and HTTP reply code."}, []string{"tenant", "code"}),
		accepted: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mta_api_messages_accepted_total",
			Help: "Messages stored through the injection API (one per recipient), by tenant."}, []string{"tenant"})}
	for _, tn := range opts.Tenants { // known label values exist from the start
		h.requests.WithLabelValues(tn.Name, "200")
		h.accepted.WithLabelValues(tn.Name)
	}
	h.requests.WithLabelValues("unknown", "401")
	if opts.Registerer != nil {
		opts.Registerer.MustRegister(h.requests, h.accepted)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /api/v1/messages", h.counted(h.inject))
	mux.HandleFunc("/api/v1/messages", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Allow", "POST")
		writeJSON(w, http.StatusMethodNotAllowed, ErrorBody{"use POST"})
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, ErrorBody{"not found: the injection API is POST /api/v1/messages"})
	})
	return mux
}

type handler struct {
	opts               Options
	requests, accepted *prometheus.CounterVec
}

// statusWriter remembers the reply code written.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	w.code = code
	w.ResponseWriter.WriteHeader(code)
}

// counted counts each request by tenant and reply code, and logs the
// refusals an operator should see: a wrong token (someone guessing, or an
// application with an old one) and a tenant sending as someone else.
func (h *handler) counted(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		sw := &statusWriter{ResponseWriter: w, code: http.StatusOK}
		next(sw, r)
		tenant := "unknown"
		if t := h.tenant(r); t != nil {
			tenant = t.Name
		}
		h.requests.WithLabelValues(tenant, strconv.Itoa(sw.code)).Inc()
		if sw.code == http.StatusUnauthorized || sw.code == http.StatusForbidden {
			h.opts.Logger.Info("injection refused", zap.Int("code", sw.code), zap.String("tenant", tenant), zap.String("client_ip", clientIP(r)))
		}
	}
}

// tenant returns the tenant whose token the request carries.
func (h *handler) tenant(r *http.Request) *Tenant { return Authenticate(h.opts.Tenants, r) }

// Authenticate returns the tenant whose bearer token r carries, or nil.
func Authenticate(tenants []Tenant, r *http.Request) *Tenant {
	token, ok := mta.BearerToken(r.Header.Get("Authorization"))
	if !ok {
		return nil
	}
	var found *Tenant
	for i := range tenants {
		// Every token is compared, in constant time: the answer's timing
		// says nothing about which one, or how much of one, matched.
		if subtle.ConstantTimeCompare([]byte(token), []byte(tenants[i].Token)) == 1 {
			found = &tenants[i]
		}
	}
	return found
}

// errBudgetSpent: the memory budget had no room for more of a request.
var errBudgetSpent = errors.New("memory budget spent")

// chargedReader charges what it reads to a memory budget (nil: none),
// as it reads it, until release.
type chargedReader struct {
	r      io.Reader
	budget *mta.Budget
	held   int64
}

func (c *chargedReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if c.budget != nil && n > 0 {
		if !c.budget.TryAcquire(int64(n)) {
			return n, errBudgetSpent
		}
		c.held += int64(n)
	}
	return n, err
}

func (c *chargedReader) release() {
	if c.budget != nil {
		c.budget.Release(c.held)
	}
	c.held = 0
}

// Unauthorized answers a request without a known token.
func Unauthorized(w http.ResponseWriter) {
	w.Header().Set("WWW-Authenticate", `Bearer realm="mta injection API"`)
	writeJSON(w, http.StatusUnauthorized, ErrorBody{"missing or unknown bearer token"})
}

func (h *handler) inject(w http.ResponseWriter, r *http.Request) {
	t := h.tenant(r)
	if t == nil {
		Unauthorized(w)
		return
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" { // any case, parameters allowed
		writeJSON(w, http.StatusUnsupportedMediaType, ErrorBody{"Content-Type must be application/json"})
		return
	}
	tooBig := func() {
		writeJSON(w, http.StatusRequestEntityTooLarge, ErrorBody{fmt.Sprintf("request body over %d bytes (api.max_request_size)", h.opts.MaxRequestSize)})
	}
	if r.ContentLength > h.opts.MaxRequestSize {
		tooBig() // at once, without waiting for a body that will not be taken
		return
	}
	// The request body is charged to the memory budget as its bytes
	// arrive, not by what it says it will be: a client that announces a
	// large body and sends it slowly, or never, holds only what it sent.
	// Each rendered message is charged as it is made (run).
	charged := &chargedReader{r: http.MaxBytesReader(w, r.Body, h.opts.MaxRequestSize), budget: h.opts.Memory}
	defer charged.release()
	body, err := io.ReadAll(charged)
	if err != nil {
		var over *http.MaxBytesError
		switch {
		case errors.As(err, &over):
			tooBig()
		case errors.Is(err, errBudgetSpent):
			w.Header().Set("Retry-After", "5")
			writeJSON(w, http.StatusServiceUnavailable, ErrorBody{"busy: the memory budget for messages in flight is used up; try again shortly"})
		default:
			writeJSON(w, http.StatusBadRequest, ErrorBody{"reading the request: " + err.Error()})
		}
		return
	}
	req, err := decode(body)
	if err != nil {
		writeJSON(w, http.StatusBadRequest, ErrorBody{err.Error()})
		return
	}
	body = nil
	plan, status, err := h.prepare(t, req)
	if err != nil {
		writeJSON(w, status, ErrorBody{err.Error()})
		return
	}
	res := h.run(t, plan, clientIP(r))
	h.accepted.WithLabelValues(t.Name).Add(float64(res.Accepted))
	status = http.StatusOK
	if res.Accepted == 0 {
		status = http.StatusUnprocessableEntity
		if plan.storageFull {
			w.Header().Set("Retry-After", "60")
			status = http.StatusServiceUnavailable
		}
	}
	writeJSON(w, status, res)
}

// plan is a checked request.
type plan struct {
	req         *Request
	from        string // envelope sender
	raw         []byte // Content, with CRLF line endings; nil with a builder
	rawID       string // its Message-ID; "": each copy gets one
	rawDate     bool   // it has a Date field
	built       *compiled
	priority    mta.Priority
	meta        []map[string]string // each recipient's metadata, the request's merged in
	storageFull bool
}

// prepare checks a request as a whole; its error refuses all of it, with
// the status to answer.
func (h *handler) prepare(t *Tenant, req *Request) (*plan, int, error) {
	p := &plan{req: req}
	switch n := len(req.Recipients); {
	case n == 0:
		return nil, http.StatusBadRequest, errors.New("recipients: at least one is needed")
	case n > h.opts.MaxRecipients:
		return nil, http.StatusRequestEntityTooLarge, fmt.Errorf("recipients: %d, over the limit of %d per request (api.max_recipients)", n, h.opts.MaxRecipients)
	}
	switch req.Priority {
	case "", "bulk":
		p.priority = mta.PriorityBulk
	case "transactional":
		p.priority = mta.PriorityTransactional
	default:
		return nil, http.StatusBadRequest, fmt.Errorf("priority: want transactional or bulk, got %q", req.Priority)
	}
	if err := checkMetadata("metadata", req.Metadata); err != nil {
		return nil, http.StatusBadRequest, err
	}
	if err := checkData("substitutions", req.Substitutions); err != nil {
		return nil, http.StatusBadRequest, err
	}
	p.meta = make([]map[string]string, len(req.Recipients))
	for i, r := range req.Recipients {
		if err := checkData(fmt.Sprintf("recipients[%d].substitutions", i), r.Substitutions); err != nil {
			return nil, http.StatusBadRequest, err
		}
		p.meta[i] = metadata(req.Metadata, r.Metadata)
		if err := checkMetadata(fmt.Sprintf("recipients[%d].metadata", i), p.meta[i]); err != nil {
			return nil, http.StatusBadRequest, err
		}
	}
	var headerFrom string
	switch {
	case (req.Content == "") == (req.Message == nil):
		return nil, http.StatusBadRequest, errors.New("give exactly one of content (a whole message) and message (its parts)")
	case req.Message != nil:
		c, err := compile(req.Message)
		if err != nil {
			return nil, http.StatusBadRequest, err
		}
		p.built, headerFrom = c, c.from.Address
	default:
		p.raw = crlf(req.Content)
		m, err := mail.ReadMessage(bytes.NewReader(p.raw))
		if err != nil {
			return nil, http.StatusBadRequest, fmt.Errorf("content: not an RFC 5322 message: %v", err)
		}
		if int64(len(p.raw)) > h.opts.MaxMessageSize {
			return nil, http.StatusRequestEntityTooLarge, fmt.Errorf("content: %d bytes, over the message size limit of %d", len(p.raw), h.opts.MaxMessageSize)
		}
		froms := mta.HeaderValues(m.Header, "From") // "From :" too
		if n := len(froms); n != 1 {
			return nil, http.StatusBadRequest, fmt.Errorf("content: %d From fields, want exactly one (RFC 5322 §3.6)", n)
		}
		if f, err := mta.ParseAddressField(froms[0]); err == nil {
			headerFrom = f.Address
		} else {
			return nil, http.StatusBadRequest, fmt.Errorf("content: the From field: %v", err)
		}
		p.rawID = strings.TrimSpace(m.Header.Get("Message-Id"))
		p.rawDate = m.Header.Get("Date") != ""
	}
	if req.VERP && h.opts.ReturnPath == nil {
		return nil, http.StatusBadRequest, errors.New("verp: this server has no bounces.domain for VERP return paths")
	}
	if req.VERP && req.EnvelopeFrom != "" {
		return nil, http.StatusBadRequest, errors.New("give envelope_from or verp, not both")
	}
	p.from = req.EnvelopeFrom
	if p.from == "" {
		p.from = headerFrom
	} else if a, err := mail.ParseAddress(p.from); err != nil || a.Address != p.from {
		return nil, http.StatusBadRequest, fmt.Errorf("envelope_from: %q is not a bare address", p.from)
	}
	if !isASCII([]byte(p.from)) {
		return nil, http.StatusBadRequest, fmt.Errorf("the sender %q is not ASCII: the injection API does not send SMTPUTF8 mail", p.from)
	}
	for _, a := range []struct{ field, addr string }{{"envelope_from", p.from}, {"from", headerFrom}} {
		if !t.mayUse(a.addr) {
			return nil, http.StatusForbidden, fmt.Errorf("%s: tenant %s may not send from %s", a.field, t.Name, mta.Domain(a.addr))
		}
	}
	return p, 0, nil
}

// mayUse reports whether the tenant may send from address.
func (t *Tenant) mayUse(address string) bool {
	if len(t.FromDomains) == 0 {
		return true
	}
	d := mta.Domain(address)
	for _, ok := range t.FromDomains {
		if strings.EqualFold(d, ok) {
			return true
		}
	}
	return false
}

// Replies for recipients refused one by one.
var (
	replyBadAddress = mta.Reply{Code: 550, Enhanced: mta.Enhanced{5, 1, 3}, Text: "Bad recipient address syntax"}
	replyNonASCII   = mta.Reply{Code: 553, Enhanced: mta.Enhanced{5, 6, 7}, Text: "Non-ASCII addresses are not supported by the injection API"}
)

// run renders and stores a message per recipient.
func (h *handler) run(t *Tenant, p *plan, client string) *Result {
	res := &Result{Recipients: make([]RecipientResult, len(p.req.Recipients))}
	var batch []Message
	var batchIdx []int
	size := 0
	flush := func() {
		if len(batch) == 0 {
			return
		}
		err := h.opts.Store.AcceptAll(batch)
		if h.opts.Memory != nil {
			h.opts.Memory.Release(int64(size))
		}
		for i, m := range batch {
			rr := &res.Recipients[batchIdx[i]]
			if err != nil {
				reply := &mta.ReplySpoolError
				if errors.Is(err, mta.ErrStorageFull) {
					reply, p.storageFull = &mta.ReplyDiskFull, true
				}
				rr.Error = replyError(reply)
				continue
			}
			rr.ID = m.ID
			if h.opts.OnAccepted != nil {
				h.opts.OnAccepted(m.ID, m.Env, len(m.Header)+len(m.Body))
			}
		}
		if err != nil {
			h.opts.Logger.Error("injected messages not stored", zap.String("tenant", t.Name), zap.Int("messages", len(batch)), zap.Error(err))
		}
		batch, batchIdx, size = batch[:0], batchIdx[:0], 0
	}
	now := h.opts.Now()
	for i, rcpt := range p.req.Recipients {
		rr := &res.Recipients[i]
		rr.Email = rcpt.Email
		m, reply := h.message(t, p, i, client, now)
		if reply != nil {
			rr.Error = replyError(reply)
			continue
		}
		if n := int64(len(m.Header) + len(m.Body)); h.opts.Memory != nil && !h.opts.Memory.TryAcquire(n) {
			flush() // gives the batch's bytes back
			if !h.opts.Memory.TryAcquire(n) {
				rr.Error = replyError(&mta.ReplyNoMemory)
				continue
			}
		}
		batch = append(batch, *m)
		batchIdx = append(batchIdx, i)
		if size += len(m.Header) + len(m.Body); size >= batchBytes || len(batch) >= batchMessages {
			flush()
		}
	}
	flush()
	for _, rr := range res.Recipients {
		if rr.Error != nil {
			res.Rejected++
		} else {
			res.Accepted++
		}
	}
	h.opts.Logger.Info("messages injected", zap.String("tenant", t.Name), zap.String("client_ip", client),
		zap.String("from", p.from), zap.Int("accepted", res.Accepted), zap.Int("rejected", res.Rejected))
	return res
}

// message renders the message for one recipient, or says why not.
func (h *handler) message(t *Tenant, p *plan, i int, client string, now time.Time) (*Message, *mta.Reply) {
	rcpt := p.req.Recipients[i]
	if !isASCII([]byte(rcpt.Email)) {
		return nil, &replyNonASCII
	}
	to, err := mail.ParseAddress(rcpt.Email)
	if err != nil || to.Address != rcpt.Email || strings.ContainsAny(rcpt.Email, " \t\r\n<>") {
		return nil, &replyBadAddress
	}
	if _, ok := mta.NormalizeDomain(mta.Domain(rcpt.Email)); !ok {
		return nil, &replyBadAddress
	}
	if h.opts.Refuse != nil {
		if reply := h.opts.Refuse(t.Name, rcpt.Email); reply != nil {
			return nil, reply
		}
	}
	id := h.opts.Store.NewID()
	messageID := "<" + id + "@" + h.opts.Hostname + ">"
	body := p.raw
	if p.built != nil {
		to.Name = rcpt.Name
		body, err = p.built.render(to, templateData(p.req.Substitutions, rcpt.Substitutions, rcpt), messageID, now, int(h.opts.MaxMessageSize))
		var re *renderError
		switch {
		case errors.Is(err, errTooBig):
			return nil, &mta.ReplyMessageTooBig
		case errors.As(err, &re):
			return nil, &mta.Reply{Code: 554, Enhanced: mta.Enhanced{5, 6, 0}, Text: "Template: " + re.Error()}
		case err != nil:
			return nil, &mta.ReplySpoolError
		}
	} else if p.rawID != "" {
		messageID = p.rawID
	}
	from := p.from
	if p.req.VERP {
		from = h.opts.ReturnPath(id, rcpt.Email)
	}
	env := &mta.Envelope{
		From:       from,
		Recipients: []mta.Recipient{{Address: rcpt.Email}},
		Body8Bit:   !isASCII(body),
		ClientIP:   client,
		AuthUser:   AuthPrefix + t.Name,
		MessageID:  messageID,
		Received:   now,
		Priority:   p.priority,
		Submitted:  true,
		Metadata:   p.meta[i],
	}
	hdr := fmt.Appendf(nil, "Received: from %s (HTTP injection API, tenant %s)\r\n\tby %s (mta) with HTTP id %s\r\n\tfor <%s>; %s\r\n",
		client, t.Name, h.opts.Hostname, id, rcpt.Email, now.Format(time.RFC1123Z))
	if p.raw != nil {
		// What a submission server adds (RFC 6409 §8): providers refuse
		// mail without them.
		if !p.rawDate {
			hdr = fmt.Appendf(hdr, "Date: %s\r\n", now.Format(time.RFC1123Z))
		}
		if p.rawID == "" {
			hdr = fmt.Appendf(hdr, "Message-ID: %s\r\n", messageID)
		}
	}
	return &Message{ID: id, Env: env, Header: hdr, Body: body, VERP: p.req.VERP}, nil
}

// metadata merges the request's metadata and a recipient's (which wins).
func metadata(global, own map[string]string) map[string]string {
	if len(global)+len(own) == 0 {
		return nil
	}
	out := make(map[string]string, len(global)+len(own))
	maps.Copy(out, global)
	maps.Copy(out, own)
	return out
}

// maxListItems bounds a list or object in the substitutions: with one
// level of {{range}}, a recipient's rendering then costs at most this
// many steps per range.
const maxListItems = 1000

// checkData refuses substitutions whose lists or objects are longer than
// maxListItems, at any depth.
func checkData(field string, v any) error {
	return checkDataAt(field, v, 0)
}

// maxDataDepth bounds how deep substitutions nest: a template reads a few
// levels; thousands would cost memory in proportion to their square here.
const maxDataDepth = 16

func checkDataAt(field string, v any, depth int) error {
	switch v.(type) {
	case map[string]any, []any:
		if depth >= maxDataDepth {
			return fmt.Errorf("%s: nested over %d levels deep", field, maxDataDepth)
		}
	}
	switch v := v.(type) {
	case map[string]any:
		if len(v) > maxListItems {
			return fmt.Errorf("%s: %d entries, over the limit of %d", field, len(v), maxListItems)
		}
		for k, x := range v {
			if err := checkDataAt(field+"."+k, x, depth+1); err != nil {
				return err
			}
		}
	case []any:
		if len(v) > maxListItems {
			return fmt.Errorf("%s: a list of %d items, over the limit of %d", field, len(v), maxListItems)
		}
		for i, x := range v {
			if err := checkDataAt(fmt.Sprintf("%s[%d]", field, i), x, depth+1); err != nil {
				return err
			}
		}
	}
	return nil
}

// maxMetadata bounds the metadata of one message, keys and values.
const maxMetadata = 4096

// checkMetadata refuses metadata that would bloat every event.
func checkMetadata(field string, m map[string]string) error {
	n := 0
	for k, v := range m {
		if k == "" {
			return fmt.Errorf("%s: an empty key", field)
		}
		n += len(k) + len(v)
	}
	if n > maxMetadata {
		return fmt.Errorf("%s: %d bytes of keys and values, over the limit of %d", field, n, maxMetadata)
	}
	return nil
}

func replyError(r *mta.Reply) *ReplyError {
	return &ReplyError{Code: r.Code, Enhanced: r.Enhanced.String(), Text: r.Text}
}

// crlf returns s with every line ending CRLF and a final one.
func crlf(s string) []byte {
	s = strings.ReplaceAll(strings.ReplaceAll(s, "\r\n", "\n"), "\r", "\n")
	if !strings.HasSuffix(s, "\n") {
		s += "\n"
	}
	return []byte(strings.ReplaceAll(s, "\n", "\r\n"))
}

func isASCII(b []byte) bool {
	for _, c := range b {
		if c > 127 {
			return false
		}
	}
	return true
}

func clientIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
