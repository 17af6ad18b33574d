package smtpd

import (
	"bytes"
	"crypto/tls"
	"errors"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
)

// dispatch runs one command line.
func (s *session) dispatch(line []byte) {
	defer s.recoverPanic()
	if len(line) == 0 {
		s.refuse("bad_syntax", &replyBadSyntax)
		return
	}
	if c := line[0]; c < ' ' || c >= 0x7f {
		// A TLS hello, a binary protocol: nothing an SMTP client sends.
		s.refuse("not_smtp", &replyNotSMTP)
		s.closing = true
		return
	}
	for _, c := range line {
		if c < ' ' && c != '\t' || c == 0x7f {
			s.refuse("bad_syntax", &replyBadSyntax)
			return
		}
	}
	verb, arg, _ := bytes.Cut(line, []byte{' '})
	if len(verb) > 8 {
		s.refuse("unknown_command", &replyUnknown)
		return
	}
	var upper [8]byte
	v := upper[:len(verb)]
	for i, c := range verb {
		if c >= 'a' && c <= 'z' {
			c -= 'a' - 'A'
		}
		v[i] = c
	}
	args := string(bytes.TrimSpace(arg))
	switch string(v) {
	case "EHLO":
		s.hello(args, true)
	case "HELO":
		s.hello(args, false)
	case "MAIL":
		s.mail(args)
	case "RCPT":
		s.rcpt(args)
	case "DATA":
		s.data(args)
	case "BDAT":
		s.bdatChunk(args)
	case "RSET":
		if args != "" { // RFC 5321 §4.1.1.5: no parameters
			s.refuse("bad_syntax", &mta.Reply{Code: 501, Enhanced: mta.Enhanced{5, 5, 4}, Text: "Syntax: RSET"})
			return
		}
		s.resetTransaction()
		s.reply(&replyOK)
		s.junkCommand()
	case "NOOP":
		s.reply(&replyOK)
		s.junkCommand()
	case "QUIT":
		s.replyText(221, mta.Enhanced{2, 0, 0}, "Bye")
		s.closing = true
	case "VRFY":
		if args == "" { // RFC 5321 §4.1.1.6: a string to verify
			s.refuse("bad_syntax", &mta.Reply{Code: 501, Enhanced: mta.Enhanced{5, 5, 4}, Text: "Syntax: VRFY address"})
			return
		}
		s.replyText(252, mta.Enhanced{2, 0, 0}, "Cannot VRFY user; try RCPT to attempt delivery")
		s.junkCommand()
	case "HELP":
		s.replyText(214, mta.Enhanced{2, 0, 0}, "See RFC 5321")
		s.junkCommand()
	case "STARTTLS":
		s.startTLS(args)
	case "AUTH":
		s.auth(args)
	case "GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS":
		// Cross-protocol requests, e.g. a browser made to post to us.
		s.refuse("not_smtp", &replyNotSMTP)
		s.closing = true
	case "EXPN", "TURN", "ETRN", "SEND", "SOML", "SAML":
		s.refuse("not_implemented", &replyNotImplemented)
	default:
		s.refuse("unknown_command", &replyUnknown)
	}
}

// hello answers HELO and EHLO. Either resets the transaction (RFC 5321
// §4.1.4).
func (s *session) hello(arg string, esmtp bool) {
	name, _, _ := strings.Cut(arg, " ")
	if name == "" {
		r := &replyHELOSyntax
		if esmtp {
			r = &replyEHLOSyntax
		}
		s.refuse("bad_syntax", r)
		return
	}
	s.resetTransaction()
	s.helo, s.esmtp = asciiName(name), esmtp
	host := s.srv.opts.Hostname
	if !esmtp {
		s.replyText(250, mta.Enhanced{}, host)
		return
	}
	lines := make([]string, 0, 12)
	lines = append(lines, host+" Hello "+sanitizeName(s.helo),
		"PIPELINING",
		"SIZE "+strconv.FormatInt(s.pol.MaxMessageSize, 10),
		"8BITMIME",
		"ENHANCEDSTATUSCODES",
		"CHUNKING")
	if s.srv.opts.TLS != nil && s.tls == nil {
		lines = append(lines, "STARTTLS")
	}
	if s.authAllowed() {
		lines = append(lines, "AUTH PLAIN LOGIN")
	}
	lines = append(lines, "SMTPUTF8", "DSN", "MT-PRIORITY")
	s.replyLines(250, lines)
}

