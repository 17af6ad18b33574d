package spool

import (
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/cockroachdb/pebble/v2"

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
	if e, err := sp.Suppressed("shop", "cy@example.org"); err != nil || e.Source != "operator" {
		t.Errorf("lookup after reopening: %+v, %v", e, err)
	}
	if _, err := sp.Suppressed("shop", "bob@example.org"); !errors.Is(err, mta.ErrNotFound) {
		t.Errorf("removed entry after reopening: %v", err)
	}
}

// TestSuppressionFilter: the in-memory filter in front of the lookups
// never hides an entry, whether it was on disk when the spool opened or
// added while the filter grew under concurrent writers, and lets almost
// every other address through without a Get.
func TestSuppressionFilter(t *testing.T) {
	dir := t.TempDir()
	sp, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	const onDisk = 3000
	b := sp.db.NewBatch()
	for i := range onDisk {
		key, _ := suppressionKey("shop", fmt.Sprintf("user%d@example.org", i))
		_ = b.Set(key, []byte(`{"source":"api"}`), nil)
	}
	if err := b.Commit(pebble.Sync); err != nil {
		t.Fatal(err)
	}
	sp.Close()
	sp = openTest(t, dir, Options{})
	for i := range onDisk {
		if _, err := sp.Suppressed("shop", fmt.Sprintf("USER%d@example.org", i)); err != nil {
			t.Fatalf("entry %d written before the spool opened: %v", i, err)
		}
	}
	falsePositives := 0
	for i := range 100000 {
		key, _ := suppressionKey("shop", fmt.Sprintf("other%d@example.org", i))
		if sp.suppressed.mayContain(key) {
			falsePositives++
		}
	}
	if falsePositives > 100 {
		t.Errorf("%d of 100,000 addresses not on the list would still be looked up", falsePositives)
	}

	// Writers race past two rebuilds (capacity 6,000, then 12,000+) while
	// readers look up what they wrote; every key must be found at the end.
	var wg sync.WaitGroup
	const writers, each = 4, 2500
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				key, _ := suppressionKey("news", fmt.Sprintf("w%d-%d@example.org", w, i))
				if err := sp.db.Set(key, []byte(`{"source":"bounce"}`), pebble.NoSync); err != nil {
					t.Error(err)
					return
				}
				if sp.suppressed.add(key) {
					if err := sp.suppressed.build(sp.db); err != nil {
						t.Error(err)
					}
				}
				if !sp.suppressed.mayContain(key) {
					t.Errorf("key %s hidden right after it was added", key)
					return
				}
			}
		}()
	}
	wg.Wait()
	// A key committed after a rebuild's scan, before its swap.
	late, _ := suppressionKey("news", "late@example.org")
	sp.suppressed.scanned = func() {
		_ = sp.db.Set(late, []byte(`{"source":"bounce"}`), pebble.NoSync)
		sp.suppressed.add(late)
	}
	if err := sp.suppressed.build(sp.db); err != nil {
		t.Fatal(err)
	}
	if _, err := sp.Suppressed("news", "late@example.org"); err != nil {
		t.Errorf("key added during a rebuild: %v", err)
	}
	if sp.suppressed.capacity < onDisk+writers*each {
		t.Errorf("filter did not grow: capacity %d", sp.suppressed.capacity)
	}
	for w := range writers {
		for i := range each {
			if _, err := sp.Suppressed("news", fmt.Sprintf("w%d-%d@example.org", w, i)); err != nil {
				t.Fatalf("entry w%d-%d after the rebuilds: %v", w, i, err)
			}
		}
	}
}
