// Package inject is the HTTP injection API (POST /api/v1/messages on
// listen.api): an application posts one message, raw or built from parts
// and templates, with a list of recipients, and each recipient becomes a
// message of its own in the spool, stored as durably as mail received over
// SMTP before the reply names its queue ID. docs/injection.md describes the
// request, the reply and the decisions behind them.
package inject

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// Request is the JSON body of POST /api/v1/messages.
type Request struct {
	// EnvelopeFrom is the reverse path; "" takes the From address.
	EnvelopeFrom string `json:"envelope_from"`
	// Content is a complete RFC 5322 message, sent as it is (not
	// templated) to every recipient. Exactly one of Content and Message.
	Content string `json:"content"`
	// Message is a message built from parts, with templates.
	Message *Builder `json:"message"`
	// Recipients each get a message of their own.
	Recipients []Recipient `json:"recipients"`
	// Substitutions are template data for every recipient; a recipient's
	// own substitutions win.
	Substitutions map[string]any `json:"substitutions"`
	// Priority is "transactional" or "bulk" (the default); see
	// docs/injection.md.
	Priority string `json:"priority"`
	// Metadata goes with every recipient's message into its events
	// (webhooks, the accounting log); a recipient's own wins.
	Metadata map[string]string `json:"metadata"`
	// VERP gives each message the return path
	// bounces+<queue-id>-<token>=<rcpt-domain>@<bounces.domain>, so that
	// a bounce that comes back later is matched to its recipient.
	VERP bool `json:"verp"`
}

// Builder is a message described by its parts. Subject, Text, HTML and
// the values of Headers are templates: Go's text/template, and
// html/template for HTML, which escapes substituted values for where they
// appear in the markup.
type Builder struct {
	From        string            `json:"from"` // "Name <address>" or an address
	ReplyTo     string            `json:"reply_to"`
	Subject     string            `json:"subject"`
	Text        string            `json:"text"`
	HTML        string            `json:"html"`
	Headers     map[string]string `json:"headers"`
	Attachments []Attachment      `json:"attachments"`
}

// Attachment is a file attached to a built message.
type Attachment struct {
	Filename    string `json:"filename"`
	ContentType string `json:"content_type"` // default application/octet-stream
	Content     []byte `json:"content"`      // base64 in the JSON
}

// Recipient is one recipient and its own template data.
type Recipient struct {
	Email         string            `json:"email"`
	Name          string            `json:"name"` // for the To: field of a built message
	Substitutions map[string]any    `json:"substitutions"`
	Metadata      map[string]string `json:"metadata"`
}

// decode reads a request strictly: an unknown field is an error, so that a
// misspelt one is not silently ignored.
func decode(b []byte) (*Request, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var r Request
	if err := dec.Decode(&r); err != nil {
		var syn *json.SyntaxError
		var typ *json.UnmarshalTypeError
		switch {
		case errors.As(err, &syn):
			return nil, fmt.Errorf("not valid JSON at offset %d: %v", syn.Offset, err)
		case errors.Is(err, io.EOF):
			return nil, errors.New("the request body is empty: want a JSON object (docs/injection.md)")
		case errors.Is(err, io.ErrUnexpectedEOF):
			return nil, errors.New("not valid JSON: the body ends in the middle of a value")
		case errors.As(err, &typ):
			return nil, fmt.Errorf("field %s: want %s, got a JSON %s", typ.Field, typ.Type, typ.Value)
		}
		return nil, fmt.Errorf("bad request body: %v", err)
	}
	if dec.More() {
		return nil, errors.New("bad request body: more than one JSON value")
	}
	if k := duplicateKey(b); k != "" {
		// encoding/json keeps the last silently: a request that says
		// "recipients" twice would go to the second list only.
		return nil, fmt.Errorf("bad request body: field %q is given twice in one object", k)
	}
	return &r, nil
}

// duplicateKey returns a key that some object of the JSON document b
// (valid: decode checked it) has twice, or "".
func duplicateKey(b []byte) string {
	type object struct {
		seen    map[string]bool
		wantKey bool
	}
	var stack []*object // nil entries: arrays
	dec := json.NewDecoder(bytes.NewReader(b))
	valueDone := func() {
		if n := len(stack); n > 0 && stack[n-1] != nil {
			stack[n-1].wantKey = true
		}
	}
	for {
		t, err := dec.Token()
		if err != nil {
			return ""
		}
		if n := len(stack); n > 0 && stack[n-1] != nil && stack[n-1].wantKey {
			if k, ok := t.(string); ok {
				if stack[n-1].seen[k] {
					return k
				}
				stack[n-1].seen[k], stack[n-1].wantKey = true, false
				continue
			}
		}
		switch t {
		case json.Delim('{'):
			stack = append(stack, &object{seen: map[string]bool{}, wantKey: true})
		case json.Delim('['):
			stack = append(stack, nil)
		case json.Delim('}'), json.Delim(']'):
			stack = stack[:len(stack)-1]
			valueDone()
		default:
			valueDone()
		}
	}
}