// asciiName is a HELO name as our Received: header and the log carry it:
// ASCII, as a header without SMTPUTF8 must be (RFC 6532), and a HELO comes
// before any SMTPUTF8. An internationalized domain name becomes its
// A-labels; any other character above ASCII (or invalid byte) becomes "_".
func asciiName(name string) string {
	ascii := true
	for i := 0; i < len(name); i++ {
		ascii = ascii && name[i] < 0x80
	}
	if ascii {
		return name
	}
	if d, ok := mta.NormalizeDomain(name); ok && utf8.ValidString(name) {
		return d
	}
	b := make([]byte, 0, len(name))
	for _, r := range name { // an invalid byte is one RuneError
		if r >= utf8.RuneSelf {
			r = '_'
		}
		b = append(b, byte(r))
	}
	return string(b)
}

// sanitizeName keeps a client-given name from breaking a reply line.
func sanitizeName(n string) string {
	if len(n) > 100 {
		n = n[:100]
	}
	return string(appendSanitized(nil, n))
}

// cutKeyword removes "FROM:" or "TO:" (any case, spaces allowed after the
// colon) from the start of arg.
func cutKeyword(arg, kw string) (string, bool) {
	if len(arg) < len(kw) || !strings.EqualFold(arg[:len(kw)], kw) {
		return "", false
	}
	return strings.TrimLeft(arg[len(kw):], " "), true
}

// mail answers MAIL FROM.
func (s *session) mail(arg string) {
	switch {
	case s.helo == "":
		s.refuse("bad_sequence", &replyHELOFirst)
		return
	case s.bdat != nil:
		s.refuse("bad_sequence", &replyInBDAT)
		return
	case s.hasFrom:
		s.refuse("bad_sequence", &mta.ReplyNestedMail)
		return
	case s.srv.opts.Submission && s.authUser == "":
		s.refuse("auth_required", &mta.ReplyAuthRequired)
		return
	}
	rest, ok := cutKeyword(arg, "FROM:")
	if !ok {
		s.refuse("bad_syntax", &mta.Reply{Code: 501, Enhanced: mta.Enhanced{5, 5, 4}, Text: "Syntax: MAIL FROM:<address>"})
		return
	}
	params, ok := s.pathParams(rest)
	if !ok {
		return
	}
	env := mta.Envelope{ClientIP: s.ip.String(), HELO: s.helo, AuthUser: s.authUser}
	var size int64
	for _, p := range params {
		switch p.key {
		case "SIZE":
			if p.value == "" || strings.Trim(p.value, "0123456789") != "" { // digits only (RFC 1870 §6)
				s.refuse("bad_parameter", &replyBadParam)
				return
			}
			n, err := strconv.ParseInt(p.value, 10, 64)
			if err != nil || n > s.pol.MaxMessageSize { // too many digits is too big
				s.refuse("message_too_big", &mta.ReplyMessageTooBig)
				return
			}
			size = n
		case "BODY":
			switch strings.ToUpper(p.value) {
			case "7BIT":
			case "8BITMIME":
				env.Body8Bit = true
			default:
				s.refuse("bad_parameter", &replyBadParam)
				return
			}
		case "SMTPUTF8":
			if !p.bare {
				s.refuse("bad_parameter", &replyBadParam)
				return
			}
			env.SMTPUTF8 = true
		case "RET":
			switch r := mta.Return(strings.ToUpper(p.value)); r {
			case mta.ReturnFull, mta.ReturnHeaders:
				env.Ret = r
			default:
				s.refuse("bad_parameter", &replyBadParam)
				return
			}
		case "ENVID":
			id, ok := decodeXtext(p.value)
			if !ok || len(id) > 100 {
				s.refuse("bad_parameter", &replyBadParam)
				return
			}
			env.EnvID = id
		case "MT-PRIORITY":
			// RFC 6710: -9 (lowest) to 9. Above 0, from our own users,
			// the message takes the transactional lane; anyone else's
			// priority is accepted and ignored (§5.1 lets us lower it).
			n, err := strconv.Atoi(p.value)
			if err != nil || n < -9 || n > 9 || len(p.value) > 2 {
				s.refuse("bad_parameter", &replyBadParam)
				return
			}
			if n > 0 && s.mayRelay() {
				env.Priority = mta.PriorityTransactional
			}
		case "AUTH":
			// RFC 4954 §5: the identity a trusted relay vouches for; we
			// vouch for nobody's, so it is accepted and ignored.
		default:
			s.refuse("unknown_parameter", &replyUnknownParam)
			return
		}
	}
	p, _, perr := parsePath(rest, true, false, env.SMTPUTF8)
	if perr != pathOK {
		s.refuse("bad_sender", senderPathReply(perr))
		return
	}
	env.From = p.mailbox
	if s.authUser != "" && s.srv.opts.Auth != nil && !s.srv.opts.Auth.MaySend(s.authUser, env.From) {
		s.refuse("sender_not_owned", mta.ReplySenderNotOwned.With("Sender address <"+env.From+"> not owned by user "+sanitizeName(s.authUser)))
		return
	}
	if err := s.srv.opts.Spool.Room(size); err != nil {
		if errors.Is(err, mta.ErrStorageFull) {
			s.refuse("storage_full", &mta.ReplyDiskFull)
		} else {
			s.refuse("spool_error", &mta.ReplySpoolError)
		}
		return
	}
	s.env = env
	s.hasFrom, s.declared = true, size
	s.busy.Store(true)
	s.replyText(250, mta.Enhanced{2, 1, 0}, "Ok")
}

