package spool

import (
	"encoding/binary"
	"errors"
	"testing"
	"time"

	"github.com/mtaproject/mta/mta"
)

// TestNoticeCommittedWithTheFailure: the notice a failure owes is stored
// in the batch that records the failure and removes the original, and
// announced after the commit; a notifier error leaves everything as it was.
func TestNoticeCommittedWithTheFailure(t *testing.T) {
	var announced []string
	var seen *Transition
	fail := false
	var s *Spool
	s = openTest(t, t.TempDir(), Options{
		Notifier: func(tr *Transition, body func() ([]byte, error)) (*Notice, error) {
			if fail {
				return nil, errors.New("no notice today")
			}
			seen = tr
			b, err := body()
			if err != nil {
				return nil, err
			}
			n := &Message{ID: s.NewID(), Notice: SenderNotice, Recipients: []RecipientState{{}}}
			n.Recipients[0].Address = tr.Message.From
			return &Notice{Message: n, Data: append([]byte("bounce of "), b...)}, nil
		},
		OnNotice: func(id string, domains []string) { announced = append(announced, id+" "+domains[0]) },
	})
	m := newMessage(s, "a@one.test", "b@one.test")
	m.From = "app@example.org"
	if err := s.Put(m, []byte("H: 1\r\n"), []byte("\r\nbody\r\n")); err != nil {
		t.Fatal(err)
	}
	fail = true
	if err := s.Fail(m.ID, []Result{{Address: "a@one.test", Outcome: Outcome{Reply: "550 5.1.1 no"}}}); err == nil {
		t.Fatal("a notifier error did not abandon the failure")
	}
	if got, _ := s.Get(m.ID); got.Recipients[0].Status != Queued || s.Count() != 1 {
		t.Fatalf("after an abandoned failure: %+v, count %d", got.Recipients[0], s.Count())
	}
	fail = false
	res := []Result{
		{Address: "a@one.test", Outcome: Outcome{Reply: "550 5.1.1 no", RemoteMTA: "mx.one.test", Diagnostic: "550 5.1.1 no"}},
		{Address: "b@one.test", Outcome: Outcome{Reply: "550 5.2.2 full", RemoteMTA: "mx.one.test", Diagnostic: "550 5.2.2 full"}},
	}
	if err := s.Fail(m.ID, res); err != nil {
		t.Fatal(err)
	}
	if len(seen.Changed) != 2 || seen.Message.Recipients[1].Diagnostic != "550 5.2.2 full" || seen.Message.Recipients[1].RemoteMTA != "mx.one.test" {
		t.Fatalf("transition %+v", seen)
	}
	if _, err := s.Get(m.ID); err == nil {
		t.Error("the original stayed after its last recipient failed")
	}
	if len(announced) != 1 || s.Count() != 1 {
		t.Fatalf("announced %v, count %d", announced, s.Count())
	}
	var id string
	for i, c := range announced[0] {
		if c == ' ' {
			id = announced[0][:i]
		}
	}
	n, err := s.Get(id)
	if err != nil || n.Notice != SenderNotice || n.Recipients[0].Address != "app@example.org" || n.Recipients[0].Status != Queued {
		t.Fatalf("notice record %+v, %v", n, err)
	}
	if b, _ := s.Body(id); string(b) != "bounce of H: 1\r\n\r\nbody\r\n" {
		t.Errorf("notice bytes %q", b)
	}
	if due, _ := s.Due(time.Now().Add(time.Hour), 10, nil); len(due) != 1 || due[0].ID != id {
		t.Errorf("notice not in the due index: %v", due)
	}
	// A failure of recipients that are no longer queued changes nothing
	// and owes nothing.
	seen = nil
	if err := s.Fail(id, []Result{{Address: "someone@else.test"}}); err != nil || seen != nil {
		t.Errorf("unmatched failure: %v, transition %+v", err, seen)
	}
}

