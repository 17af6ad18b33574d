package spool

import (
	"crypto/rand"
	"encoding/binary"
	"sync"
	"time"
)

// crockford is the Crockford base32 alphabet; its characters are in ASCII
// order, so encoded IDs sort like the bytes they encode.
const crockford = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

// IDLen is the length of a queue ID.
const IDLen = 16

// idGen makes unique, time-ordered queue IDs: 48 bits of milliseconds since
// the Unix epoch and a 32-bit sequence that starts at a random value in each
// process and increases within a millisecond. If the clock steps back, the
// generator keeps using the last millisecond it saw, so IDs never go back.
type idGen struct {
	mu  sync.Mutex
	ms  uint64
	seq uint32
}

func newIDGen() *idGen {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return &idGen{seq: binary.BigEndian.Uint32(b[:]) & 0x7fffffff}
}

func (g *idGen) next(now time.Time) string {
	g.mu.Lock()
	ms := uint64(now.UnixMilli())
	if ms > g.ms {
		g.ms = ms
	}
	g.seq++
	if g.seq == 0 { // wrapped within one millisecond: borrow the next one
		g.ms++
	}
	ms, seq := g.ms, g.seq
	g.mu.Unlock()
	return encodeID(ms, seq)
}

// encodeID writes the 80-bit number ms<<32 | seq in 16 base32 digits. It is
// held as hi (the top 32 bits) and lo (the low 48 bits).
func encodeID(ms uint64, seq uint32) string {
	var out [IDLen]byte
	hi := ms >> 16
	lo := (ms&0xffff)<<32 | uint64(seq)
	for i := IDLen - 1; i >= 0; i-- {
		out[i] = crockford[lo&31]
		lo = lo>>5 | (hi&31)<<43
		hi >>= 5
	}
	return string(out[:])
}

// ValidID reports whether s has the form of a queue ID.
func ValidID(s string) bool {
	if len(s) != IDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'A' && c <= 'Z' && c != 'I' && c != 'L' && c != 'O' && c != 'U') {
			return false
		}
	}
	return true
}

// IDTime returns the acceptance time encoded in a valid queue ID, and the
// zero Time for anything else (a key written by another tool must not
// crash a metrics scrape).
func IDTime(id string) time.Time {
	if !ValidID(id) {
		return time.Time{}
	}
	var hi, lo uint64
	for i := 0; i < IDLen; i++ {
		d := uint64(indexCrockford(id[i]))
		hi = hi<<5 | lo>>43
		lo = (lo<<5 | d) & (1<<48 - 1)
	}
	ms := (hi&0xffffffff)<<16 | lo>>32
	return time.UnixMilli(int64(ms))
}

func indexCrockford(c byte) int {
	for i := 0; i < len(crockford); i++ {
		if crockford[i] == c {
			return i
		}
	}
	return 0
}
