package mta

import (
	"strings"

	"golang.org/x/net/idna"
)

// NormalizeDomain lower-cases domain, trims one trailing dot, converts a
// non-ASCII name to its A-label form and checks the syntax: labels of
// letters, digits, hyphens and underscores, none empty or over 63 octets,
// no hyphen at either end, 253 octets in all. It is the one definition of a
// routable domain: the SMTP edge refuses at RCPT what the resolver could
// never look up. It does not allocate for a well-formed lower-case ASCII
// name.
func NormalizeDomain(domain string) (string, bool) {
	d := strings.TrimSuffix(domain, ".")
	for i := 0; i < len(d); i++ {
		if d[i] >= 0x80 {
			a, err := idna.Lookup.ToASCII(d)
			if err != nil {
				return "", false
			}
			d = a
			break
		}
	}
	d = strings.ToLower(d)
	if len(d) == 0 || len(d) > 253 {
		return "", false
	}
	label := 0
	for i := 0; i < len(d); i++ {
		c := d[i]
		switch {
		case c == '.':
			if label == 0 || d[i-1] == '-' {
				return "", false
			}
			label = 0
			continue
		case c == '-':
			if label == 0 {
				return "", false
			}
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '_':
		default:
			return "", false
		}
		label++
		if label > 63 {
			return "", false
		}
	}
	return d, label > 0 && d[len(d)-1] != '-'
}
