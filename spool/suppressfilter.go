package spool

import (
	"hash/maphash"
	"math/bits"
	"sync"

	"github.com/cockroachdb/pebble/v2"
)

// suppressionFilter is a Bloom filter over the suppression list's keys,
// kept in memory so that the lookup every RCPT makes costs a few hashed
// bit tests instead of a Pebble Get: almost every recipient is not on the
// list, and a miss through the memtables and every level of the LSM was
// about a tenth of the CPU of accepting a message.
//
// It never answers "no" for a key on the list (Suppress adds the key
// after its commit, and a rebuild catches keys committed while it scans).
// It answers "maybe" for fewer than one key in 1,500 that is not (16 bits
// and 8 probes per key when full, far fewer after a rebuild), and the Get
// settles a "maybe". Removing an entry leaves its bits set until the next
// rebuild, which happens when the number of keys added reaches the
// capacity: the filter then doubles.
type suppressionFilter struct {
	seed maphash.Seed

	mu       sync.RWMutex
	bits     []uint64 // a power of two of them
	capacity int      // keys the filter is sized for
	added    int      // keys set in bits
	// pending, while a rebuild scans, collects the keys added meanwhile.
	pending    [][]byte
	rebuilding bool
	// scanned, in tests, runs between a rebuild's scan and its swap.
	scanned func()
}

const (
	filterBitsPerKey = 16
	filterProbes     = 8
	filterMinKeys    = 1024
)

func newSuppressionFilter() *suppressionFilter {
	f := &suppressionFilter{seed: maphash.MakeSeed()}
	f.bits, f.capacity = sized(0)
	return f
}

// sized returns an empty bit array for capacity keys.
func sized(capacity int) (words []uint64, c int) {
	c = max(capacity, filterMinKeys)
	return make([]uint64, 1<<bits.Len(uint(c*filterBitsPerKey/64-1))), c
}

// probes calls fn with each bit of key in the array words, as long as fn
// returns true, and reports whether it always did.
func (f *suppressionFilter) probes(words []uint64, key []byte, fn func(word *uint64, bit uint64) bool) bool {
	h := maphash.Bytes(f.seed, key)
	h1, h2 := h, h>>32|1 // double hashing; an odd step visits every bit
	mask := uint64(len(words)*64 - 1)
	for i := uint64(0); i < filterProbes; i++ {
		b := (h1 + i*h2) & mask
		if !fn(&words[b/64], 1<<(b%64)) {
			return false
		}
	}
	return true
}

func (f *suppressionFilter) set(words []uint64, key []byte) {
	f.probes(words, key, func(w *uint64, b uint64) bool { *w |= b; return true })
}

// mayContain reports whether key may be on the list.
func (f *suppressionFilter) mayContain(key []byte) bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.added == 0 {
		return false
	}
	return f.probes(f.bits, key, func(w *uint64, b uint64) bool { return *w&b != 0 })
}

// add records key, and reports whether the filter is full and should be
// rebuilt larger (once: the caller that gets true runs build).
func (f *suppressionFilter) add(key []byte) (rebuild bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.set(f.bits, key)
	f.added++
	if f.rebuilding {
		f.pending = append(f.pending, key)
		return false
	}
	if f.added < f.capacity {
		return false
	}
	f.rebuilding = true
	return true
}

// build refills the filter from the suppression keys in db, sized for
// twice their number. Open calls it, and the caller that got true from add.
// Lookups go on meanwhile with the old filter, which still answers "maybe"
// for every key it was given.
func (f *suppressionFilter) build(db *pebble.DB) error {
	f.mu.Lock()
	f.rebuilding = true
	f.pending = nil
	f.mu.Unlock()
	// Keys committed from here on are in pending (add follows the commit);
	// keys committed before are in both scans' view.
	n := 0
	err := eachSuppressionKey(db, func([]byte) { n++ })
	words, capacity := sized(2 * n)
	if err == nil {
		err = eachSuppressionKey(db, func(k []byte) { f.set(words, k) })
	}
	if f.scanned != nil {
		f.scanned()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rebuilding = false
	pending := f.pending
	f.pending = nil
	if err != nil {
		return err
	}
	f.bits, f.capacity, f.added = words, capacity, n
	for _, k := range pending {
		f.set(f.bits, k)
		f.added++
	}
	return nil
}

func eachSuppressionKey(db *pebble.DB, fn func(key []byte)) error {
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: []byte(prefixSuppression), UpperBound: []byte(prefixEnd(prefixSuppression))})
	if err != nil {
		return err
	}
	defer it.Close()
	for ok := it.First(); ok; ok = it.Next() {
		fn(it.Key())
	}
	return it.Error()
}
