package server

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/mtaproject/mta/bench"
)

// TestAccountingLogMatchesWhatArrived: every message the receivers got is
// one "delivery" line of the accounting log with the same queue ID, every
// refusal a "permanent_failure" line, every notice a "bounce" line, every
// message sent a "reception" line; the lines are valid JSON with the
// documented fields.
func TestAccountingLogMatchesWhatArrived(t *testing.T) {
	file := filepath.Join(t.TempDir(), "accounting.log")
	w := newWorld(t, "", "log: {accounting: {file: "+file+"}}\n")
	bounces := w.bounces()
	w.dns.SetA("remote.test", "127.0.0.1")
	sink := w.sink("127.0.0.1", bench.SinkConfig{RcptReplies: map[string]string{"gone@remote.test": "550 5.1.1 gone"}})
	var ids []string
	for _, to := range [][]string{{"a@remote.test"}, {"b@remote.test", "gone@remote.test"}, {"c@remote.test"}} {
		ids = append(ids, w.send("app@example.org", to, "From: app@example.org\r\nMessage-ID: <acct-"+to[0]+">\r\nSubject: x\r\n\r\nx\r\n"))
	}
	w.waitFor("everything delivered", 10*time.Second, func() bool {
		return w.srv.Spool().Count() == 0 && len(bounces.Messages()) == 1
	})
	time.Sleep(200 * time.Millisecond)

	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	type event struct {
		Time, Event, ID, MessageID, Sender, Recipient, Destination, MX, IP, TLS, Enhanced, Reply, DSNID, Action, ClientIP string
		Code, Attempt, Recipients                                                                                         int
		Size                                                                                                              int64
		QueuedFor                                                                                                         float64 `json:"queued_for"`
	}
	byKind := map[string][]event{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var e event
		raw := map[string]any{}
		if err := json.Unmarshal(sc.Bytes(), &raw); err != nil {
			t.Fatalf("not JSON: %q", sc.Text())
		}
		json.Unmarshal(sc.Bytes(), &e)
		e.MessageID, _ = raw["message_id"].(string)
		e.DSNID, _ = raw["dsn_id"].(string)
		e.ClientIP, _ = raw["client_ip"].(string)
		if _, err := time.Parse(time.RFC3339Nano, e.Time); err != nil {
			t.Errorf("time %q: %v", e.Time, err)
		}
		byKind[e.Event] = append(byKind[e.Event], e)
	}
	if got := byKind["reception"]; len(got) != 3 || got[0].ClientIP != "127.0.0.1" || got[0].Sender != "app@example.org" || got[0].MessageID != "<acct-a@remote.test>" || got[0].Size == 0 {
		t.Errorf("reception lines %+v", got)
	}
	// What arrived, by queue ID (our Received: header names it).
	idOf := regexp.MustCompile(` id ([0-9A-Z]{16})`)
	arrived := map[string][]string{}
	for _, s := range []*bench.Sink{sink, bounces} {
		for _, m := range s.Messages() {
			id := string(idOf.FindSubmatch(m.Data)[1])
			arrived[id] = append(arrived[id], m.To...)
		}
	}
	delivered := map[string][]string{}
	for _, e := range byKind["delivery"] {
		delivered[e.ID] = append(delivered[e.ID], e.Recipient)
		if e.Code != 250 || e.IP == "" || e.Attempt != 1 || e.TLS != "none" || e.QueuedFor <= 0 {
			t.Errorf("delivery line %+v", e)
		}
	}
	if len(delivered) != len(arrived) {
		t.Errorf("%d messages delivered in the log, %d arrived", len(delivered), len(arrived))
	}
	for id, to := range arrived {
		if strings.Join(delivered[id], ",") != strings.Join(to, ",") {
			t.Errorf("%s: log says delivered to %v, the receiver got %v", id, delivered[id], to)
		}
	}
	if pf := byKind["permanent_failure"]; len(pf) != 1 || pf[0].ID != ids[1] || pf[0].Recipient != "gone@remote.test" || pf[0].Code != 550 || pf[0].Enhanced != "5.1.1" {
		t.Errorf("permanent failures %+v", pf)
	}
	if b := byKind["bounce"]; len(b) != 1 || b[0].ID != ids[1] || b[0].Action != "failed" || b[0].Recipient != "app@example.org" || b[0].DSNID == "" {
		t.Errorf("bounces %+v", b)
	} else if _, ok := arrived[b[0].DSNID]; !ok {
		t.Errorf("the bounce %s is not what arrived at the sender's server", b[0].DSNID)
	}
}
