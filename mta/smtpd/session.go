package smtpd

import (
	"errors"
	"net/netip"
	"runtime/debug"
	"strings"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
)

// session is one SMTP session, from EHLO to QUIT (go-smtp starts a new one
// after STARTTLS). go-smtp calls its methods from the connection's
// goroutine only.
type session struct {
	srv      *Server
	conn     *trackedConn
	ip       netip.Addr
	helo     string
	tls      bool
	trusted  bool
	authUser string
	env      mta.Envelope
	hasFrom  bool
}

// recoverTo turns a panic in a handler into a 451 reply and a metric: no
// panic reaches the client as a dropped connection or a stack trace.
func (s *session) recoverTo(err *error) {
	if r := recover(); r != nil {
		s.srv.opts.Metrics.panics.Inc()
		s.srv.log.Error("panic in SMTP session", zap.Any("panic", r), zap.String("client_ip", s.ip.String()),
			zap.ByteString("stack", debug.Stack()))
		*err = toSMTP(&mta.ReplyInternal)
	}
}

func (s *session) reject(reason string, r *mta.Reply) error {
	s.srv.opts.Metrics.rejected.WithLabelValues(s.srv.opts.Name, reason).Inc()
	return toSMTP(r)
}

// mayRelay reports whether the client may send to any domain.
func (s *session) mayRelay() bool { return s.trusted || s.authUser != "" }

func (s *session) Mail(from string, opts *smtp.MailOptions) (err error) {
	defer s.recoverTo(&err)
	if s.hasFrom {
		return s.reject("bad_sequence", &mta.ReplyNestedMail)
	}
	if s.srv.opts.Submission && s.authUser == "" {
		return s.reject("auth_required", &mta.ReplyAuthRequired)
	}
	size := int64(0)
	if opts != nil {
		size = opts.Size
	}
	if err := s.srv.opts.Spool.Room(size); err != nil {
		if errors.Is(err, mta.ErrStorageFull) {
			return s.reject("storage_full", &mta.ReplyDiskFull)
		}
		return s.reject("spool_error", &mta.ReplySpoolError)
	}
	s.env = mta.Envelope{From: from, ClientIP: s.ip.String(), HELO: s.helo, AuthUser: s.authUser}
	if opts != nil {
		s.env.EnvID = opts.EnvelopeID
		s.env.Ret = mta.Return(opts.Return)
		s.env.SMTPUTF8 = opts.UTF8
		s.env.Body8Bit = opts.Body == smtp.Body8BitMIME
	}
	s.hasFrom = true
	s.conn.busy.Store(true)
	return nil
}

func (s *session) Rcpt(to string, opts *smtp.RcptOptions) (err error) {
	defer s.recoverTo(&err)
	domain := mta.Domain(to)
	if domain == "" { // go-smtp's parser already refuses most of these

		return s.reject("bad_recipient", mta.ReplyBadRecipient.With("Recipient address must be fully qualified"))
	}
	if domain != "" && !s.mayRelay() && !s.srv.local[domain] {
		return s.reject("relay_denied", &mta.ReplyRelayDenied)
	}
	if len(s.env.Recipients) >= s.srv.opts.MaxRecipients {
		return s.reject("too_many_recipients", &mta.ReplyTooManyRecipients)
	}
	r := mta.Recipient{Address: to}
	if opts != nil {
		for _, n := range opts.Notify {
			switch n {
			case smtp.DSNNotifyNever:
				r.Notify |= mta.NotifyNever
			case smtp.DSNNotifySuccess:
				r.Notify |= mta.NotifySuccess
			case smtp.DSNNotifyFailure:
				r.Notify |= mta.NotifyFailure
			case smtp.DSNNotifyDelayed:
				r.Notify |= mta.NotifyDelay
			}
		}
		if opts.OriginalRecipient != "" {
			r.ORcptType = string(opts.OriginalRecipientType)
			r.ORcpt = opts.OriginalRecipient
		}
	}
	s.env.Recipients = append(s.env.Recipients, r)
	return nil
}

func (s *session) Reset() {
	s.env = mta.Envelope{}
	s.hasFrom = false
	s.conn.busy.Store(false)
}

func (s *session) Logout() error {
	s.conn.busy.Store(false)
	return nil
}

// authAllowed: AUTH only over TLS, or from loopback where nobody can listen.
func (s *session) authAllowed() bool {
	return s.srv.opts.Auth != nil && (s.tls || s.srv.opts.CleartextAuthFromLoopback && s.ip.IsLoopback())
}

func (s *session) AuthMechanisms() []string {
	if !s.authAllowed() {
		return nil
	}
	return []string{sasl.Plain, sasl.Login}
}

func (s *session) Auth(mech string) (sasl.Server, error) {
	if s.srv.opts.Auth == nil {
		return nil, smtp.ErrAuthUnsupported
	}
	if !s.authAllowed() {
		return nil, toSMTP(&mta.ReplyEncryptionRequired)
	}
	check := func(identity, user, pass string) error {
		if identity != "" && identity != user {
			s.srv.opts.Metrics.auth.WithLabelValues("failure").Inc()
			return smtp.ErrAuthFailed
		}
		if !s.srv.opts.Auth.Authenticate(user, pass) {
			s.srv.opts.Metrics.auth.WithLabelValues("failure").Inc()
			s.srv.log.Info("authentication failed", zap.String("client_ip", s.ip.String()), zap.String("user", user))
			time.Sleep(s.srv.opts.AuthFailureDelay)
			return smtp.ErrAuthFailed
		}
		s.srv.opts.Metrics.auth.WithLabelValues("success").Inc()
		s.authUser = user
		return nil
	}
	switch strings.ToUpper(mech) {
	case sasl.Plain:
		return sasl.NewPlainServer(check), nil
	case sasl.Login:
		return &loginServer{check: check}, nil
	}
	return nil, smtp.ErrAuthUnknownMechanism
}

// loginServer is the server side of the LOGIN mechanism
// (draft-murchison-sasl-login): it asks for the user name, then the
// password, and accepts an initial response as the user name.
type loginServer struct {
	check func(identity, user, pass string) error
	user  string
	step  int
}

func (l *loginServer) Next(response []byte) ([]byte, bool, error) {
	switch l.step {
	case 0:
		l.step = 1
		if response == nil {
			return []byte("Username:"), false, nil
		}
		l.user, l.step = string(response), 2
		return []byte("Password:"), false, nil
	case 1:
		l.user, l.step = string(response), 2
		return []byte("Password:"), false, nil
	case 2:
		l.step = 3
		return nil, true, l.check("", l.user, string(response))
	}
	return nil, true, sasl.ErrUnexpectedClientResponse
}
