package mta

// Reply codes used by the appliance, named after their meaning. Basic codes
// are from RFC 5321 §4.2.2, enhanced codes from RFC 3463 and the IANA
// "Enumerated Status Codes" registry.
var (
	// ReplyQueued is the reply to an accepted message; Text gets the queue ID.
	ReplyQueued = Reply{Code: 250, Enhanced: Enhanced{2, 0, 0}, Text: "Ok: queued"}
	// ReplyRelayDenied refuses a recipient outside the local domains to an
	// unauthenticated client outside the trusted networks (Postfix wording).
	ReplyRelayDenied = Reply{Code: 554, Enhanced: Enhanced{5, 7, 1}, Text: "Relay access denied"}
	// ReplyAuthRequired refuses a transaction that needs AUTH first (RFC 4954 §6).
	ReplyAuthRequired = Reply{Code: 530, Enhanced: Enhanced{5, 7, 0}, Text: "Authentication required"}
	// ReplyEncryptionRequired refuses AUTH on a cleartext, non-loopback
	// connection (RFC 4954 §4, RFC 5248 5.7.11).
	ReplyEncryptionRequired = Reply{Code: 538, Enhanced: Enhanced{5, 7, 11}, Text: "Encryption required for requested authentication mechanism"}
	// ReplyMessageTooBig is the reply to a message over the size limit (RFC 1870).
	ReplyMessageTooBig = Reply{Code: 552, Enhanced: Enhanced{5, 3, 4}, Text: "Message size exceeds fixed limit"}
	// ReplyTooManyRecipients defers recipients past the per-message limit
	// (RFC 5321 §4.5.3.1.8: the client sends them in another transaction).
	ReplyTooManyRecipients = Reply{Code: 452, Enhanced: Enhanced{4, 5, 3}, Text: "Too many recipients"}
	// ReplyLineTooLong refuses a message with a line over the limit
	// (RFC 5321 §4.5.3.1.6): a reply to the end of data, so a 554 (§4.3.2)
	// with a media error, not the 500 of a bad command line.
	ReplyLineTooLong = Reply{Code: 554, Enhanced: Enhanced{5, 6, 0}, Text: "Message contains a line that is too long"}
	// ReplyBareLineEnding refuses a message with a CR or LF that is not part
	// of a CRLF pair (RFC 5321 §2.3.8); such bytes are how SMTP smuggling works.
	ReplyBareLineEnding = Reply{Code: 550, Enhanced: Enhanced{5, 6, 0}, Text: "Message contains bare CR or LF; use CRLF line endings"}
	// ReplyNULByte refuses a message containing NUL bytes (RFC 5321 §2.3.8).
	ReplyNULByte = Reply{Code: 550, Enhanced: Enhanced{5, 6, 0}, Text: "Message contains NUL bytes"}
	// ReplySyncError refuses a message whose content was sent before the 354
	// reply to DATA (RFC 2920 §3.1: DATA ends a pipelined group).
	ReplySyncError = Reply{Code: 554, Enhanced: Enhanced{5, 5, 0}, Text: "Error: SMTP protocol synchronization"}
	// ReplySpoolError is any failure to store a message: nothing leaks.
	ReplySpoolError = Reply{Code: 451, Enhanced: Enhanced{4, 3, 0}, Text: "Temporary local problem, please try again later"}
	// ReplyDiskFull is the reply when the spool is below its free-space reserve.
	ReplyDiskFull = Reply{Code: 452, Enhanced: Enhanced{4, 3, 1}, Text: "Insufficient system storage, please try again later"}
	// ReplyNoMemory defers a message while the memory budget for messages
	// in flight is used up.
	ReplyNoMemory = Reply{Code: 451, Enhanced: Enhanced{4, 3, 2}, Text: "Too much mail in progress; try again later"}
	// ReplyShuttingDown is sent to new work while the server stops.
	ReplyShuttingDown = Reply{Code: 421, Enhanced: Enhanced{4, 3, 2}, Text: "Service shutting down, please try again later"}
	// ReplyTooManyConnections refuses a connection past the total limit.
	ReplyTooManyConnections = Reply{Code: 421, Enhanced: Enhanced{4, 3, 2}, Text: "Too many connections, please try again later"}
	// ReplyTooManyFromIP refuses a connection past the per-client limit.
	ReplyTooManyFromIP = Reply{Code: 421, Enhanced: Enhanced{4, 7, 0}, Text: "Too many connections from your address, please try again later"}
	// ReplyBadSender refuses a malformed reverse-path.
	ReplyBadSender = Reply{Code: 501, Enhanced: Enhanced{5, 1, 7}, Text: "Bad sender address syntax"}
	// ReplyBadRecipient refuses a malformed forward-path.
	ReplyBadRecipient = Reply{Code: 501, Enhanced: Enhanced{5, 1, 3}, Text: "Bad recipient address syntax"}
	// ReplyNeedsSMTPUTF8 refuses a non-ASCII address in a transaction
	// without the SMTPUTF8 parameter (RFC 6531 §3.5).
	ReplyNeedsSMTPUTF8 = Reply{Code: 553, Enhanced: Enhanced{5, 6, 7}, Text: "Non-ASCII address requires the SMTPUTF8 parameter"}
	// ReplyBadDestination refuses a recipient whose domain is not a domain
	// name that could ever be looked up.
	ReplyBadDestination = Reply{Code: 553, Enhanced: Enhanced{5, 1, 2}, Text: "Bad destination domain"}
	// ReplyNoAddressLiterals refuses a recipient at an address literal
	// ([192.0.2.1]): such mail has no route here.
	ReplyNoAddressLiterals = Reply{Code: 553, Enhanced: Enhanced{5, 1, 2}, Text: "Address literals are not accepted as recipients"}
	// ReplySenderNotOwned refuses a MAIL FROM that the authenticated user
	// may not use (Postfix: reject_sender_login_mismatch).
	ReplySenderNotOwned = Reply{Code: 553, Enhanced: Enhanced{5, 7, 1}, Text: "Sender address not owned by the authenticated user"}
	// ReplyTooManyHops refuses a message with more Received: fields than
	// the hop limit: it is looping (RFC 5321 §6.3; Postfix's
	// hopcount_limit).
	ReplyTooManyHops = Reply{Code: 554, Enhanced: Enhanced{5, 4, 6}, Text: "Too many hops"}
	// ReplyNestedMail refuses MAIL inside a transaction (RFC 5321 §4.1.4).
	ReplyNestedMail = Reply{Code: 503, Enhanced: Enhanced{5, 5, 1}, Text: "Error: nested MAIL command"}
	// ReplyInternal is sent when a handler failed unexpectedly (a recovered panic).
	ReplyInternal = Reply{Code: 451, Enhanced: Enhanced{4, 3, 0}, Text: "Internal error, please try again later"}
)

// With returns a copy of r with its text replaced.
func (r Reply) With(text string) *Reply {
	r.Text = text
	return &r
}
