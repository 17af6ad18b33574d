package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/mtaproject/mta/bench"
)

// mtaCmd runs the binary with args and returns its combined output.
func mtaCmd(t *testing.T, wantOK bool, args ...string) string {
	t.Helper()
	out, err := exec.Command(mtaBinary(t), args...).CombinedOutput()
	if (err == nil) != wantOK {
		t.Fatalf("mta %s: err=%v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestQueueCommandsAgainstRunningServer drives `mta queue` against a
// running `mta serve` over its admin API.
func TestQueueCommandsAgainstRunningServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	p := startMTA(t, t.TempDir(), "")
	for i := 0; i < 3; i++ {
		c, err := smtp.Dial(p.SMTP)
		if err != nil {
			t.Fatal(err)
		}
		err = c.SendMail("app@example.org", []string{"a@one.test", "b@two.test"}, strings.NewReader("Subject: cli\r\n\r\nbody\r\n"))
		c.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	admin := "--admin=http://" + p.HTTP
	ls := mtaCmd(t, true, "queue", "ls", admin)
	lines := strings.Split(strings.TrimSpace(ls), "\n")
	if len(lines) != 5 || !strings.HasPrefix(lines[0], "ID") || lines[4] != "3 messages" {
		t.Fatalf("queue ls:\n%s", ls)
	}
	id := strings.Fields(lines[1])[0]
	show := mtaCmd(t, true, "queue", "show", id, admin)
	for _, want := range []string{"id:        " + id, "from:      app@example.org", "a@one.test", "b@two.test", "queued"} {
		if !strings.Contains(show, want) {
			t.Errorf("queue show lacks %q:\n%s", want, show)
		}
	}
	if out := mtaCmd(t, true, "queue", "hold", id, admin); out != id+": held\n" {
		t.Fatalf("hold: %q", out)
	}
	if ls := mtaCmd(t, true, "queue", "ls", admin); !strings.Contains(ls, id) || !strings.Contains(ls, "held") {
		t.Fatalf("held message not shown as held:\n%s", ls)
	}
	if out := mtaCmd(t, false, "queue", "flush", id, admin); !strings.Contains(out, "held") || strings.Contains(out, "due now") {
		t.Fatalf("flush of a held message: %q, want it refused as held", out)
	}
	mtaCmd(t, true, "queue", "release", id, admin)
	if ls := mtaCmd(t, true, "queue", "ls", admin); strings.Contains(ls, "held") {
		t.Fatalf("released message still held:\n%s", ls)
	}
	if out := mtaCmd(t, true, "queue", "flush", admin); !strings.HasSuffix(out, " due now\n") {
		t.Fatalf("flush: %q", out)
	}
	mtaCmd(t, true, "queue", "rm", id, admin)
	if ls := mtaCmd(t, true, "queue", "ls", admin); strings.Contains(ls, id) || !strings.Contains(ls, "2 messages") {
		t.Fatalf("removed message still listed:\n%s", ls)
	}
	if out := mtaCmd(t, false, "queue", "show", id, admin); !strings.Contains(out, "no such message") {
		t.Fatalf("show of a removed message: %q", out)
	}
	if out := mtaCmd(t, false, "queue", "hold", "not-an-id", admin); !strings.Contains(out, "not a queue ID") {
		t.Fatalf("hold of a bad ID: %q", out)
	}

	// Health, readiness and metrics.
	if code, body := httpGet(t, "http://"+p.HTTP+"/healthz"); code != 200 || body != "ok\n" {
		t.Fatalf("/healthz: %d %q", code, body)
	}
	if code, body := httpGet(t, "http://"+p.HTTP+"/readyz"); code != 200 || body != "ready\n" {
		t.Fatalf("/readyz: %d %q", code, body)
	}
	_, metrics := httpGet(t, "http://"+p.HTTP+"/metrics")
	for _, want := range []string{
		`mta_smtpd_messages_accepted_total{listener="smtp"} 3`,
		`mta_smtpd_connections_total{listener="smtp"} 3`,
		"mta_spool_messages 2",
		"mta_spool_commit_duration_seconds_count 3",
		"mta_spool_healthy 1",
		"mta_smtpd_bytes_accepted_total",
		"mta_spool_wal_fsyncs_total",
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	// A graceful stop exits 0 and says so.
	if err := p.Stop(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	if !logHas(p, `"msg":"mta stopped"`) {
		t.Fatalf("no stop log line:\n%s", p.Log())
	}
}

func TestBadConfigNamesTheField(t *testing.T) {
	path := filepath.Join(t.TempDir(), "bad.yaml")
	os.WriteFile(path, []byte("smtp:\n  max_recipients: -3\n"), 0o600)
	out := mtaCmd(t, false, "serve", "--config", path)
	if !strings.Contains(out, "smtp.max_recipients: must be greater than zero, got -3") {
		t.Fatalf("serve with a bad config: %q", out)
	}
	out = mtaCmd(t, false, "config", "check", "--config", path)
	if !strings.Contains(out, "smtp.max_recipients") {
		t.Fatalf("config check: %q", out)
	}
	os.WriteFile(path, []byte("smtp:\n  max_recipients: 10\n"), 0o600)
	if out := mtaCmd(t, true, "config", "check", path); out != "configuration ok\n" {
		t.Fatalf("config check of a good file: %q", out)
	}
}

func TestQueueCommandWithoutServer(t *testing.T) {
	out := mtaCmd(t, false, "queue", "ls", "--admin=http://127.0.0.1:1")
	if !strings.Contains(out, "is `mta serve` running?") {
		t.Fatalf("queue ls without a server: %q", out)
	}
}

func TestVersionAndUserHash(t *testing.T) {
	if out := mtaCmd(t, true, "version"); !strings.HasPrefix(out, "mta ") {
		t.Fatalf("version: %q", out)
	}
	cmd := exec.Command(mtaBinary(t), "user", "hash")
	cmd.Stdin = strings.NewReader("s3cret\n")
	out, err := cmd.Output()
	if err != nil || !strings.HasPrefix(string(out), "$2a$") {
		t.Fatalf("user hash: %q %v", out, err)
	}
}

// TestFullDiskGets452 runs the server with a free-space reserve no disk
// can meet: new mail is refused with 452 4.3.1 and nothing is stored.
func TestFullDiskGets452(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	p := startMTA(t, t.TempDir(), "spool:\n  min_free_space: 1000TiB\n")
	c, err := smtp.Dial(p.SMTP)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Mail("app@example.org", nil)
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code != 452 || se.EnhancedCode != (smtp.EnhancedCode{4, 3, 1}) {
		t.Fatalf("MAIL with the disk below the reserve: %v", err)
	}
	if _, body := httpGet(t, "http://"+p.HTTP+"/metrics"); !strings.Contains(body, `mta_smtpd_rejections_total{listener="smtp",reason="storage_full"} 1`) {
		t.Fatal("storage_full rejection not counted")
	}
}

// TestAdminToken: with admin.token_file set, the queue commands need the
// token; metrics and health stay open.
func TestAdminToken(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	tokenFile := filepath.Join(t.TempDir(), "admin.token")
	os.WriteFile(tokenFile, []byte("s3cret-token-0123\n"), 0o600)
	p := startMTA(t, t.TempDir(), "admin: {token_file: "+tokenFile+"}\n")
	admin := "--admin=http://" + p.HTTP
	if out := mtaCmd(t, false, "queue", "ls", admin); !strings.Contains(out, "token missing or wrong") {
		t.Fatalf("queue ls without the token: %q", out)
	}
	if out := mtaCmd(t, false, "queue", "ls", admin, "--admin-token=wrong"); !strings.Contains(out, "token missing or wrong") {
		t.Fatalf("queue ls with a wrong token: %q", out)
	}
	if out := mtaCmd(t, true, "queue", "ls", admin, "--admin-token=s3cret-token-0123"); !strings.Contains(out, "0 messages") {
		t.Fatalf("queue ls with the token: %q", out)
	}
	if code, _ := httpGet(t, "http://"+p.HTTP+"/metrics"); code != 200 {
		t.Fatalf("/metrics needs no token, got %d", code)
	}
}

// TestQueueOutputEscapesControlCharacters: what a client or a remote
// server wrote cannot reach the operator's terminal as escape sequences.
func TestQueueOutputEscapesControlCharacters(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	p := startMTA(t, t.TempDir(), "")
	c, err := smtp.Dial(p.SMTP)
	if err != nil {
		t.Fatal(err)
	}
	// U+009B is CSI, the C1 form of ESC [; U+202E reverses the text.
	evilHelo, evilFrom := "h\u009b2J\u202eost", "a\u009b31mb@example.org"
	if err := c.Hello(evilHelo); err != nil {
		t.Fatal(err)
	}
	err = c.SendMail(evilFrom, []string{"b@two.test"}, strings.NewReader("Subject: x\r\n\r\nbody\r\n"))
	c.Close()
	if err != nil {
		t.Fatal(err)
	}
	admin := "--admin=http://" + p.HTTP
	ls := mtaCmd(t, true, "queue", "ls", admin)
	id := strings.Fields(strings.Split(ls, "\n")[1])[0]
	show := mtaCmd(t, true, "queue", "show", id, admin)
	for name, out := range map[string]string{"ls": ls, "show": show} {
		if strings.ContainsAny(out, "\u009b\u202e\x1b") {
			t.Errorf("queue %s prints control characters raw:\n%q", name, out)
		}
		if !strings.Contains(out, `a\x9b31mb@example.org`) {
			t.Errorf("queue %s does not show the escaped sender:\n%s", name, out)
		}
	}
	if !strings.Contains(show, "(h_2J_ost)") { // the SMTP edge keeps HELO names ASCII
		t.Errorf("queue show does not show the HELO name made ASCII:\n%s", show)
	}
}

// TestQueueBounce: `mta queue bounce ID` fails a deferred message's
// recipients now; the sender gets one notice, the message leaves the
// queue, and the notice is counted and logged.
func TestQueueBounce(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	busy := startSink(t, bench.SinkConfig{Faults: bench.Faults{RcptTempFail: 1}})
	senders := startSink(t, bench.SinkConfig{Keep: true})
	hostOf := func(s *bench.Sink) string { return `["[` + strings.Replace(s.Addr(), ":", "]:", 1) + `"]` }
	p := startMTA(t, t.TempDir(), "dns: {servers: [\"127.0.0.1:1\"]}\n"+
		"routes: {\"example.org\": {hosts: "+hostOf(senders)+", tls: none}, \"*\": {hosts: "+hostOf(busy)+", tls: none}}\n")
	c, err := smtp.Dial(p.SMTP)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Mail("app@example.org", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("someone@busy.test", nil); err != nil {
		t.Fatal(err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(w, "Subject: bounce me\r\n\r\nx\r\n")
	resp, err := w.CloseWithResponse()
	if err != nil {
		t.Fatal(err)
	}
	id := strings.TrimPrefix(resp.StatusText, "2.0.0 Ok: queued as ")
	adminFlag := "--admin=http://" + p.HTTP
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(mtaCmd(t, true, "queue", "show", id, adminFlag), "452 4.2.2") {
		if time.Now().After(deadline) {
			t.Fatal("the message was never deferred")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if out := mtaCmd(t, true, "queue", "bounce", id, adminFlag); !strings.Contains(out, id+": bounced") {
		t.Fatalf("queue bounce said %q", out)
	}
	for len(senders.Messages()) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no notice reached the sender")
		}
		time.Sleep(50 * time.Millisecond)
	}
	n := senders.Messages()[0]
	text := strings.Join(strings.Fields(string(n.Data)), " ")
	if n.From != "" || n.To[0] != "app@example.org" || !strings.Contains(text, "Returned to the sender by the mail administrator") ||
		!strings.Contains(string(n.Data), "Final-Recipient: rfc822; someone@busy.test") {
		t.Fatalf("notice %+v\n%s", n, n.Data)
	}
	if out := mtaCmd(t, true, "queue", "ls", adminFlag); strings.Contains(out, id) {
		t.Errorf("the bounced message is still listed:\n%s", out)
	}
	if v, err := p.Metric(`mta_dsn_generated_total{action="failed"}`); err != nil || v != 1 {
		t.Errorf("mta_dsn_generated_total{action=failed} = %v, %v", v, err)
	}
	if !logHas(p, `"msg":"notification made","id":"`+id+`"`, `"action":"bounce"`) {
		t.Errorf("the notice or the operator action was not logged:\n%s", p.Log())
	}
	mtaCmd(t, false, "queue", "bounce", "06H3XXXXXXXXXXXX", adminFlag) // unknown ID: an error
}

// TestUserCommandsAndLiveReload: `mta user add/passwd/rm/ls` edit the users
// file in place (comments kept), and the running server follows within
// seconds: a new user's address takes mail and its password opens POP3,
// a changed password replaces the old one, a removed user's address is
// refused at RCPT.
func TestUserCommandsAndLiveReload(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	dir := t.TempDir()
	users := filepath.Join(dir, "users")
	os.WriteFile(users, []byte("# managed by mta user\n"), 0o600)
	cfgFile := filepath.Join(dir, "mta.yaml")
	extra := "local_domains: [local.test]\nauth: {users_file: " + users + "}\n"
	os.WriteFile(cfgFile, []byte(extra), 0o600)
	p := startMTA(t, t.TempDir(), extra)
	userCmd := func(wantOK bool, stdin string, args ...string) string {
		t.Helper()
		cmd := exec.Command(mtaBinary(t), append([]string{"user"}, args...)...)
		cmd.Stdin = strings.NewReader(stdin)
		out, err := cmd.CombinedOutput()
		if (err == nil) != wantOK {
			t.Fatalf("mta user %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	rcpt := func(addr string) string {
		t.Helper()
		c, err := smtp.Dial(p.SMTP)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Mail("x@example.net", nil); err != nil {
			t.Fatal(err)
		}
		if err := c.Rcpt(addr, nil); err != nil {
			return err.Error()
		}
		return "ok"
	}
	pop3Login := func(pass string) string {
		t.Helper()
		c, err := net.Dial("tcp", p.POP3)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		r := bufio.NewReader(c)
		r.ReadString('\n')
		fmt.Fprintf(c, "USER carol\r\nPASS %s\r\n", pass)
		r.ReadString('\n')
		line, _ := r.ReadString('\n')
		fmt.Fprint(c, "QUIT\r\n")
		return line
	}
	eventually := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("the running server did not follow: %s", what)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	if got := rcpt("carol@local.test"); !strings.Contains(got, "550") {
		t.Fatalf("before the user exists: %q", got)
	}
	userCmd(true, "first-pass\n", "add", "carol", "--address", "carol@local.test,info@local.test", "--config", cfgFile)
	userCmd(false, "again\n", "add", "carol", "--config", cfgFile) // exists
	eventually("a new user's address takes mail", func() bool { return rcpt("info@local.test") == "ok" })
	if got := pop3Login("first-pass"); !strings.HasPrefix(got, "+OK") {
		t.Fatalf("POP3 login as the new user: %q", got)
	}
	userCmd(true, "second-pass\n", "passwd", "carol", "--file", users)
	eventually("the new password opens POP3", func() bool { return strings.HasPrefix(pop3Login("second-pass"), "+OK") })
	if got := pop3Login("first-pass"); !strings.HasPrefix(got, "-ERR [AUTH]") {
		t.Errorf("the old password still works: %q", got)
	}
	if v, err := p.Metric(`mta_pop3_logins_total{listener="pop3",result="failure"}`); err != nil || v < 1 {
		t.Errorf("failed POP3 logins counted: %v, %v", v, err)
	}
	if !logHas(p, `"msg":"pop3 login","listener":"pop3","user":"carol","client_ip":"127.0.0.1","result":"failure"`) {
		t.Errorf("the failed login was not logged")
	}
	if out := userCmd(true, "", "ls", "--file", users); !strings.Contains(out, "carol") || !strings.Contains(out, "carol@local.test,info@local.test") || strings.Contains(out, "$2a$") {
		t.Errorf("user ls:\n%s", out)
	}
	userCmd(true, "", "rm", "carol", "--file", users)
	userCmd(false, "", "rm", "carol", "--file", users) // gone already
	eventually("a removed user's address is refused", func() bool { return strings.Contains(rcpt("carol@local.test"), "550") })
	if data, _ := os.ReadFile(users); !strings.HasPrefix(string(data), "# managed by mta user\n") {
		t.Errorf("the comment was lost:\n%s", data)
	}
	if fi, _ := os.Stat(users); fi.Mode().Perm() != 0o600 {
		t.Errorf("users file mode %v", fi.Mode().Perm())
	}
}

// TestEveryCommandHasHelp: --help on any command or subcommand prints its
// usage and exits 0.
func TestEveryCommandHasHelp(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"help"}, {"serve", "--help"}, {"queue", "--help"}, {"queue", "ls", "--help"},
		{"queue", "bounce", "-h"}, {"user", "--help"}, {"user", "add", "--help"}, {"config", "--help"}, {"config", "check", "--help"}} {
		out := mtaCmd(t, true, args...)
		if !strings.Contains(strings.ToLower(out), "usage") {
			t.Errorf("mta %v: %q", args, out)
		}
	}
	if out := mtaCmd(t, true, "queue", "--help"); !strings.Contains(out, "mta queue bounce ID") || strings.Contains(out, "mta serve") {
		t.Errorf("queue --help:\n%s", out)
	}
}

// TestQueueFiltersAndBulkActions: ls filters and --json, and hold,
// release, rm and bounce by filter, against a running server's queue.
func TestQueueFiltersAndBulkActions(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	p := startMTA(t, t.TempDir(), "") // delivery off: the queue stays
	send := func(from, to string) {
		t.Helper()
		c, err := smtp.Dial(p.SMTP)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.SendMail(from, []string{to}, strings.NewReader("Subject: q\r\n\r\nx\r\n")); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 3; i++ {
		send("app@example.org", fmt.Sprintf("u%d@a.test", i))
	}
	send("other@example.net", "v@b.test")
	send("other@example.net", "w@b.test")
	admin := "--admin=http://" + p.HTTP
	count := func(args ...string) int {
		t.Helper()
		out := mtaCmd(t, true, append([]string{"queue", "ls", admin}, args...)...)
		var n int
		fmt.Sscanf(out[strings.LastIndex(strings.TrimSpace(out), "\n")+1:], "%d messages", &n)
		return n
	}
	if n := count("--domain", "a.test"); n != 3 {
		t.Errorf("--domain a.test: %d", n)
	}
	if n := count("--sender", "@example.net"); n != 2 {
		t.Errorf("--sender @example.net: %d", n)
	}
	out := mtaCmd(t, true, "queue", "ls", admin, "--json", "--domain", "b.test")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	for _, l := range lines {
		var m struct{ ID, From, State string }
		if err := json.Unmarshal([]byte(l), &m); err != nil || m.From != "other@example.net" || m.State != "queued" {
			t.Errorf("--json line %q: %+v %v", l, m, err)
		}
	}
	if len(lines) != 2 {
		t.Errorf("--json gave %d lines", len(lines))
	}
	shape := mtaCmd(t, true, "queue", "shape", admin)
	lines = strings.Split(strings.TrimSpace(shape), "\n")
	if len(lines) != 4 || !strings.Contains(lines[0], "DESTINATION") || !strings.Contains(lines[0], "1280m+") ||
		!regexp.MustCompile(`^\s*TOTAL\s+5\s+5\s`).MatchString(lines[1]) || !regexp.MustCompile(`^\s*a\.test\s+3\s+3\s`).MatchString(lines[2]) ||
		!regexp.MustCompile(`^\s*b\.test\s+2\s+2\s`).MatchString(lines[3]) {
		t.Errorf("queue shape:\n%s", shape)
	}
	if out := mtaCmd(t, true, "queue", "shape", admin, "--top", "1", "--json"); !strings.Contains(out, `"others":{"domain":"(others)","total":2`) {
		t.Errorf("shape --top 1 --json: %s", out)
	}
	if out := mtaCmd(t, true, "queue", "hold", admin, "--domain", "a.test"); !strings.Contains(out, "3 messages held") {
		t.Errorf("hold by domain: %q", out)
	}
	if n := count("--state", "held"); n != 3 {
		t.Errorf("held: %d", n)
	}
	// Counted are the messages changed, as postsuper -H says: holding all
	// holds the 2 others, not 5.
	if out := mtaCmd(t, true, "queue", "hold", admin, "--all"); !strings.Contains(out, "2 messages held") {
		t.Errorf("hold --all with 3 held already: %q", out)
	}
	if out := mtaCmd(t, true, "queue", "release", admin, "--domain", "b.test"); !strings.Contains(out, "2 messages released") {
		t.Errorf("release by domain: %q", out)
	}
	if out := mtaCmd(t, true, "queue", "release", admin, "--all"); !strings.Contains(out, "3 messages released") {
		t.Errorf("release by state: %q", out)
	}
	if out := mtaCmd(t, true, "queue", "rm", admin, "--sender", "other@example.net"); !strings.Contains(out, "2 messages removed") {
		t.Errorf("rm by sender: %q", out)
	}
	if out := mtaCmd(t, true, "queue", "bounce", admin, "--older-than", "0s", "--domain", "a.test"); !strings.Contains(out, "3 messages bounced") {
		t.Errorf("bounce by domain: %q", out)
	}
	if n := count("--sender", "<>"); n != 3 {
		t.Errorf("after bouncing 3, %d notices queued", n)
	}
	if out := mtaCmd(t, false, "queue", "rm", admin); !strings.Contains(out, "want one queue ID") {
		t.Errorf("rm without an ID or filters: %q", out)
	}
	if out := mtaCmd(t, false, "queue", "ls", admin, "--state", "active"); !strings.Contains(out, "state: want queued, deferred or held") {
		t.Errorf("a bad state: %q", out)
	}
	mtaCmd(t, true, "queue", "rm", admin, "--all")
	if n := count(); n != 0 {
		t.Errorf("after rm --all: %d messages", n)
	}
}

// TestDestLs: `mta dest ls` shows a destination that refuses connections
// as backed off, with the error.
func TestDestLs(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	p := startMTA(t, t.TempDir(), "dns: {servers: [\"127.0.0.1:1\"]}\ndelivery: {min_backoff: 1s, max_backoff: 2s}\n"+
		"routes: {\"*\": {hosts: [\"[127.0.0.1]:1\"], tls: none}}\n")
	c, err := smtp.Dial(p.SMTP)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SendMail("app@example.org", []string{"x@dead.test"}, strings.NewReader("Subject: d\r\n\r\nx\r\n")); err != nil {
		t.Fatal(err)
	}
	c.Close()
	admin := "--admin=http://" + p.HTTP
	deadline := time.Now().Add(10 * time.Second)
	var out string
	for {
		out = mtaCmd(t, true, "dest", "ls", admin)
		if strings.Contains(out, "backed off until") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("dest ls never showed the backoff:\n%s", out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !strings.Contains(out, "route:[127.0.0.1]:1") || !strings.Contains(out, "connection refused") || !strings.Contains(out, "1 destinations") {
		t.Errorf("dest ls:\n%s", out)
	}
	js := mtaCmd(t, true, "dest", "ls", admin, "--json")
	var got struct {
		Destinations []struct {
			Key       string
			BackedOff bool `json:"backed_off"`
			Failures  int
		}
	}
	if err := json.Unmarshal([]byte(js), &got); err != nil || len(got.Destinations) != 1 || !got.Destinations[0].BackedOff || got.Destinations[0].Failures < 1 {
		t.Errorf("dest ls --json: %s (%v)", js, err)
	}
}

// TestDestSuspendAndResume: a suspended domain's mail gets no attempt and
// outlives delivery.max_lifetime without expiring; other domains flow; on
// resume it is delivered at once.
func TestDestSuspendAndResume(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	sink := startSink(t, bench.SinkConfig{Keep: true})
	p := startMTA(t, t.TempDir(), "dns: {servers: [\"127.0.0.1:1\"]}\ndelivery: {min_backoff: 1s, max_backoff: 2s, max_lifetime: 2s}\n"+
		"routes: {\"*\": {hosts: [\"["+strings.Replace(sink.Addr(), ":", "]:", 1)+"\"], tls: none}}\n")
	admin := "--admin=http://" + p.HTTP
	if out := mtaCmd(t, true, "dest", "suspend", "held.test", admin); !strings.Contains(out, "held.test: suspended until resumed") {
		t.Fatalf("suspend: %q", out)
	}
	c, err := smtp.Dial(p.SMTP)
	if err != nil {
		t.Fatal(err)
	}
	for _, to := range []string{"a@held.test", "b@free.test"} {
		if err := c.SendMail("app@free.test", []string{to}, strings.NewReader("Subject: s\r\n\r\nx\r\n")); err != nil {
			t.Fatal(err)
		}
	}
	c.Close()
	time.Sleep(4 * time.Second) // twice the lifetime
	to := func() []string {
		var all []string
		for _, m := range sink.Messages() {
			all = append(all, m.To...)
		}
		return all
	}
	if got := strings.Join(to(), ","); got != "b@free.test" {
		t.Fatalf("while held.test is suspended the sink got %q, want only b@free.test (and no bounce)", got)
	}
	if out := mtaCmd(t, true, "dest", "ls", admin); !strings.Contains(out, "suspended: held.test until resumed") {
		t.Errorf("dest ls:\n%s", out)
	}
	if out := mtaCmd(t, true, "queue", "ls", admin, "--domain", "held.test"); !strings.Contains(out, "1 message\n") {
		t.Errorf("the suspended mail expired:\n%s", out)
	}
	mtaCmd(t, true, "dest", "resume", "held.test", admin)
	if out := mtaCmd(t, false, "dest", "resume", "held.test", admin); !strings.Contains(out, "held.test is not suspended") {
		t.Errorf("resume of a domain not suspended: %q", out)
	}
	if out := mtaCmd(t, false, "dest", "suspend", "x.test", "--for", "-1h", admin); !strings.Contains(out, "--for must be positive") {
		t.Errorf("a negative --for: %q", out)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(strings.Join(to(), ","), "a@held.test") {
		if time.Now().After(deadline) {
			t.Fatalf("after resume the sink got %v", to())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestQueueFlushByIDAndFilter: `queue flush --domain D` and `queue flush
// ID` make only the mail they select due now, ending the destination's
// backoff so that it is tried at once; the rest keeps waiting.
func TestQueueFlushByIDAndFilter(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	p := startMTA(t, t.TempDir(), "dns: {servers: [\"127.0.0.1:1\"]}\ndelivery: {min_backoff: 1h, max_backoff: 2h}\n"+
		"routes: {\"*\": {hosts: [\"[127.0.0.1]:1\"], tls: none}}\n")
	for _, to := range []string{"x@a.test", "y@b.test"} {
		c, err := smtp.Dial(p.SMTP)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.SendMail("app@example.org", []string{to}, strings.NewReader("Subject: f\r\n\r\nx\r\n")); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	admin := "--admin=http://" + p.HTTP
	type state struct {
		id       string
		attempts int
		next     time.Time
	}
	states := func() map[string]state {
		t.Helper()
		out := map[string]state{}
		for _, l := range strings.Split(strings.TrimSpace(mtaCmd(t, true, "queue", "ls", admin, "--json")), "\n") {
			var m struct {
				ID         string
				State      string
				Recipients []struct {
					Address     string
					Attempts    int
					NextAttempt *time.Time `json:"next_attempt"`
				}
			}
			if err := json.Unmarshal([]byte(l), &m); err != nil || len(m.Recipients) != 1 {
				t.Fatalf("queue ls --json line %q: %v", l, err)
			}
			r := m.Recipients[0]
			st := state{id: m.ID, attempts: r.Attempts}
			if r.NextAttempt != nil && m.State == "deferred" {
				st.next = *r.NextAttempt
			}
			out[r.Address] = st
		}
		return out
	}
	waitUntil := func(what string, cond func(map[string]state) bool) map[string]state {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for {
			s := states()
			if cond(s) {
				return s
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %+v\n%s", what, s, p.Log())
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	later := func(s state) bool { return time.Until(s.next) > 30*time.Minute }
	before := waitUntil("both deferred for the backoff", func(s map[string]state) bool {
		return len(s) == 2 && later(s["x@a.test"]) && later(s["y@b.test"])
	})

	if out := mtaCmd(t, true, "queue", "flush", admin, "--domain", "a.test"); !strings.Contains(out, "1 message due now") {
		t.Fatalf("flush --domain a.test: %q", out)
	}
	after := waitUntil("a.test tried again", func(s map[string]state) bool {
		return s["x@a.test"].attempts == before["x@a.test"].attempts+1 && later(s["x@a.test"])
	})
	if after["y@b.test"] != before["y@b.test"] {
		t.Errorf("flushing a.test changed b.test's mail: %+v, was %+v", after["y@b.test"], before["y@b.test"])
	}

	id := after["y@b.test"].id
	if out := mtaCmd(t, true, "queue", "flush", admin, id); !strings.Contains(out, id+": due now") {
		t.Fatalf("flush %s: %q", id, out)
	}
	final := waitUntil("b.test tried again", func(s map[string]state) bool {
		return s["y@b.test"].attempts == before["y@b.test"].attempts+1 && later(s["y@b.test"])
	})
	if final["x@a.test"] != after["x@a.test"] {
		t.Errorf("flushing %s changed a.test's mail: %+v, was %+v", id, final["x@a.test"], after["x@a.test"])
	}
	if out := mtaCmd(t, false, "queue", "flush", admin, "0000000000000000"); !strings.Contains(out, "no such message") {
		t.Errorf("flush of an unknown ID: %q", out)
	}
}

func TestDialableListenAddress(t *testing.T) {
	for in, want := range map[string]string{":9725": "127.0.0.1:9725", "0.0.0.0:9725": "127.0.0.1:9725", "[::]:9725": "[::1]:9725",
		"127.0.0.2:9725": "127.0.0.2:9725", "[::1]:9725": "[::1]:9725"} {
		if got := dialable(in); got != want {
			t.Errorf("dialable(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestQueueListJSONListsEveryMessage: with more than a page (1000) queued,
// `queue ls --json`, which scripts read, lists every message, as
// postqueue -j does; the text listing stops at 1000 and says so.
func TestQueueListJSONListsEveryMessage(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	p := startMTA(t, t.TempDir(), "")
	const n = 1010
	res, err := bench.RunLoad(context.Background(), bench.LoadConfig{Addr: p.SMTP, Sessions: 10, Messages: n, Size: 300,
		Domains: []string{"one.test"}, Pipelining: true, Seed: 3})
	if err != nil || res.Accepted != n {
		t.Fatalf("load: %d accepted, %v", res.Accepted, err)
	}
	admin := "--admin=http://" + p.HTTP
	if lines := strings.Count(mtaCmd(t, true, "queue", "ls", admin, "--json"), "\n"); lines != n {
		t.Errorf("queue ls --json: %d lines, want %d", lines, n)
	}
	if out := mtaCmd(t, true, "queue", "ls", admin); !strings.Contains(out, "... more: use --all") {
		t.Errorf("queue ls with more than 1000: no note of the rest in\n%s", out[max(0, len(out)-300):])
	}
}

// TestCommandsRefuseWhatTheyWouldIgnore: a stray argument or a negative
// age is an error, not a listing of the whole queue or a server started
// as if it were not there.
func TestCommandsRefuseWhatTheyWouldIgnore(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"queue", "ls", "06H3YBJ5E0DFX08C", "--admin=http://127.0.0.1:1"}, `queue ls: unexpected "06H3YBJ5E0DFX08C"`},
		{[]string{"queue", "ls", "--older-than", "-5h", "--admin=http://127.0.0.1:1"}, "--older-than -5h0m0s: want a duration of zero or more"},
		{[]string{"serve", "--config", "/nope.yaml", "extra"}, `serve: unexpected "extra"`},
		{[]string{"queue", "show", "", "--admin=http://127.0.0.1:1"}, "queue show: want one queue ID"},
		{[]string{"dest", "suspend", "", "--admin=http://127.0.0.1:1"}, "dest suspend: want one domain"},
	} {
		if out := mtaCmd(t, false, tc.args...); !strings.Contains(out, tc.want) {
			t.Errorf("mta %v: %q, want %q", tc.args, out, tc.want)
		}
	}
}