// pathParams checks the syntax of the parameters after a path and returns
// them; on a refusal it has replied.
func (s *session) pathParams(rest string) ([]param, bool) {
	end := pathEnd(rest)
	if len(rest) == 0 || rest[0] != '<' || end < 0 {
		s.refuse("bad_syntax", &mta.Reply{Code: 501, Enhanced: mta.Enhanced{5, 5, 4}, Text: "Syntax: address in angle brackets required"})
		return nil, false
	}
	params, ok := parseParams(rest[end+1:], s.params[:0])
	s.params = params
	if !ok {
		s.refuse("bad_parameter", &replyBadParam)
		return nil, false
	}
	if len(params) > 0 && !s.esmtp {
		s.refuse("unknown_parameter", &replyUnknownParam) // RFC 1869 §6: no parameters after HELO
		return nil, false
	}
	for i := range params {
		for j := range i {
			if params[j].key == params[i].key {
				s.refuse("bad_parameter", &replyBadParam)
				return nil, false
			}
		}
	}
	return params, true
}

func senderPathReply(e pathError) *mta.Reply {
	switch e {
	case pathNeedUTF8:
		return &mta.ReplyNeedsSMTPUTF8
	case pathTooLong:
		return mta.ReplyBadSender.With("Sender address too long")
	}
	return &mta.ReplyBadSender
}

func recipientPathReply(e pathError) *mta.Reply {
	switch e {
	case pathNeedUTF8:
		return &mta.ReplyNeedsSMTPUTF8
	case pathTooLong:
		return mta.ReplyBadRecipient.With("Recipient address too long")
	case pathLiteral:
		return &mta.ReplyNoAddressLiterals
	case pathBadDomain:
		return &mta.ReplyBadDestination
	}
	return &mta.ReplyBadRecipient
}

