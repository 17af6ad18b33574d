package server

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mtaproject/mta/bench"
)

// TestA421FromOneMXGoesToTheNext: the preferred MX greets well but answers
// every MAIL with 421 and closes (a host whose back end is down); the
// backup MX works. The mail goes to the backup in its first attempt, as
// Postfix tries the next MX, instead of backing off the destination and
// then meeting the same primary on every retry until it expires.
func TestA421FromOneMXGoesToTheNext(t *testing.T) {
	file := filepath.Join(t.TempDir(), "accounting.log")
	w := newWorld(t, "", "log: {accounting: {file: "+file+"}}\n")
	w.dns.SetMX("two.test", bench.MX{Pref: 10, Host: "mx1.two.test"}, bench.MX{Pref: 20, Host: "mx2.two.test"})
	w.dns.SetA("mx1.two.test", "127.0.0.6")
	w.dns.SetA("mx2.two.test", "127.0.0.7")
	// gmail's MAIL failure is a 421 that closes the connection.
	sick := w.sink("127.0.0.6", bench.SinkConfig{Faults: bench.Faults{MailTempFail: 1}, ReplyStyle: "gmail"})
	good := w.sink("127.0.0.7", bench.SinkConfig{})
	const n = 5
	var ids []string
	for i := range n {
		ids = append(ids, w.send("app@example.org", []string{fmt.Sprintf("u%d@two.test", i)}, msg))
	}
	w.waitFor("all delivered", 15*time.Second, func() bool { return w.srv.Spool().Count() == 0 })
	if got := good.Stats().Messages; got != n {
		t.Errorf("the backup MX got %d messages, want %d", got, n)
	}
	if sick.Stats().TempFails == 0 {
		t.Error("the primary MX was never tried")
	}
	kinds, attempts := readAccountingLog(t, file)
	if kinds["delivery"] != n || kinds["transient_failure"] != 0 {
		t.Errorf("accounting log events %v, want %d deliveries and no deferral", kinds, n)
	}
	for _, a := range attempts {
		if a != 1 {
			t.Errorf("a delivery at attempt %d, want all in the first", a)
		}
	}
}

// TestA421FromEveryMXBacksOff: when every MX answers 421, the mail is
// deferred with the reply, after one try on another host, as before.
func TestA421FromEveryMXBacksOff(t *testing.T) {
	w := newWorld(t, "", "")
	w.dns.SetMX("two.test", bench.MX{Pref: 10, Host: "mx1.two.test"}, bench.MX{Pref: 20, Host: "mx2.two.test"})
	w.dns.SetA("mx1.two.test", "127.0.0.6")
	w.dns.SetA("mx2.two.test", "127.0.0.7")
	a := w.sink("127.0.0.6", bench.SinkConfig{Faults: bench.Faults{MailTempFail: 1}, ReplyStyle: "gmail"})
	b := w.sink("127.0.0.7", bench.SinkConfig{Faults: bench.Faults{MailTempFail: 1}, ReplyStyle: "gmail"})
	id := w.send("app@example.org", []string{"u@two.test"}, msg)
	w.waitFor("a deferral", 10*time.Second, func() bool { return w.recipient(id, "u@two.test").Attempts >= 1 })
	r := w.recipient(id, "u@two.test")
	if !strings.Contains(r.LastReply, "421") || r.Attempts != 1 {
		t.Errorf("recipient %+v, want one attempt deferred with the 421", r)
	}
	if a.Stats().TempFails == 0 || b.Stats().TempFails == 0 {
		t.Errorf("421s from the hosts: %d and %d; want both tried", a.Stats().TempFails, b.Stats().TempFails)
	}
}
