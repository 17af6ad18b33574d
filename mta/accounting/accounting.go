// Package accounting writes the accounting log: one JSON line per event in
// a message's life (reception, each delivery outcome, bounce, operator
// action), for billing, audits and answering "where did my mail go". It
// owns the schema (docs/accounting.md) and the writer, to a file with
// size-based rotation and/or to standard output; the rest of the server
// hands it Events.
package accounting

import (
	"io"
	"maps"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"

	"gopkg.in/natefinch/lumberjack.v2"
)

// Event kinds.
const (
	Reception        = "reception"         // a message accepted (250)
	Delivery         = "delivery"          // a recipient delivered (remote 2xx or a local mailbox)
	TransientFailure = "transient_failure" // a recipient deferred: it will be retried
	PermanentFailure = "permanent_failure" // a recipient refused for good (5xx, routing)
	Expiry           = "expiry"            // a recipient given up on after delivery.max_lifetime
	Bounce           = "bounce"            // a delivery status notification made
	Hold             = "hold"              // operator actions
	Release          = "release"
	Remove           = "remove"
	OperatorBounce   = "operator_bounce"
	AsyncBounce      = "async_bounce" // a bounce that came back to a VERP return path after delivery
	Complaint        = "complaint"    // a feedback report (ARF) about a message
)

// Event is one line of the accounting log. Empty fields are left out.
type Event struct {
	Time        time.Time
	Event       string
	ID          string // queue ID
	MessageID   string
	Sender      string // envelope sender; "" is the null sender
	Recipient   string
	Recipients  int    // reception: how many
	Destination string // the next-hop key
	MX          string
	IP          string // address:port that answered
	TLS         string // version and cipher
	Code        int
	Enhanced    string
	Reply       string
	Attempt     int
	Size        int64
	QueuedFor   time.Duration     // since arrival
	ClientIP    string            // reception
	HELO        string            // reception
	AuthUser    string            // reception
	DSNID       string            // bounce: the notice's queue ID
	Action      string            // bounce: failed, delayed, relayed, delivered
	Tenant      string            // whose mail: an API tenant, or "default"
	Metadata    map[string]string // given at injection
}

// Config says where the log goes.
type Config struct {
	File     string // path; "" for none
	MaxSize  int64  // octets per file before rotation
	MaxFiles int    // rotated files kept
	Stdout   bool   // also (or only) to standard output
	// OnError is told of a failed write (nil: ignored). The log never
	// holds mail up.
	OnError func(error)
}

// Log is the accounting log. A nil *Log discards events. It is safe for
// concurrent use.
type Log struct {
	mu      sync.Mutex
	w       io.Writer
	file    *lumberjack.Logger
	buf     []byte
	onError func(error)
}

// Open returns the log cfg describes, or nil when it describes none.
func Open(cfg Config) (*Log, error) {
	var ws []io.Writer
	l := &Log{onError: cfg.OnError}
	if cfg.File != "" {
		// Open once now, so that a path that cannot be written stops
		// start-up instead of losing the log.
		f, err := os.OpenFile(cfg.File, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
		if err != nil {
			return nil, err
		}
		f.Close()
		mb := int((cfg.MaxSize + (1<<20 - 1)) >> 20)
		l.file = &lumberjack.Logger{Filename: cfg.File, MaxSize: max(mb, 1), MaxBackups: cfg.MaxFiles}
		ws = append(ws, l.file)
	}
	if cfg.Stdout {
		ws = append(ws, os.Stdout)
	}
	if len(ws) == 0 {
		return nil, nil
	}
	l.w = io.MultiWriter(ws...)
	return l, nil
}

// Close closes the file.
func (l *Log) Close() error {
	if l == nil || l.file == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.file.Close()
}

// Write appends one event. Errors go to Config.OnError, not to the
// caller: the accounting log never holds up mail.
func (l *Log) Write(e *Event) {
	if l == nil {
		return
	}
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf = e.AppendJSON(l.buf[:0])
	l.buf = append(l.buf, '\n')
	if _, err := l.w.Write(l.buf); err != nil && l.onError != nil {
		l.onError(err)
	}
}

// AppendJSON appends e as one JSON object (no line break).
func (e *Event) AppendJSON(b []byte) []byte {
	b = append(b, `{"time":"`...)
	b = e.Time.UTC().AppendFormat(b, "2006-01-02T15:04:05.000000Z07:00")
	b = append(b, `","event":`...)
	b = appendString(b, e.Event)
	str := func(name, v string) {
		if v != "" {
			b = append(b, ',', '"')
			b = append(b, name...)
			b = append(b, '"', ':')
			b = appendString(b, v)
		}
	}
	num := func(name string, v int64) {
		if v != 0 {
			b = append(b, ',', '"')
			b = append(b, name...)
			b = append(b, '"', ':')
			b = strconv.AppendInt(b, v, 10)
		}
	}
	str("id", e.ID)
	str("message_id", e.MessageID)
	switch e.Event {
	case Hold, Release, Remove, OperatorBounce:
		str("sender", e.Sender)
	default:
		b = append(b, `,"sender":`...)
		b = appendString(b, e.Sender) // "" is the null sender: always there
	}
	str("recipient", e.Recipient)
	num("recipients", int64(e.Recipients))
	str("destination", e.Destination)
	str("mx", e.MX)
	str("ip", e.IP)
	str("tls", e.TLS)
	num("code", int64(e.Code))
	str("enhanced", e.Enhanced)
	str("reply", e.Reply)
	num("attempt", int64(e.Attempt))
	num("size", e.Size)
	if e.QueuedFor > 0 {
		b = append(b, `,"queued_for":`...)
		// Milliseconds, and at least one: a message delivered within half
		// a millisecond did queue, and "0.000" would say it did not.
		b = strconv.AppendFloat(b, max(e.QueuedFor.Seconds(), 0.001), 'f', 3, 64)
	}
	str("client_ip", e.ClientIP)
	str("helo", e.HELO)
	str("auth_user", e.AuthUser)
	str("dsn_id", e.DSNID)
	str("action", e.Action)
	str("tenant", e.Tenant)
	if len(e.Metadata) > 0 {
		b = append(b, `,"metadata":{`...)
		for i, k := range slices.Sorted(maps.Keys(e.Metadata)) {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendString(b, k)
			b = append(b, ':')
			b = appendString(b, e.Metadata[k])
		}
		b = append(b, '}')
	}
	return append(b, '}')
}

// appendString appends s as a JSON string; invalid UTF-8 becomes U+FFFD.
func appendString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"' || c == '\\':
				b = append(b, '\\', c)
			case c < 0x20 || c == 0x7f:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&15])
			default:
				b = append(b, c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, `\ufffd`...)
		} else {
			b = append(b, s[i:i+size]...)
		}
		i += size
	}
	return append(b, '"')
}
