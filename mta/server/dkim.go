package server

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/mta/dkim"
	"github.com/mtaproject/mta/mta/sevenbit"
)

// signing DKIM-signs our users' mail as it is accepted, with the keys in
// force (a reload replaces them).
type signing struct {
	signer  atomic.Pointer[dkim.Signer]
	tenant  map[string]string // API tenant → its signing domain, for From domains without a key
	tenants tenantSet
	limited map[string]bool // API tenants with from_domains
	// maySend is the users file's sender list check (nil: none).
	maySend func(user, from string) bool
	results *prometheus.CounterVec
	log     *zap.Logger
}

func newSigning(reg prometheus.Registerer, sg *dkim.Signer, log *zap.Logger) *signing {
	s := &signing{log: log, results: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mta_dkim_signatures_total",
		Help: "Accepted messages of our users by DKIM signing result (signed, no_key, failed).",
	}, []string{"result"})}
	for _, r := range []string{"signed", "no_key", "failed"} {
		s.results.WithLabelValues(r)
	}
	reg.MustRegister(s.results)
	s.signer.Store(sg)
	return s
}

// sign returns the message to store: header with a DKIM-Signature field
// in front when a key applies. Mail that is not our users' is returned as
// it is. An 8-bit message is made 7-bit first when it can be (RFC 6376
// §5.3), so that no relay's conversion breaks the signature. A signing
// failure leaves the message unsigned, logged and counted: mail is never
// refused for it.
func (s *signing) sign(id string, env *mta.Envelope, header, body []byte) ([]byte, []byte) {
	if s == nil || !env.Submitted {
		return header, body
	}
	sg := s.signer.Load()
	if sg.Empty() {
		return header, body
	}
	// Our SMTP users are signed for their From domain, as a relay signs
	// what its trusted networks and AUTH users send; an AUTH user with a
	// sender list (the users file) only for a From address the list
	// allows, so that one customer cannot get DMARC-passing mail in
	// another's name. An API tenant only for the domains it is limited to
	// (api.tenants from_domains, which the API enforces): one without a
	// list must not get signatures for others' domains.
	tenant := s.tenants.of(env.AuthUser)
	var byFrom func(string) bool
	switch {
	case s.limited[tenant]:
		byFrom = func(string) bool { return true }
	case tenant == defaultTenant && env.AuthUser != "" && s.maySend != nil:
		user := env.AuthUser
		byFrom = func(from string) bool { return s.maySend(user, from) }
	case tenant == defaultTenant:
		byFrom = func(string) bool { return true }
	}
	fallback := s.tenant[tenant]
	sig, err := sg.SignWith(header, body, byFrom, fallback)
	if err == nil && sig != "" && sevenbit.Needed(body) {
		if conv, cerr := sevenbit.Convert(body); cerr == nil {
			body = conv
			env.Body8Bit = false
			sig, err = sg.SignWith(header, body, byFrom, fallback)
		}
	}
	switch {
	case err != nil:
		s.results.WithLabelValues("failed").Inc()
		s.log.Warn("DKIM signing failed; the message goes unsigned", zap.String("id", id), zap.Error(err))
		return header, body
	case sig == "":
		s.results.WithLabelValues("no_key").Inc()
		return header, body
	}
	s.results.WithLabelValues("signed").Inc()
	out := make([]byte, 0, len(sig)+len(header))
	return append(append(out, sig...), header...), body
}
