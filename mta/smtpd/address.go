package smtpd

import (
	"net/netip"
	"strings"
	"unicode/utf8"

	"github.com/mtaproject/mta/mta"
)

// pathError says why a path was refused; each kind has its own reply.
type pathError int

const (
	pathOK        pathError = iota
	pathSyntax              // not a path of RFC 5321 §4.1.2
	pathTooLong             // over 256 octets (RFC 5321 §4.5.3.1.3)
	pathNeedUTF8            // non-ASCII without the SMTPUTF8 parameter (RFC 6531 §3.5)
	pathLiteral             // an address literal, which we cannot route
	pathBadDomain           // a domain the resolver could never look up
)

// maxPath is the longest path, angle brackets included (RFC 5321 §4.5.3.1.3).
const maxPath = 256

// path is a parsed reverse- or forward-path.
type path struct {
	mailbox    string // as it is stored and sent on: quotes kept where needed, source route dropped; "" for <>
	postmaster bool   // the special <Postmaster> of RFC 5321 §4.1.1.3
	literal    bool   // the domain is an address literal such as [192.0.2.1]
}

// parsePath parses the path at the start of s, "<mailbox>" with an optional
// source route, "<>" when null is allowed (MAIL), "<postmaster>" when
// postmaster is (RCPT), and returns what follows it: the parameters.
// Non-ASCII is allowed only with utf8 (the SMTPUTF8 parameter). A path is
// accepted only if it can be sent on byte for byte in the same syntax, so a
// message accepted here is never stuck for an address our client could not
// write.
func parsePath(s string, null, postmaster, utf8ok bool) (path, string, pathError) {
	if len(s) < 2 || s[0] != '<' {
		return path{}, "", pathSyntax
	}
	end := pathEnd(s)
	if end < 0 {
		return path{}, "", pathSyntax
	}
	inner, rest := s[1:end], s[end+1:]
	if end+1 > maxPath {
		return path{}, "", pathTooLong
	}
	if !utf8ok {
		for i := 0; i < len(inner); i++ {
			if inner[i] >= 0x80 {
				return path{}, "", pathNeedUTF8
			}
		}
	} else if !utf8.ValidString(inner) {
		return path{}, "", pathSyntax
	}
	if inner == "" {
		if !null {
			return path{}, "", pathSyntax
		}
		return path{}, rest, pathOK
	}
	if postmaster && strings.EqualFold(inner, "postmaster") {
		return path{postmaster: true}, rest, pathOK
	}
	if inner[0] == '@' { // source route "@a,@b:", which RFC 5321 §4.1.1.3 says to ignore
		colon := routeEnd(inner)
		if colon < 0 || !validRoute(inner[:colon]) {
			return path{}, "", pathSyntax
		}
		inner = inner[colon+1:]
	}
	at := localPartEnd(inner, utf8ok)
	if at <= 0 || at >= len(inner) || inner[at] != '@' {
		return path{}, "", pathSyntax
	}
	if inner[0] == '"' && !strings.ContainsRune(inner[1:at-1], '\\') {
		// A quoted local part that needs no quotes is the same mailbox as
		// the bare one (RFC 5322 §3.2.4): "alice"@example.org is
		// alice@example.org, for the mailbox lookup and on the wire, as
		// RFC 5321 §4.1.2 asks senders to write it.
		if bare := inner[1 : at-1]; localPartEnd(bare+"@", utf8ok) == len(bare) {
			inner, at = bare+inner[at:], len(bare)
		}
	}
	domain := inner[at+1:]
	p := path{mailbox: inner}
	switch {
	case domain == "":
		return path{}, "", pathSyntax
	case domain[0] == '[':
		if !validLiteral(domain) {
			return path{}, "", pathSyntax
		}
		p.literal = true
	default:
		if _, ok := mta.NormalizeDomain(domain); !ok || strings.HasSuffix(domain, ".") {
			return path{}, "", pathBadDomain
		}
	}
	return p, rest, pathOK
}

// pathEnd returns the index of the '>' that closes the path starting at
// s[0] == '<', skipping quoted strings, or -1.
func pathEnd(s string) int {
	quoted := false
	for i := 1; i < len(s); i++ {
		switch c := s[i]; {
		case quoted && c == '\\':
			i++
		case c == '"':
			quoted = !quoted
		case !quoted && c == '>':
			return i
		}
	}
	return -1
}

