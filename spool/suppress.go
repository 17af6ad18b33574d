package spool

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
)

// The suppression list lives in the spool's database, one entry per tenant
// and address:
//
//	z/<tenant>\x00<address, lower case> → JSON Suppression
//
// Addresses are compared without case: a hard bounce of Ann@Example.org
// suppresses ann@example.org too (RFC 5321 lets local parts differ by case,
// but no provider of note does).
const prefixSuppression = "z/"

// Suppression is one suppressed address.
type Suppression struct {
	Tenant  string    `json:"tenant"`
	Address string    `json:"address"`
	Source  string    `json:"source"` // bounce, complaint, api or operator
	Reason  string    `json:"reason"` // the bounce's reply, or what whoever added it said
	Added   time.Time `json:"added"`
}

func suppressionKey(tenant, address string) ([]byte, error) {
	if tenant == "" || strings.ContainsAny(tenant, "\x00/") {
		return nil, fmt.Errorf("spool: invalid tenant %q", tenant)
	}
	if address == "" || strings.ContainsAny(address, "\x00\r\n") {
		return nil, fmt.Errorf("spool: invalid address %q", address)
	}
	return []byte(prefixSuppression + tenant + "\x00" + strings.ToLower(address)), nil
}

// Suppress adds (or replaces) an entry, synced.
func (s *Spool) Suppress(e Suppression) error {
	key, err := suppressionKey(e.Tenant, e.Address)
	if err != nil {
		return err
	}
	if e.Added.IsZero() {
		e.Added = s.opts.Now()
	}
	v, _ := json.Marshal(e)
	b := s.db.NewBatch()
	defer b.Close()
	_ = b.Set(key, v, nil)
	err = s.commitWith(b, "suppress", pebble.Sync)
	// Added even when the commit failed: a failure can still have written
	// the entry, and a key too many in the filter only costs a lookup.
	if s.suppressed.add(key) {
		go s.rebuildSuppressionFilter()
	}
	return err
}

// rebuildSuppressionFilter builds the full filter again, larger, unless the
// spool closes first.
func (s *Spool) rebuildSuppressionFilter() {
	s.closeMu.RLock()
	defer s.closeMu.RUnlock()
	if s.closed {
		return
	}
	if err := s.suppressed.build(s.db); err != nil {
		s.log.Warn("spool: rebuilding the suppression filter (lookups stay correct, only slower)", zap.Error(err))
	}
}

// Unsuppress removes an entry; mta.ErrNotFound if there was none.
func (s *Spool) Unsuppress(tenant, address string) error {
	key, err := suppressionKey(tenant, address)
	if err != nil {
		return err
	}
	if _, err := s.Suppressed(tenant, address); err != nil {
		return err
	}
	b := s.db.NewBatch()
	defer b.Close()
	_ = b.Delete(key, nil)
	return s.commitWith(b, "unsuppress", pebble.Sync)
}

// Suppressed returns the entry of address for tenant, or mta.ErrNotFound.
func (s *Spool) Suppressed(tenant, address string) (*Suppression, error) {
	key, err := suppressionKey(tenant, address)
	if err != nil {
		return nil, err
	}
	if !s.suppressed.mayContain(key) {
		return nil, fmt.Errorf("%w: %s", mta.ErrNotFound, address)
	}
	var e Suppression
	err = s.read(key, address, func(v []byte) error { return json.Unmarshal(v, &e) })
	if err != nil {
		return nil, err
	}
	return &e, nil
}

// Suppressions lists up to limit entries of tenant ("" for every tenant)
// after the entry (tenant, address) named by after (as returned by Cursor;
// "" from the start), in order.
func (s *Spool) Suppressions(tenant, after string, limit int) ([]Suppression, error) {
	lower := []byte(prefixSuppression + tenant)
	if tenant != "" {
		lower = append(lower, 0)
	}
	upper := []byte(prefixEnd(string(lower)))
	if tenant != "" {
		upper = []byte(prefixSuppression + tenant + "\x01")
	}
	if after != "" {
		t, a, ok := strings.Cut(after, "/")
		if !ok || tenant != "" && t != tenant {
			// A cursor of another list would start the scan below this
			// one's: refused, so that no tenant pages into another's.
			return nil, errors.New("spool: bad suppression cursor")
		}
		k, err := suppressionKey(t, a)
		if err != nil {
			return nil, err
		}
		lower = append(k, 0)
	}
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upper})
	if err != nil {
		return nil, err
	}
	defer it.Close()
	var out []Suppression
	for ok := it.First(); ok && len(out) < limit; ok = it.Next() {
		var e Suppression
		if err := json.Unmarshal(it.Value(), &e); err != nil {
			return nil, fmt.Errorf("spool: suppression %q: %w", it.Key(), err)
		}
		out = append(out, e)
	}
	return out, it.Error()
}

// Cursor is the position of e for Suppressions' after.
func (e Suppression) Cursor() string { return e.Tenant + "/" + strings.ToLower(e.Address) }