// rcpt answers RCPT TO.
func (s *session) rcpt(arg string) {
	switch {
	case !s.hasFrom:
		s.refuse("bad_sequence", &replyNeedMAIL)
		return
	case s.bdat != nil:
		s.refuse("bad_sequence", &replyInBDAT)
		return
	}
	rest, ok := cutKeyword(arg, "TO:")
	if !ok {
		s.refuse("bad_syntax", &mta.Reply{Code: 501, Enhanced: mta.Enhanced{5, 5, 4}, Text: "Syntax: RCPT TO:<address>"})
		return
	}
	params, ok := s.pathParams(rest)
	if !ok {
		return
	}
	p, _, perr := parsePath(rest, false, true, s.env.SMTPUTF8)
	if perr == pathOK && p.literal {
		perr = pathLiteral
	}
	if perr != pathOK {
		s.refuse("bad_recipient", recipientPathReply(perr))
		return
	}
	r := mta.Recipient{Address: p.mailbox}
	if p.postmaster {
		r.Address = s.srv.postmaster
	}
	if !p.postmaster && !s.mayRelay() && (!s.srv.local[mta.Domain(r.Address)] || senderRouted(r.Address)) {
		s.refuse("relay_denied", &mta.ReplyRelayDenied)
		return
	}
	if len(s.env.Recipients) >= s.pol.MaxRecipients {
		s.refuse("too_many_recipients", &mta.ReplyTooManyRecipients)
		if s.overshoot++; s.overshoot > recipientOvershootLimit {
			s.countError()
		}
		return
	}
	if f := s.srv.opts.Suppressed; f != nil && s.mayRelay() && !p.postmaster {
		if rep := f(s.authUser, r.Address); rep != nil {
			s.refuse("suppressed", rep)
			return
		}
	}
	if mb := s.srv.opts.Mailboxes; mb != nil && s.srv.local[mta.Domain(r.Address)] {
		if rep := mb.Check(r.Address, s.declared); rep != nil {
			reason := "unknown_recipient"
			if rep.Code == 552 {
				reason = "mailbox_full"
			}
			s.refuse(reason, rep)
			return
		}
	}
	for _, p := range params {
		switch p.key {
		case "NOTIFY":
			n, ok := parseNotify(p.value)
			if !ok {
				s.refuse("bad_parameter", &replyBadParam)
				return
			}
			r.Notify = n
		case "ORCPT":
			typ, addr, ok := strings.Cut(p.value, ";")
			if ok && strings.EqualFold(typ, "rfc822") {
				addr, ok = decodeXtext(addr)
			} else if ok && strings.EqualFold(typ, "utf-8") {
				ok = addr != "" && utf8.ValidString(addr) && !strings.ContainsFunc(addr, unicode.IsControl)
			} else {
				ok = false
			}
			if !ok {
				s.refuse("bad_parameter", &replyBadParam)
				return
			}
			r.ORcptType, r.ORcpt = typ, addr
		default:
			s.refuse("unknown_parameter", &replyUnknownParam)
			return
		}
	}
	dup := s.duplicateRecipient(r)
	if !dup {
		s.env.Recipients = append(s.env.Recipients, r)
	}
	s.replyText(250, mta.Enhanced{2, 1, 5}, "Ok")
	if dup {
		s.junkCommand() // taken once: a client repeating it for ever sends junk
	}
}

// duplicateRecipient reports whether the transaction has r already: the
// same mailbox (the local part exactly, RFC 5321 §2.4; the domain in any
// case) with the same DSN parameters. Like Postfix's cleanup, a recipient
// named twice gets the message once; both RCPTs are answered 250.
func (s *session) duplicateRecipient(r mta.Recipient) bool {
	if len(s.env.Recipients) < 32 {
		for _, o := range s.env.Recipients {
			if sameRecipient(o, r) {
				return true
			}
		}
		return false
	}
	if s.rcptSeen == nil { // many recipients: a set instead of a scan each
		s.rcptSeen = make(map[string]struct{}, 2*len(s.env.Recipients))
		for _, o := range s.env.Recipients {
			s.rcptSeen[recipientKey(o)] = struct{}{}
		}
	}
	key := recipientKey(r)
	if _, seen := s.rcptSeen[key]; seen {
		return true
	}
	s.rcptSeen[key] = struct{}{}
	return false
}

// sameRecipient is recipientKey(a) == recipientKey(b), without building
// the keys.
func sameRecipient(a, b mta.Recipient) bool {
	la, da := splitAddress(a.Address)
	lb, db := splitAddress(b.Address)
	return la == lb && strings.EqualFold(da, db) && a.Notify == b.Notify && a.ORcptType == b.ORcptType && a.ORcpt == b.ORcpt
}

