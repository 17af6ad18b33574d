package spool

import (
	"bytes"
	"testing"
)

// BenchmarkAcceptDeliver is one message's life in the spool when its
// first attempt succeeds: accepted, its record and bytes read for the
// delivery, and marked delivered. A window of in-flight messages stays
// in the memtable, as in a relay that delivers about as fast as it
// accepts. Run: go test -run X -bench AcceptDeliver ./spool
func BenchmarkAcceptDeliver(b *testing.B) {
	s, err := Open(b.TempDir(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	header := []byte("Received: from client.test\r\n")
	body := bytes.Repeat([]byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd\r\n"), 16)
	const inFlight = 1000
	var ids [inFlight]string // a ring: ids[i%inFlight] was accepted i-th
	var buf []byte
	deliver := func(id string) {
		m, err := s.Get(id)
		if err != nil {
			b.Fatal(err)
		}
		if buf, err = s.AppendBody(buf[:0], id); err != nil {
			b.Fatal(err)
		}
		results := make([]Result, len(m.Recipients))
		for i, r := range m.Recipients {
			results[i] = Result{Address: r.Address, Outcome: Outcome{Reply: "250 2.0.0 ok"}}
		}
		if err := s.MarkDelivered(id, results); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		m := newMessage(s, "user@example.com")
		if err := s.Put(m, header, body); err != nil {
			b.Fatal(err)
		}
		if i >= inFlight {
			deliver(ids[i%inFlight]) // the oldest in flight
		}
		ids[i%inFlight] = m.ID
	}
	for i := max(b.N-inFlight, 0); i < b.N; i++ {
		deliver(ids[i%inFlight])
	}
}
