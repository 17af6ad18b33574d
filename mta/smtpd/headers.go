package smtpd

import (
	"bytes"
	"time"

	"github.com/mtaproject/mta/mta"
)

// headerFacts is what the edge needs to know of a message's header
// section (RFC 5322 §2.2): everything before the first empty line.
type headerFacts struct {
	hasDate, hasMessageID bool
	received              int    // Received: fields, the hops so far (RFC 5321 §6.3)
	messageID             []byte // the first line of the Message-ID value, trimmed, for the log
}

// scanHeader reads the field names of the header section of msg.
func scanHeader(msg []byte) headerFacts {
	var f headerFacts
	folded := false // the Message-ID's value may start on the next line
	for len(msg) > 0 {
		end := bytes.Index(msg, crlf)
		line := msg
		if end >= 0 {
			line, msg = msg[:end], msg[end+2:]
		} else {
			msg = nil
		}
		if len(line) == 0 {
			break // the end of the header section
		}
		switch {
		case line[0] == ' ' || line[0] == '\t':
			// a folded continuation of the field before
			if folded && len(f.messageID) == 0 {
				f.messageID = bytes.TrimSpace(line[:min(len(line), 256)])
			}
			continue
		case mta.IsHeaderField(line, "received"):
			f.received++
		case mta.IsHeaderField(line, "date"):
			f.hasDate = true
		case mta.IsHeaderField(line, "message-id"):
			if !f.hasMessageID {
				f.messageID = fieldValue(line)
				folded = len(f.messageID) == 0
			}
			f.hasMessageID = true
			continue
		}
		folded = false
	}
	return f
}

// appendMissingHeaders appends to hdr a Date: and a Message-ID: field for
// each that the message's header section lacks: RFC 5322 §3.6 requires
// Date, and §3.6.4 says every message should have a Message-ID; RFC 6409
// §8.3 lets a submission server add both. The Message-ID is made of the
// queue ID and our host name, so it is unique.
func appendMissingHeaders(hdr []byte, f headerFacts, id, hostname string, now time.Time) []byte {
	if !f.hasDate {
		hdr = append(hdr, "Date: "...)
		hdr = now.AppendFormat(hdr, "Mon, 02 Jan 2006 15:04:05 -0700")
		hdr = append(hdr, "\r\n"...)
	}
	if !f.hasMessageID {
		hdr = append(hdr, "Message-ID: <"...)
		hdr = append(hdr, id...)
		hdr = append(hdr, '@')
		hdr = append(hdr, hostname...)
		hdr = append(hdr, ">\r\n"...)
	}
	return hdr
}

// fieldValue returns what follows the colon of a header line, trimmed and
// cut at 256 octets.
func fieldValue(line []byte) []byte {
	v := bytes.TrimSpace(line[bytes.IndexByte(line, ':')+1:])
	if len(v) > 256 {
		v = v[:256]
	}
	return v
}
