package server

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/mtaproject/mta/bench"
)

// TestRecipientsPastTheServersLimit: a message to 7 recipients of a domain
// whose server takes 3 in a transaction, over real SMTP, arrives in
// transactions of 3, 3 and 1 on one connection, each recipient delivered
// in the first attempt (the accounting log has no deferral); with RFC
// 821's 552 for it, no recipient is bounced either. A domain's own limit
// per transaction applies to its mail the same way.
func TestRecipientsPastTheServersLimit(t *testing.T) {
	for _, tc := range []struct {
		name, delivery, tooMany string
		serverLimit             int
		want                    []int
	}{
		{"452", "", "452 4.5.3 Too many recipients", 3, []int{3, 3, 1}},
		{"552", "", "552 5.5.3 Too many recipients", 3, []int{3, 3, 1}},
		{"own limit", ", domains: {many.test: {max_recipients_per_transaction: 2}}", "", 0, []int{2, 2, 2, 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "accounting.log")
			w := newWorld(t, tc.delivery, "log: {accounting: {file: "+file+"}}\n")
			w.dns.SetA("many.test", "127.0.0.3")
			s := w.sink("127.0.0.3", bench.SinkConfig{Keep: true, MaxRcpts: tc.serverLimit, TooManyRcptsReply: tc.tooMany})
			var to []string
			for i := range 7 {
				to = append(to, fmt.Sprintf("u%d@many.test", i))
			}
			id := w.send("app@example.org", to, msg)
			w.waitFor("all delivered", 15*time.Second, func() bool { return w.gone(id) })
			var sizes []int
			var got []string
			conns := map[int64]bool{}
			for _, m := range s.Messages() {
				sizes = append(sizes, len(m.To))
				got = append(got, m.To...)
				conns[m.ConnID] = true
			}
			slices.Sort(got)
			if !slices.Equal(sizes, tc.want) || !slices.Equal(got, to) || len(conns) != 1 {
				t.Errorf("transactions of %v recipients over %d connections, recipients %v; want %v on one, %v", sizes, len(conns), got, tc.want, to)
			}
			kinds, attempts := readAccountingLog(t, file)
			for _, a := range attempts {
				if a != 1 {
					t.Errorf("a delivery at attempt %d, want all in the first", a)
				}
			}
			if len(kinds) != 2 || kinds["reception"] != 1 || kinds["delivery"] != 7 {
				t.Errorf("accounting log events %v, want one reception and 7 deliveries", kinds)
			}
		})
	}
}

// readAccountingLog reads the accounting log file: how many events of each
// kind, and the attempt of each delivery.
func readAccountingLog(t *testing.T, file string) (kinds map[string]int, attempts []int) {
	t.Helper()
	time.Sleep(100 * time.Millisecond) // the log's buffer
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	kinds = map[string]int{}
	for sc := bufio.NewScanner(f); sc.Scan(); {
		var e struct {
			Event   string
			Attempt int
		}
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("not JSON: %q", sc.Text())
		}
		kinds[e.Event]++
		if e.Event == "delivery" {
			attempts = append(attempts, e.Attempt)
		}
	}
	return kinds, attempts
}
