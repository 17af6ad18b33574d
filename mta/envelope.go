package mta

import (
	"strings"
	"time"
)

// Return is the DSN RET parameter (RFC 3461 §4.3): how much of the message a
// delivery status notification returns.
type Return string

// Values of RET.
const (
	ReturnUnspecified Return = ""
	ReturnFull        Return = "FULL"
	ReturnHeaders     Return = "HDRS"
)

// Notify is a set of DSN NOTIFY conditions (RFC 3461 §4.1).
type Notify uint8

// NOTIFY conditions. The zero value means the client gave no NOTIFY, which
// RFC 3461 §4.1 treats as FAILURE (and, at the MTA's discretion, DELAY).
const (
	NotifyNever   Notify = 1 << iota // NEVER: no DSN at all
	NotifySuccess                    // SUCCESS
	NotifyFailure                    // FAILURE
	NotifyDelay                      // DELAY
)

// String renders the set as RFC 3461 keywords separated by commas.
func (n Notify) String() string {
	if n == 0 {
		return ""
	}
	if n&NotifyNever != 0 {
		return "NEVER"
	}
	var parts []string
	if n&NotifySuccess != 0 {
		parts = append(parts, "SUCCESS")
	}
	if n&NotifyFailure != 0 {
		parts = append(parts, "FAILURE")
	}
	if n&NotifyDelay != 0 {
		parts = append(parts, "DELAY")
	}
	return strings.Join(parts, ",")
}

// Recipient is one forward-path with its DSN parameters.
type Recipient struct {
	Address   string // the mailbox, without angle brackets
	Notify    Notify // DSN NOTIFY; zero when absent
	ORcptType string // ORCPT address type, e.g. "rfc822"; empty when absent
	ORcpt     string // ORCPT original recipient, decoded from xtext
}

// Envelope is what the SMTP transaction said about a message, apart from its
// bytes.
type Envelope struct {
	From       string      // reverse-path without brackets; "" is the null sender <>
	Recipients []Recipient // forward-paths in the order accepted
	EnvID      string      // DSN ENVID (RFC 3461 §4.4); empty when absent
	Ret        Return      // DSN RET
	SMTPUTF8   bool        // the client used the SMTPUTF8 parameter (RFC 6531)
	Body8Bit   bool        // BODY=8BITMIME was given (RFC 6152)
	ClientIP   string      // the client's IP address
	HELO       string      // the HELO/EHLO name the client gave
	AuthUser   string      // the authenticated user, if any
	MessageID  string      // the header's Message-ID ("<…>"), for logs; "" when none
	Received   time.Time   // when the message was accepted
	Priority   Priority    // its delivery lane
	// Submitted marks our users' mail: from a trusted network, an
	// authenticated client or the injection API. Only it is DKIM-signed,
	// so that nobody else's mail goes out with our signature.
	Submitted bool
	// Metadata is what the injection API was given for the message,
	// carried into its events (webhooks, the accounting log).
	Metadata map[string]string
}

// Priority is a message's delivery lane: transactional mail (password
// resets, receipts) is delivered ahead of bulk mail and notices waiting
// for the same destination.
type Priority uint8

// Delivery lanes.
const (
	PriorityBulk          Priority = iota // the default, and notices
	PriorityTransactional                 // ahead of the others
)

// String names the lane: "bulk" or "transactional".
func (p Priority) String() string {
	if p == PriorityTransactional {
		return "transactional"
	}
	return "bulk"
}

// Domain returns the domain part of an address, lower-cased, or "" when the
// address has none (a bare local part or the null sender).
func Domain(address string) string {
	at := strings.LastIndexByte(address, '@')
	if at < 0 {
		return ""
	}
	return strings.ToLower(address[at+1:])
}
