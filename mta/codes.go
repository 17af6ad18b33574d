package mta

// Reply codes used by the appliance, named after their meaning. Basic codes
// are from RFC 5321 §4.2.2, enhanced codes from RFC 3463 and the IANA
// "Enumerated Status Codes" registry.
var (
	// ReplyQueued is the reply to an accepted message; Text gets the queue ID.
	ReplyQueued = Reply{250, Enhanced{2, 0, 0}, "Ok: queued"}
	// ReplyRelayDenied refuses a recipient outside the local domains to an
	// unauthenticated client outside the trusted networks (Postfix wording).
	ReplyRelayDenied = Reply{554, Enhanced{5, 7, 1}, "Relay access denied"}
	// ReplyAuthRequired refuses a transaction that needs AUTH first (RFC 4954 §6).
	ReplyAuthRequired = Reply{530, Enhanced{5, 7, 0}, "Authentication required"}
	// ReplyEncryptionRequired refuses AUTH on a cleartext, non-loopback
	// connection (RFC 4954 §4, RFC 5248 5.7.11).
	ReplyEncryptionRequired = Reply{538, Enhanced{5, 7, 11}, "Encryption required for requested authentication mechanism"}
	// ReplyMessageTooBig is the reply to a message over the size limit (RFC 1870).
	ReplyMessageTooBig = Reply{552, Enhanced{5, 3, 4}, "Message size exceeds fixed limit"}
	// ReplyTooManyRecipients defers recipients past the per-message limit
	// (RFC 5321 §4.5.3.1.8: the client sends them in another transaction).
	ReplyTooManyRecipients = Reply{452, Enhanced{4, 5, 3}, "Too many recipients"}
	// ReplyLineTooLong refuses a message with a line over the limit
	// (RFC 5321 §4.5.3.1.6).
	ReplyLineTooLong = Reply{500, Enhanced{5, 5, 2}, "Line too long"}
	// ReplyBareLineEnding refuses a message with a CR or LF that is not part
	// of a CRLF pair (RFC 5321 §2.3.8); such bytes are how SMTP smuggling works.
	ReplyBareLineEnding = Reply{550, Enhanced{5, 6, 0}, "Message contains bare CR or LF; use CRLF line endings"}
	// ReplyNULByte refuses a message containing NUL bytes (RFC 5321 §2.3.8).
	ReplyNULByte = Reply{550, Enhanced{5, 6, 0}, "Message contains NUL bytes"}
	// ReplySyncError refuses a message whose content was sent before the 354
	// reply to DATA (RFC 2920 §3.1: DATA ends a pipelined group).
	ReplySyncError = Reply{554, Enhanced{5, 5, 0}, "Error: SMTP protocol synchronization"}
	// ReplySpoolError is any failure to store a message: nothing leaks.
	ReplySpoolError = Reply{451, Enhanced{4, 3, 0}, "Temporary local problem, please try again later"}
	// ReplyDiskFull is the reply when the spool is below its free-space reserve.
	ReplyDiskFull = Reply{452, Enhanced{4, 3, 1}, "Insufficient system storage, please try again later"}
	// ReplyShuttingDown is sent to new work while the server stops.
	ReplyShuttingDown = Reply{421, Enhanced{4, 3, 2}, "Service shutting down, please try again later"}
	// ReplyTooManyConnections refuses a connection past the total limit.
	ReplyTooManyConnections = Reply{421, Enhanced{4, 3, 2}, "Too many connections, please try again later"}
	// ReplyTooManyFromIP refuses a connection past the per-client limit.
	ReplyTooManyFromIP = Reply{421, Enhanced{4, 7, 0}, "Too many connections from your address, please try again later"}
	// ReplyBadSender refuses a malformed reverse-path.
	ReplyBadSender = Reply{501, Enhanced{5, 1, 7}, "Bad sender address syntax"}
	// ReplyBadRecipient refuses a malformed forward-path.
	ReplyBadRecipient = Reply{501, Enhanced{5, 1, 3}, "Bad recipient address syntax"}
	// ReplyNeedsSMTPUTF8 refuses a non-ASCII address in a transaction
	// without the SMTPUTF8 parameter (RFC 6531 §3.5).
	ReplyNeedsSMTPUTF8 = Reply{553, Enhanced{5, 6, 7}, "Non-ASCII address requires the SMTPUTF8 parameter"}
	// ReplyBadDestination refuses a recipient whose domain is not a domain
	// name that could ever be looked up.
	ReplyBadDestination = Reply{553, Enhanced{5, 1, 2}, "Bad destination domain"}
	// ReplyNoAddressLiterals refuses a recipient at an address literal
	// ([192.0.2.1]): such mail has no route here.
	ReplyNoAddressLiterals = Reply{553, Enhanced{5, 1, 2}, "Address literals are not accepted as recipients"}
	// ReplySenderNotOwned refuses a MAIL FROM that the authenticated user
	// may not use (Postfix: reject_sender_login_mismatch).
	ReplySenderNotOwned = Reply{553, Enhanced{5, 7, 1}, "Sender address not owned by the authenticated user"}
	// ReplyTooManyHops refuses a message with more Received: fields than
	// the hop limit: it is looping (RFC 5321 §6.3; Postfix's
	// hopcount_limit).
	ReplyTooManyHops = Reply{554, Enhanced{5, 4, 6}, "Too many hops"}
	// ReplyNestedMail refuses MAIL inside a transaction (RFC 5321 §4.1.4).
	ReplyNestedMail = Reply{503, Enhanced{5, 5, 1}, "Error: nested MAIL command"}
	// ReplyInternal is sent when a handler failed unexpectedly (a recovered panic).
	ReplyInternal = Reply{451, Enhanced{4, 3, 0}, "Internal error, please try again later"}
)

// With returns a copy of r with its text replaced.
func (r Reply) With(text string) *Reply {
	r.Text = text
	return &r
}
