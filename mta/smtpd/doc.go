// Package smtpd is the inbound SMTP edge: the SMTP dialogue itself
// (commands, message data, STARTTLS, AUTH), relay policy, limits, DSN
// parameters, the Received: header and the hand-over of each message to the
// spool. It speaks the protocol itself rather than through go-smtp's
// server, so that where a message ends, what a timeout does and which reply
// each error gets are decided here (docs/smtp-edge.md says why).
//
// Every failure becomes an explicit SMTP reply chosen here; no internal
// error text reaches a client. The reply to the end of DATA is
// "250 2.0.0 Ok: queued as <ID>" and is written only after the Spooler
// returned, which (with a synced spool) means after the message is on disk.
//
// Relay policy (the Postfix defaults operators expect): clients in the
// trusted networks and authenticated clients may send to any domain; any
// other client may send only to local domains and gets
// "554 5.7.1 Relay access denied" for anything else. On a submission
// listener every transaction needs AUTH first.
//
// End of data is the first <CRLF>.<CRLF> in the stream, and only that. A bare
// CR or LF inside the data is refused, or normalised to CRLF, by policy; a NUL
// byte is always refused. Content sent before the 354 reply to DATA (a
// pipelining violation, RFC 2920 §3.1) is refused, and the client
// disconnected, as Postfix's smtpd_forbid_unauth_pipelining does. A read
// error inside message data always ends the session. Together these close the
// SMTP smuggling family of 2023.
package smtpd