// TestRecordVersion1StillRead: records written before notices existed
// decode, with the new fields empty.
func TestRecordVersion1StillRead(t *testing.T) {
	v1 := []byte{1}
	v1 = binary.AppendUvarint(v1, flagHeld)
	for _, s := range []string{"app@example.org", "env", "FULL", "127.0.0.1", "client.test", ""} {
		v1 = appendString(v1, s)
	}
	v1 = appendTime(v1, time.Unix(100, 0))
	v1 = binary.AppendVarint(v1, 42)
	v1 = binary.AppendUvarint(v1, 1)
	v1 = appendString(v1, "a@one.test")
	v1 = binary.AppendUvarint(v1, 0)
	v1 = appendString(v1, "")
	v1 = appendString(v1, "")
	v1 = append(v1, byte(Queued))
	v1 = binary.AppendUvarint(v1, 3)
	v1 = appendTime(v1, time.Unix(200, 0))
	v1 = appendTime(v1, time.Unix(150, 0))
	v1 = appendString(v1, "451 4.7.1 later")
	m, err := decodeMessage("X", v1)
	if err != nil {
		t.Fatal(err)
	}
	if !m.Held || m.From != "app@example.org" || m.Size != 42 || m.Recipients[0].Attempts != 3 || m.Recipients[0].LastReply != "451 4.7.1 later" || m.Notice != NotNotice {
		t.Fatalf("decoded %+v", m)
	}
	m.Recipients[0].RemoteMTA, m.Recipients[0].DelayNotified, m.Notice = "mx", true, PostmasterNotice
	again, err := decodeMessage("X", m.encode(nil))
	if err != nil || again.Recipients[0].RemoteMTA != "mx" || !again.Recipients[0].DelayNotified || again.Notice != PostmasterNotice {
		t.Fatalf("version 2 round trip: %+v, %v", again, err)
	}
}

// TestSettleFinished: a message an older version kept for its bounce (no
// recipient queued, one failed) is bounced and removed after an upgrade.
func TestSettleFinished(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	m := newMessage(s, "a@one.test")
	if err := s.Put(m, nil, []byte("Subject: x\r\n\r\nx\r\n")); err != nil {
		t.Fatal(err)
	}
	// What the old spool left: the recipient failed, the record kept.
	m.Recipients[0].Status, m.Recipients[0].LastReply = Failed, "550 5.1.1 gone"
	var k keyBuf
	b := s.db.NewBatch()
	deleteDue(b, &Message{ID: m.ID, Recipients: []RecipientState{{Status: Queued, NextAttempt: m.Recipients[0].NextAttempt, Domain: "one.test"}}})
	_ = b.Set(k.message(m.ID), m.encode(nil), nil)
	if err := b.Commit(nil); err != nil {
		t.Fatal(err)
	}
	s.Close()

	var changed []int
	s = openTest(t, dir, Options{Notifier: func(tr *Transition, body func() ([]byte, error)) (*Notice, error) {
		changed = tr.Changed
		n := &Message{ID: "06H3ZZZZZZZZZZZZ", Recipients: []RecipientState{{Recipient: mta.Recipient{Address: tr.Message.From}}}}
		return &Notice{Message: n, Data: []byte("bounce")}, nil
	}})
	if n, err := s.SettleFinished(); err != nil || n != 1 {
		t.Fatalf("SettleFinished: %d, %v", n, err)
	}
	if len(changed) != 1 || changed[0] != 0 {
		t.Errorf("the notifier saw changed %v", changed)
	}
	if _, err := s.Get(m.ID); !errors.Is(err, mta.ErrNotFound) {
		t.Errorf("the finished message is still there: %v", err)
	}
	if n, err := s.Get("06H3ZZZZZZZZZZZZ"); err != nil || n.Recipients[0].Address != "sender@example.org" {
		t.Errorf("its bounce: %+v, %v", n, err)
	}
}

// TestDeliverLocalKeepsTheReserve: mailbox copies are new data; short of
// the free-space reserve they are refused and the message stays queued.
func TestDeliverLocalKeepsTheReserve(t *testing.T) {
	s := openTest(t, t.TempDir(), Options{})
	m := newMessage(s, "a@local.test")
	if err := s.Put(m, nil, []byte("Subject: x\r\n\r\nx\r\n")); err != nil {
		t.Fatal(err)
	}
	s.free.reserve = 1 << 62 // no disk has that
	err := s.DeliverLocal(m.ID, []LocalCopy{{Mailbox: "alice", Recipients: []string{"a@local.test"}}})
	if !errors.Is(err, mta.ErrStorageFull) {
		t.Fatalf("DeliverLocal short of space: %v", err)
	}
	if got, _ := s.Get(m.ID); got.Recipients[0].Status != Queued {
		t.Errorf("the recipient is %v", got.Recipients[0].Status)
	}
	if list, _ := s.MailboxList("alice"); len(list) != 0 {
		t.Errorf("a copy was stored: %v", list)
	}
}
