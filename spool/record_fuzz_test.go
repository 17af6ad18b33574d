package spool

import (
	"fmt"
	"testing"
	"time"

	"github.com/mtaproject/mta/mta"
)

// FuzzDecodeMessage: any bytes under m/<id> (a damaged spool, a record of
// another version) decode or give an error, never a panic, and whatever
// decodes encodes back to a record that decodes the same.
func FuzzDecodeMessage(f *testing.F) {
	m := &Message{ID: "0123456789ABCDEF", From: "a@b.test", EnvID: "e", Ret: mta.ReturnFull, Received: time.Unix(5, 6), Size: 99,
		Metadata:   map[string]string{"k": "v"},
		Recipients: []RecipientState{{Recipient: mta.Recipient{Address: "x@y.test"}, Status: Queued, LastReply: "451 later"}}}
	f.Add(m.encode(nil))
	m.body = bodyLocation{File: 2, Offset: 4096, CRC: 7}
	f.Add(m.encode(nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := decodeMessage("0123456789ABCDEF", b)
		if err != nil {
			return
		}
		again, err := decodeMessage(got.ID, got.encode(nil))
		if err != nil {
			t.Fatalf("re-encoded record does not decode: %v", err)
		}
		if fmt.Sprintf("%+v", again) != fmt.Sprintf("%+v", got) {
			t.Fatalf("round trip:\n got %+v\nwant %+v", again, got)
		}
	})
}
