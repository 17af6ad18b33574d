package admin

import (
	"github.com/mtaproject/mta/spool"

	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Client calls the admin API of a running server.
type Client struct {
	Base  string       // e.g. http://127.0.0.1:9725
	Token string       // bearer token, if the server requires one
	HTTP  *http.Client // nil: a client with a 30 s timeout
}

func (c *Client) do(ctx context.Context, method, path string, out any) error {
	hc := c.HTTP
	if hc == nil {
		hc = &http.Client{Timeout: 30 * time.Second}
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(c.Base, "/")+path, nil)
	if err != nil {
		return err
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	if method != http.MethodGet {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the server's admin API at %s (is `mta serve` running?): %w", c.Base, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		var e Error
		if json.Unmarshal(body, &e) == nil && e.Error != "" {
			return &APIError{Code: resp.StatusCode, Text: e.Error}
		}
		return &APIError{Code: resp.StatusCode, Text: fmt.Sprintf("%s %s: %s", method, path, resp.Status)}
	}
	return json.Unmarshal(body, out)
}

// APIError is the admin API's refusal of a request: its HTTP status and
// what it said.
type APIError struct {
	Code int
	Text string
}

func (e *APIError) Error() string { return e.Text }

// List returns one page of the queue.
func (c *Client) List(ctx context.Context, after string, limit int) (Page, error) {
	return c.ListFiltered(ctx, Filter{}, after, limit)
}

// ListFiltered returns one page of the messages f selects.
func (c *Client) ListFiltered(ctx context.Context, f Filter, after string, limit int) (Page, error) {
	var p Page
	q := url.Values{"limit": {fmt.Sprint(limit)}}
	if after != "" {
		q.Set("after", after)
	}
	f.Query(q)
	err := c.do(ctx, http.MethodGet, "/api/v1/queue?"+q.Encode(), &p)
	return p, err
}

// Show returns one message.
func (c *Client) Show(ctx context.Context, id string) (Message, error) {
	var m Message
	err := c.do(ctx, http.MethodGet, "/api/v1/queue/"+url.PathEscape(id), &m)
	return m, err
}

// Hold, Release and Remove act on one message.
func (c *Client) Hold(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodPost, "/api/v1/queue/"+url.PathEscape(id)+"/hold", &Result{})
}

// Release puts a held message back in the queue.
func (c *Client) Release(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodPost, "/api/v1/queue/"+url.PathEscape(id)+"/release", &Result{})
}

// Remove deletes a message from the queue.
func (c *Client) Remove(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodDelete, "/api/v1/queue/"+url.PathEscape(id), &Result{})
}

// Bounce fails a message's remaining recipients now and returns it to its
// sender with a delivery status notification.
func (c *Client) Bounce(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodPost, "/api/v1/queue/"+url.PathEscape(id)+"/bounce", &Result{})
}

// Flush makes every deferred message due now and returns how many.
func (c *Client) Flush(ctx context.Context) (int, error) {
	var r Result
	err := c.do(ctx, http.MethodPost, "/api/v1/queue/flush", &r)
	return r.Rescheduled, err
}

// FlushMessage makes one message's queued recipients due now.
func (c *Client) FlushMessage(ctx context.Context, id string) error {
	return c.do(ctx, http.MethodPost, "/api/v1/queue/"+url.PathEscape(id)+"/flush", &Result{})
}

// Bulk runs action (hold, release, bounce, remove, flush) on every message f
// selects; an empty f needs all.
func (c *Client) Bulk(ctx context.Context, action string, f Filter, all bool) (BulkResult, error) {
	q := url.Values{}
	f.Query(q)
	if all {
		q.Set("all", "true")
	}
	method, path := http.MethodPost, "/api/v1/queue/"+action
	if action == "remove" {
		method, path = http.MethodDelete, "/api/v1/queue"
	}
	var r BulkResult
	err := c.do(ctx, method, path+"?"+q.Encode(), &r)
	return r, err
}

// Shape returns the queue by destination and age, the top largest
// destinations of the messages f selects.
func (c *Client) Shape(ctx context.Context, f Filter, top int) (Shape, error) {
	q := url.Values{"top": {fmt.Sprint(top)}}
	f.Query(q)
	var sh Shape
	err := c.do(ctx, http.MethodGet, "/api/v1/queue/shape?"+q.Encode(), &sh)
	return sh, err
}

// Destinations returns delivery's destinations, busiest first.
func (c *Client) Destinations(ctx context.Context) ([]Destination, error) {
	var d []Destination
	err := c.do(ctx, http.MethodGet, "/api/v1/destinations", &d)
	return d, err
}

// Reload makes the server apply its configuration file again.
func (c *Client) Reload(ctx context.Context) error {
	return c.do(ctx, http.MethodPost, "/api/v1/reload", &Result{})
}

// Suspend stops delivery to domain for d (0: until Resume).
func (c *Client) Suspend(ctx context.Context, domain string, d time.Duration) error {
	q := url.Values{}
	if d > 0 {
		q.Set("for", d.String())
	}
	return c.do(ctx, http.MethodPost, "/api/v1/destinations/"+url.PathEscape(domain)+"/suspend?"+q.Encode(), &Result{})
}

// Resume ends a suspension.
func (c *Client) Resume(ctx context.Context, domain string) error {
	return c.do(ctx, http.MethodPost, "/api/v1/destinations/"+url.PathEscape(domain)+"/resume", &Result{})
}

// Suspensions lists the suspended domains and until when (zero: until resumed).
func (c *Client) Suspensions(ctx context.Context) (map[string]time.Time, error) {
	var m map[string]time.Time
	err := c.do(ctx, http.MethodGet, "/api/v1/suspensions", &m)
	return m, err
}

// SuppressionPage is one page of the suppression list.
type SuppressionPage struct {
	Suppressions []spool.Suppression `json:"suppressions"`
	Next         string              `json:"next,omitempty"` // pass as after for the next page
}

// Suppressions returns a page of tenant's suppression list ("" for every
// tenant's).
func (c *Client) Suppressions(ctx context.Context, tenant, after string, limit int) (SuppressionPage, error) {
	q := url.Values{"limit": {fmt.Sprint(limit)}}
	if tenant != "" {
		q.Set("tenant", tenant)
	}
	if after != "" {
		q.Set("after", after)
	}
	var p SuppressionPage
	err := c.do(ctx, http.MethodGet, "/api/v1/suppressions?"+q.Encode(), &p)
	return p, err
}

// Suppress adds address to tenant's suppression list.
func (c *Client) Suppress(ctx context.Context, tenant, address, reason string) error {
	q := url.Values{"tenant": {tenant}, "address": {address}, "reason": {reason}}
	return c.do(ctx, http.MethodPost, "/api/v1/suppressions?"+q.Encode(), &spool.Suppression{})
}

// Unsuppress removes address from tenant's suppression list.
func (c *Client) Unsuppress(ctx context.Context, tenant, address string) error {
	q := url.Values{"tenant": {tenant}, "address": {address}}
	return c.do(ctx, http.MethodDelete, "/api/v1/suppressions?"+q.Encode(), &map[string]string{})
}
