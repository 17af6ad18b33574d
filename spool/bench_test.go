package spool

import (
	"bytes"
	"context"
	"testing"
	"time"
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

// BenchmarkQueueCount counts a queue of 20,000 messages by state and age,
// as the queue metrics do every 30 s: by Census, and by List's decoding,
// which the metrics used before. Run: go test -run X -bench QueueCount ./spool
func BenchmarkQueueCount(b *testing.B) {
	s, err := Open(b.TempDir(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	const queued = 20_000
	for range queued {
		m := newMessage(s, "a@one.test", "b@two.test")
		m.MessageID = "<" + m.ID + "@client.test>"
		if err := s.Put(m, nil, []byte("Subject: x\r\n\r\nbody\r\n")); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("Census", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			states := map[string]int{}
			if n, err := s.Census(context.Background(), queued, func(state string, _ time.Time) { states[state]++ }); err != nil || n != queued {
				b.Fatal(n, err)
			}
		}
	})
	b.Run("List", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			states := map[string]int{}
			for after := ""; ; {
				msgs, err := s.List(after, 1000)
				if err != nil {
					b.Fatal(err)
				}
				for _, m := range msgs {
					states[m.State()]++
					after = m.ID
				}
				if len(msgs) < 1000 {
					break
				}
			}
		}
	})
}
