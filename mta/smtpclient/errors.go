package smtpclient

import (
	"context"
	"errors"
	"net"
	"os"
	"strings"

	"github.com/mtaproject/mta/mta"
)

// Errors found in (*Error).Err.
var (
	// ErrUnusable: Send was called on a Conn that is closed or out of step.
	ErrUnusable = errors.New("connection is closed or out of step")
	// ErrMalformedReply: the server's reply was not valid SMTP.
	ErrMalformedReply = errors.New("malformed reply")
	// ErrUnexpectedReply: the reply code makes no sense at this point.
	ErrUnexpectedReply = errors.New("unexpected reply")
	// ErrTLSUnavailable: TLSRequired, but the server did not offer or refused
	// STARTTLS.
	ErrTLSUnavailable = errors.New("TLS required but not available")
	// ErrAuthFailed: the server rejected the credentials or offers no usable
	// mechanism. It is reported without a Reply, so that it stays temporary
	// (as Postfix's smtp_sasl_auth_soft_bounce): a wrong password is fixed by
	// the administrator, not by bouncing the mail.
	ErrAuthFailed = errors.New("authentication failed")
	// ErrAuthNeedsTLS: credentials would be sent in cleartext to a
	// non-loopback address.
	ErrAuthNeedsTLS = errors.New("refusing to authenticate over an unencrypted connection")
)

// Error is a failure of the connection or of the protocol, as opposed to a
// per-message or per-recipient outcome (those are in Result). A Send that
// returns an *Error delivered nothing that the caller can count on: every
// recipient is to be retried, or bounced when Permanent says so.
type Error struct {
	// Stage is the step that failed: "connect", "greeting", "ehlo",
	// "starttls", "auth", "mail", "rcpt", "data", "dot", "rset", "quit".
	// Stage "rset" from Send means the cached connection had gone stale
	// before the message was attempted.
	Stage string
	Reply *mta.Reply // the server's reply, if any (nil for I/O errors and timeouts)
	Err   error      // the underlying error, if any
	Host  string     // the server name given to Dial, or Addr when none
	Addr  string     // the address dialled
	// Begun marks a failure of the first reply (to MAIL) of a transaction
	// begun behind the previous message's data (Conn.SendThen): the server
	// ended the session after that message, before this one's data went
	// out, so nothing of it was taken. Like a failed RSET, it says the
	// connection was spent, not that the host is failing.
	Begun bool
}

// Error renders the failure as an operator reads it in a queue listing or
// a bounce: "connect to host[ip]:port: connection refused" when no
// connection was made, else "host[ip]:port said at stage: reply" or
// "host[ip]:port at stage: err".
func (e *Error) Error() string {
	var b strings.Builder
	where := e.Host
	if ip, port, err := net.SplitHostPort(e.Addr); err == nil {
		if e.Host == e.Addr || e.Host == "" || e.Host == ip {
			where = net.JoinHostPort(ip, port)
		} else {
			where = e.Host + "[" + ip + "]:" + port
		}
	}
	if e.Stage == "connect" && e.Reply == nil {
		b.WriteString("connect to " + where + ": " + rootCause(e.Err))
		return b.String()
	}
	b.WriteString(where)
	switch {
	case e.Reply != nil && e.Err != nil:
		b.WriteString(" said at " + e.Stage + ": " + e.Reply.Error() + ": " + rootCause(e.Err))
	case e.Reply != nil:
		b.WriteString(" said at " + e.Stage + ": " + e.Reply.Error())
	case e.Err != nil:
		b.WriteString(" at " + e.Stage + ": " + rootCause(e.Err))
	default:
		b.WriteString(" at " + e.Stage + ": failed")
	}
	return b.String()
}

// rootCause says what went wrong without the layers of Go's network
// errors ("dial tcp 192.0.2.1:25: connect: connection refused" becomes
// "connection refused").
func rootCause(err error) string {
	if err == nil {
		return "failed"
	}
	if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
		return "timed out"
	}
	var se *os.SyscallError
	if errors.As(err, &se) {
		return se.Err.Error()
	}
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		return oe.Err.Error()
	}
	return err.Error()
}

// Unwrap returns Reply and Err, leaving out nil ones, so that errors.As
// finds the *mta.Reply and mta.IsPermanent classifies the error.
func (e *Error) Unwrap() []error {
	var errs []error
	if e.Reply != nil {
		errs = append(errs, e.Reply)
	}
	if e.Err != nil {
		errs = append(errs, e.Err)
	}
	return errs
}

// Permanent reports whether the server gave a 5xx reply.
func (e *Error) Permanent() bool { return e.Reply != nil && e.Reply.Permanent() }

// Timeout reports whether the failure was a timeout.
func (e *Error) Timeout() bool {
	if errors.Is(e.Err, os.ErrDeadlineExceeded) || errors.Is(e.Err, context.DeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(e.Err, &ne) && ne.Timeout()
}

// ioFail reports an I/O or protocol error; the stream is lost.
func (c *Conn) ioFail(stage string, err error) *Error {
	c.broken = true
	return &Error{Stage: stage, Host: c.host, Addr: c.addr, Err: err}
}

// replyFail reports a reply that ends the session or the step; a 421 means
// the server is closing the connection.
func (c *Conn) replyFail(stage string, r *mta.Reply) *Error {
	if r.Code == 421 {
		c.broken = true
	}
	return &Error{Stage: stage, Host: c.host, Addr: c.addr, Reply: r}
}

// outOfStep reports a reply whose code makes no sense at this point.
func (c *Conn) outOfStep(stage string, r *mta.Reply) *Error {
	c.broken = true
	return &Error{Stage: stage, Host: c.host, Addr: c.addr, Reply: r, Err: ErrUnexpectedReply}
}