// localPartEnd returns the length of the Local-part (Dot-string or
// Quoted-string, RFC 5321 §4.1.2) at the start of s, or -1.
func localPartEnd(s string, utf8ok bool) int {
	if s == "" {
		return -1
	}
	if s[0] == '"' {
		for i := 1; i < len(s); i++ {
			c := s[i]
			switch {
			case c == '"':
				if i == 1 {
					return -1 // "" is not a mailbox anyone can read
				}
				return i + 1
			case c == '\\':
				if i+1 >= len(s) || !(s[i+1] >= 32 && s[i+1] <= 126 || utf8ok && s[i+1] >= 0x80) {
					return -1
				}
				i++
			case c >= 32 && c <= 126, utf8ok && c >= 0x80:
			default:
				return -1
			}
		}
		return -1
	}
	atomLen := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '.':
			if atomLen == 0 {
				return -1
			}
			atomLen = 0
		case c == '@':
			if atomLen == 0 {
				return -1
			}
			return i
		case isAtext(c), utf8ok && c >= 0x80:
			atomLen++
		default:
			return -1
		}
	}
	return -1
}

// isAtext reports whether c is an atext character (RFC 5322 §3.2.3).
func isAtext(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-/=?^_`{|}~", c) >= 0
}

// validRoute checks an obsolete source route: "@domain" joined by commas.
func validRoute(r string) bool {
	for _, hop := range strings.Split(r, ",") {
		if len(hop) < 2 || hop[0] != '@' {
			return false
		}
		if _, ok := mta.NormalizeDomain(hop[1:]); !ok && !validLiteral(hop[1:]) {
			return false
		}
	}
	return true
}

// validLiteral checks an address literal (RFC 5321 §4.1.3): "[" then an
// IPv4 address, "IPv6:" and an IPv6 address, or a general literal
// "tag:content" whose content is printable ASCII without brackets,
// backslash, quotes or angle brackets; then "]".
func validLiteral(d string) bool {
	if len(d) < 3 || d[0] != '[' || d[len(d)-1] != ']' {
		return false
	}
	inner := d[1 : len(d)-1]
	if a, err := netip.ParseAddr(inner); err == nil {
		return a.Is4()
	}
	tag, content, ok := strings.Cut(inner, ":")
	if !ok || tag == "" || content == "" {
		return false
	}
	if strings.EqualFold(tag, "IPv6") {
		a, err := netip.ParseAddr(content)
		return err == nil && a.Is6() && a.Zone() == ""
	}
	for i := 0; i < len(tag); i++ {
		if c := tag[i]; !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	for i := 0; i < len(content); i++ {
		if c := content[i]; c <= ' ' || c > '~' || strings.IndexByte("[]\\\"<>", c) >= 0 {
			return false
		}
	}
	return true
}

// routeEnd returns the index of the colon that ends a source route
// ("@a,@[IPv6:2001:db8::1]:"), skipping colons inside literals, or -1.
func routeEnd(s string) int {
	depth := 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '[':
			depth++
		case ']':
			depth--
		case ':':
			if depth == 0 {
				return i
			}
		}
	}
	return -1
}

// param is one ESMTP parameter of MAIL or RCPT (RFC 5321 §4.1.2).
type param struct {
	key   string // upper-cased keyword
	value string // "" when the keyword had no "=value"
	bare  bool   // the keyword had no "=" at all
}

// parseParams splits the text after a path into parameters. It reports
// false for anything that is not "SP keyword[=value]" repeated.
func parseParams(s string, dst []param) ([]param, bool) {
	if s == "" {
		return dst, true
	}
	if s[0] != ' ' {
		return dst, false
	}
	for _, f := range strings.Fields(s) {
		k, v, hasValue := strings.Cut(f, "=")
		if k == "" || hasValue && v == "" {
			return dst, false
		}
		for i := 0; i < len(k); i++ {
			c := k[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' && i > 0) {
				return dst, false
			}
		}
		for i := 0; i < len(v); i++ {
			if c := v[i]; c < 33 || c == '=' || c == 127 {
				return dst, false
			}
		}
		dst = append(dst, param{key: strings.ToUpper(k), value: v, bare: !hasValue})
	}
	return dst, true
}

// decodeXtext decodes RFC 3461 §4 xtext ("+HH" for special characters) and
// requires the result to be printable ASCII.
func decodeXtext(s string) (string, bool) {
	if !strings.Contains(s, "+") {
		return s, printableASCII(s)
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c != '+' {
			b.WriteByte(c)
			continue
		}
		if i+2 >= len(s) || !isUpperHex(s[i+1]) || !isUpperHex(s[i+2]) {
			return "", false
		}
		b.WriteByte(unhex(s[i+1])<<4 | unhex(s[i+2]))
		i += 2
	}
	return b.String(), printableASCII(b.String())
}

func isUpperHex(c byte) bool { return c >= '0' && c <= '9' || c >= 'A' && c <= 'F' }

func unhex(c byte) byte {
	if c <= '9' {
		return c - '0'
	}
	return c - 'A' + 10
}

func printableASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 32 || s[i] > 126 {
			return false
		}
	}
	return s != ""
}
