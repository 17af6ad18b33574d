package mta

import "bytes"

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
