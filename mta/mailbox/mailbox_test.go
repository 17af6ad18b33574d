package mailbox

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/scheduler"
)

type dir map[string]string

func (d dir) Mailbox(a string) (string, bool) {
	if u, ok := d[strings.ToLower(a)]; ok {
		return u, true
	}
	u, ok := d[a[strings.LastIndexByte(a, '@'):]]
	return u, ok
}

type store struct {
	copies []Copy
	usage  map[string]int64
	scans  int
}

func (s *store) DeliverLocal(id string, copies []Copy) error {
	s.copies = append(s.copies, copies...)
	return nil
}

func (s *store) MailboxUsage(m string) (int, int64, error) {
	s.scans++
	return 0, s.usage[m], nil
}

func TestOneCopyPerMailboxUnknownAndFull(t *testing.T) {
	st := &store{usage: map[string]int64{"full": 990}}
	tr := &Transport{Directory: func() Directory {
		return dir{"a@x.test": "alice", "postmaster@x.test": "alice", "@y.test": "bob", "f@x.test": "full"}
	}, Store: st, Quota: 1000}
	c, _ := tr.Connect(context.Background(), nil)
	env := &scheduler.Envelope{ID: "Q1", From: "s@example.org", Recipients: []mta.Recipient{
		{Address: "a@x.test"}, {Address: "Postmaster@x.test"}, {Address: "nobody@x.test"}, {Address: "any@y.test"}, {Address: "f@x.test"},
	}}
	replies, err := c.Send(context.Background(), env, []byte("Subject: x\r\n\r\nhello\r\n"))
	if err != nil {
		t.Fatal(err)
	}
	var codes []int
	for _, r := range replies {
		codes = append(codes, r.Code)
	}
	if want := []int{250, 250, 550, 250, 452}; !slices.Equal(codes, want) {
		t.Fatalf("replies %v, want %v", codes, want)
	}
	if len(st.copies) != 2 || st.copies[0].Mailbox != "alice" || len(st.copies[0].Recipients) != 2 ||
		string(st.copies[0].Header) != "Return-Path: <s@example.org>\r\nDelivered-To: a@x.test\r\nDelivered-To: postmaster@x.test\r\n" {
		t.Fatalf("copies %+v", st.copies)
	}
	// alice's usage was measured (0) before the delivery and follows it:
	// about 120 octets now, so 900 more are over the quota, 800 are not,
	// without measuring again.
	scans := st.scans
	if rep := tr.Check("a@x.test", 900); rep == nil || rep.Code != 552 {
		t.Errorf("a delivery was not added to the mailbox's usage: %v", rep)
	}
	if rep := tr.Check("a@x.test", 800); rep != nil {
		t.Errorf("room for 800 octets refused: %v", rep)
	}
	if st.scans != scans {
		t.Errorf("usage measured again within its TTL")
	}
	if rep := tr.Check("nobody@x.test", 0); rep == nil || rep.Code != 550 || rep.Enhanced != (mta.Enhanced{5, 1, 1}) {
		t.Errorf("unknown address: %v", rep)
	}
}

func TestDropReturnPath(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"Received: x\r\nSubject: a\r\n\r\nReturn-Path: <body@x>\r\n", ""},
		{"Received: x\r\nReturn-Path: <forged@evil.test>\r\nSubject: a\r\n\r\nbody\r\n", "Received: x\r\nSubject: a\r\n\r\nbody\r\n"},
		{"return-path:\r\n <folded@evil.test>\r\nSubject: a\r\nRETURN-PATH: <b>\r\n\r\nReturn-Path: stays\r\n", "Subject: a\r\n\r\nReturn-Path: stays\r\n"},
		{"Return-Path-Like: x\r\n\r\n", ""},
		{"Received: x\r\nReturn-Path: <a>", "Received: x\r\n"},
		{"Return-Path : <obsolete@evil.test>\r\nSubject: a\r\n\r\nb\r\n", "Subject: a\r\n\r\nb\r\n"},
		{"Subject: a\r\nReturn-Path:\r\n\r\nb\r\n", "Subject: a\r\n\r\nb\r\n"},
		{"Return-Path: <lf@only>\nSubject: a\n\nbody\n", ""},     // no CRLF: left alone, not erased
		{"Subject: a\r\nReturn-Path: <x>\nFoo: b\n\nbody\n", ""}, // a bare LF further on: the same
		{"", ""},
	} {
		got := dropReturnPath([]byte(tc.in))
		if string(got) != tc.want || (tc.want == "" && got != nil) {
			t.Errorf("dropReturnPath(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestTakeWhenFull: an address of TakeWhenFull (the bounce domain's) is
// never refused for a full mailbox, at RCPT or at delivery: the message is
// taken (its report is read at acceptance) and, past the quota, no copy
// is kept. Other addresses are refused as before.
func TestTakeWhenFull(t *testing.T) {
	st := &store{usage: map[string]int64{"bounces": 990, "full": 990}}
	tr := &Transport{Directory: func() Directory { return dir{"@b.test": "bounces", "f@x.test": "full"} },
		Store: st, Quota: 1000, TakeWhenFull: func(a string) bool { return mta.Domain(a) == "b.test" }}
	if rep := tr.Check("any@b.test", 100); rep != nil {
		t.Errorf("a report to the bounce domain refused: %v", rep)
	}
	if rep := tr.Check("f@x.test", 100); rep == nil || rep.Code != 552 {
		t.Errorf("a full mailbox elsewhere: %v", rep)
	}
	c, _ := tr.Connect(context.Background(), nil)
	env := &scheduler.Envelope{ID: "Q1", From: "", Recipients: []mta.Recipient{{Address: "any@b.test"}, {Address: "f@x.test"}}}
	replies, err := c.Send(context.Background(), env, []byte("Subject: x\r\n\r\n"+strings.Repeat("x", 100)+"\r\n"))
	if err != nil {
		t.Fatal(err)
	}
	if replies[0].Code != 250 || replies[1].Code != 452 || len(st.copies) != 0 {
		t.Errorf("replies %v %v, %d copies; want 250 (not kept), 452, none", replies[0], replies[1], len(st.copies))
	}
}