// recipientKey identifies a recipient for duplicateRecipient.
func recipientKey(r mta.Recipient) string {
	local, domain := splitAddress(r.Address)
	return local + "@" + strings.ToLower(domain) + "\x00" + strconv.Itoa(int(r.Notify)) + "\x00" + r.ORcptType + "\x00" + r.ORcpt
}

// splitAddress splits an address at its last "@".
func splitAddress(addr string) (local, domain string) {
	at := strings.LastIndexByte(addr, '@')
	if at < 0 {
		return addr, ""
	}
	return addr[:at], addr[at+1:]
}

// senderRouted reports whether the local part of addr carries routing of
// its own ("user%remote", "remote!user", a quoted "user@remote"): the old
// percent hack and bang paths by which open-relay probes try to relay
// through a local domain. Like Postfix (allow_untrusted_routing = no),
// such mail is taken only from clients that may relay anyway.
func senderRouted(addr string) bool {
	at := strings.LastIndexByte(addr, '@')
	return at > 0 && strings.ContainsAny(addr[:at], "%!@")
}

// parseNotify parses a NOTIFY value (RFC 3461 §4.1): NEVER, or a set of
// SUCCESS, FAILURE and DELAY.
func parseNotify(v string) (mta.Notify, bool) {
	var n mta.Notify
	for _, w := range strings.Split(v, ",") {
		var bit mta.Notify
		switch strings.ToUpper(w) {
		case "NEVER":
			bit = mta.NotifyNever
		case "SUCCESS":
			bit = mta.NotifySuccess
		case "FAILURE":
			bit = mta.NotifyFailure
		case "DELAY":
			bit = mta.NotifyDelay
		default:
			return 0, false
		}
		if n&bit != 0 {
			return 0, false
		}
		n |= bit
	}
	if n&mta.NotifyNever != 0 && n != mta.NotifyNever {
		return 0, false
	}
	return n, true
}

// startTLS answers STARTTLS (RFC 3207) and, on success, starts the
// session afresh over TLS: nothing the client said before is kept.
func (s *session) startTLS(arg string) {
	switch {
	case arg != "":
		s.refuse("bad_syntax", &mta.Reply{Code: 501, Enhanced: mta.Enhanced{5, 5, 4}, Text: "Syntax: STARTTLS"})
		return
	case s.srv.opts.TLS == nil:
		s.refuse("not_implemented", &replyNotImplemented)
		return
	case s.tls != nil:
		s.refuse("bad_sequence", &mta.Reply{Code: 503, Enhanced: mta.Enhanced{5, 5, 1}, Text: "Error: TLS already active"})
		return
	case s.hasFrom:
		// The TLS session would start without it (RFC 3207 §4.2): say so
		// instead of dropping it silently.
		s.refuse("bad_sequence", &mta.Reply{Code: 503, Enhanced: mta.Enhanced{5, 5, 1}, Text: "Error: MAIL transaction in progress"})
		return
	}
	if s.r.Buffered() > 0 {
		// Commands pipelined after STARTTLS were sent in cleartext and
		// must not be run inside the TLS session (CVE-2011-0411): drop them.
		s.srv.log.Info("cleartext input after STARTTLS discarded", zap.String("client_ip", s.ip.String()), zap.Int("bytes", s.r.Buffered()))
	}
	s.replyText(220, mta.Enhanced{2, 0, 0}, "Ready to start TLS")
	if err := s.flush(); err != nil {
		s.closing = true
		return
	}
	tc := tls.Server(s.raw, s.srv.opts.TLS)
	_ = s.raw.SetDeadline(time.Now().Add(s.pol.CommandTimeout))
	if err := tc.Handshake(); err != nil {
		s.srv.opts.Metrics.starttls.WithLabelValues("failed").Inc()
		s.srv.log.Debug("TLS handshake failed", zap.String("client_ip", s.ip.String()), zap.Error(err))
		s.closing = true
		_ = s.raw.Close()
		return
	}
	s.srv.opts.Metrics.starttls.WithLabelValues("ok").Inc()
	s.deadlineTill = time.Time{}
	s.tls, s.nc = tc, tc
	s.r.Reset(tc)
	s.resetTransaction()
	s.helo, s.esmtp, s.authUser = "", false, ""
}
