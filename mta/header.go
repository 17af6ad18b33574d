package mta

import (
	"bytes"
	"io"
	"mime"
	"net/mail"
	"strings"
)

// IsHeaderField reports whether line, a line of a message's header
// section, begins the field name (in any case), with the obsolete white
// space before the colon allowed (RFC 5322 §4.5.3).
func IsHeaderField(line []byte, name string) bool {
	if len(line) <= len(name) || !bytes.EqualFold(line[:len(name)], []byte(name)) {
		return false
	}
	rest := bytes.TrimLeft(line[len(name):], " \t")
	return len(rest) > 0 && rest[0] == ':'
}

// HeaderValues returns the values of every field of h named name, in any
// case and with the obsolete white space before the colon (which net/mail
// files under a key of its own, "From "): what a reader of the message
// takes for that field.
func HeaderValues(h mail.Header, name string) []string {
	var out []string
	for k, v := range h {
		if strings.EqualFold(strings.TrimRight(k, " \t"), name) {
			out = append(out, v...)
		}
	}
	return out
}

// ParseAddressField parses an address field's value (From:, Reply-To:)
// and returns its one address. Encoded words of any charset are allowed in
// the display name (RFC 2047; ISO-2022-JP, GB2312 and windows-1252 are
// common), which net/mail's own parser refuses: only the address matters
// here, so a charset it does not know is left undecoded.
func ParseAddressField(v string) (*mail.Address, error) {
	return addressParser.Parse(v)
}

var addressParser = mail.AddressParser{WordDecoder: &mime.WordDecoder{
	CharsetReader: func(charset string, input io.Reader) (io.Reader, error) { return input, nil },
}}

// BearerToken returns the token of an HTTP Authorization field value of
// the Bearer scheme (RFC 6750 §2.1), whose name is case-insensitive (RFC
// 9110 §11.1): "bearer xyz" is as good as "Bearer xyz".
func BearerToken(authorization string) (string, bool) {
	scheme, token, ok := strings.Cut(strings.TrimSpace(authorization), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	token = strings.TrimLeft(token, " ")
	return token, token != ""
}
