package spool

import (
	"errors"
	"testing"

	"github.com/mtaproject/mta/mta"
)

// TestSuppressionList: entries per tenant, case-blind, listed in pages,
// removed, and still there after the spool is closed and opened again.
func TestSuppressionList(t *testing.T) {
	dir := t.TempDir()
	sp, err := Open(dir, Options{Sync: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range []Suppression{
		{Tenant: "shop", Address: "Ann@Example.org", Source: "bounce", Reason: "550 5.1.1 no such user"},
		{Tenant: "shop", Address: "bob@example.org", Source: "api"},
		{Tenant: "shop", Address: "cy@example.org", Source: "operator"},
		{Tenant: "news", Address: "ann@example.org", Source: "complaint"},
	} {
		if err := sp.Suppress(e); err != nil {
			t.Fatal(err)
		}
	}
	if e, err := sp.Suppressed("shop", "ANN@example.ORG"); err != nil || e.Source != "bounce" || e.Added.IsZero() {
		t.Errorf("case-blind lookup: %+v, %v", e, err)
	}
	if _, err := sp.Suppressed("other", "ann@example.org"); !errors.Is(err, mta.ErrNotFound) {
		t.Errorf("another tenant's list: %v", err)
	}
	page, err := sp.Suppressions("shop", "", 2)
	if err != nil || len(page) != 2 || page[0].Address != "Ann@Example.org" {
		t.Fatalf("first page %+v, %v", page, err)
	}
	rest, err := sp.Suppressions("shop", page[1].Cursor(), 10)
	if err != nil || len(rest) != 1 || rest[0].Address != "cy@example.org" {
		t.Fatalf("second page %+v, %v", rest, err)
	}
	if leak, err := sp.Suppressions("shop", "!/a", 10); err == nil || len(leak) != 0 {
		t.Errorf("a cursor of another list gave %+v, %v", leak, err)
	}
	if all, _ := sp.Suppressions("", "", 10); len(all) != 4 {
		t.Errorf("every tenant: %d entries", len(all))
	}
	if err := sp.Unsuppress("shop", "bob@EXAMPLE.org"); err != nil {
		t.Fatal(err)
	}
	if err := sp.Unsuppress("shop", "bob@example.org"); !errors.Is(err, mta.ErrNotFound) {
		t.Errorf("removing twice: %v", err)
	}
	sp.Close()
	sp, err = Open(dir, Options{Sync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	if all, _ := sp.Suppressions("", "", 10); len(all) != 3 {
		t.Errorf("after reopening: %d entries, want 3", len(all))
	}
}
