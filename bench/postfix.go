package bench

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Postfix is a private, loopback-only Postfix instance set up by the
// harness in its own directory, relaying everything to one next hop. It
// needs the Debian postfix package (`apt-get install postfix`) and root.
type Postfix struct {
	Dir  string // config, queue and data live here
	SMTP string // the smtpd listener
	etc  string
}

// PostfixAvailable reports why Postfix cannot be run here, or "" if it can.
func PostfixAvailable() string {
	if _, err := exec.LookPath("postfix"); err != nil {
		return "postfix is not installed (apt-get install postfix)"
	}
	if os.Geteuid() != 0 {
		return "running Postfix needs root"
	}
	return ""
}

// StartPostfix configures and starts an instance in dir listening on
// listen (127.0.0.1:port) and relaying all mail to relay
// ("[127.0.0.1]:port"). Everything else is Postfix's defaults, so its
// queue files are fsynced as in production.
func StartPostfix(dir, listen, relay string) (*Postfix, error) {
	if why := PostfixAvailable(); why != "" {
		return nil, fmt.Errorf("%s", why)
	}
	p := &Postfix{Dir: dir, SMTP: listen, etc: filepath.Join(dir, "etc")}
	for _, d := range []string{p.etc, filepath.Join(dir, "spool"), filepath.Join(dir, "data")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	// The postfix user must be able to reach its data directory.
	for d := filepath.Clean(dir); d != "/" && d != "."; d = filepath.Dir(d) {
		if st, err := os.Stat(d); err == nil && st.Mode().Perm()&0o005 != 0o005 {
			_ = os.Chmod(d, st.Mode().Perm()|0o005)
		}
	}
	if err := exec.Command("chown", "postfix", filepath.Join(dir, "data")).Run(); err != nil {
		return nil, fmt.Errorf("chown postfix data dir: %w", err)
	}
	main := fmt.Sprintf(`compatibility_level = 3.6
queue_directory = %[1]s/spool
data_directory = %[1]s/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = bench.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = %[2]s
smtp_dns_support_level = disabled
smtpd_relay_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
local_recipient_maps =
maillog_file_prefixes = /var, /dev/stdout, /tmp, %[1]s
maillog_file = %[1]s/maillog
smtputf8_enable = no
biff = no
message_size_limit = 52428800
# Retry as soon as the mta does in the benchmarks (1 s to 5 s), so that
# scenarios with temporary failures compare like with like.
minimal_backoff_time = 1s
maximal_backoff_time = 5s
queue_run_delay = 1s
`, dir, relay)
	if err := os.WriteFile(filepath.Join(p.etc, "main.cf"), []byte(main), 0o644); err != nil {
		return nil, err
	}
	master, err := masterCF(listen)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(p.etc, "master.cf"), []byte(master), 0o644); err != nil {
		return nil, err
	}
	if err := allowConfigDir(p.etc); err != nil {
		return nil, err
	}
	if out, err := exec.Command("postfix", "-c", p.etc, "start").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("postfix start: %v: %s\n%s", err, out, tail(filepath.Join(dir, "maillog"), 10))
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.DialTimeout("tcp", listen, 200*time.Millisecond); err == nil {
			c.Close()
			return p, nil
		}
		if time.Now().After(deadline) {
			p.Stop()
			return nil, fmt.Errorf("postfix did not listen on %s:\n%s", listen, tail(filepath.Join(dir, "maillog"), 10))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// masterCF is the instance's master.cf, written whole rather than derived
// from the system's (a customised /etc/postfix/master.cf made the
// instance fail to listen): the stock services of Postfix 3.x, none
// chrooted (the instance's queue has no chroot files), and smtpd on
// listen only.
func masterCF(listen string) (string, error) {
	services := [][]string{
		// service type private unpriv chroot wakeup maxproc command
		{listen, "inet", "n", "-", "n", "-", "-", "smtpd"},
		{"pickup", "unix", "n", "-", "n", "60", "1", "pickup"},
		{"cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"},
		{"qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"},
		{"tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"},
		{"rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"},
		{"bounce", "unix", "-", "-", "n", "-", "0", "bounce"},
		{"defer", "unix", "-", "-", "n", "-", "0", "bounce"},
		{"trace", "unix", "-", "-", "n", "-", "0", "bounce"},
		{"verify", "unix", "-", "-", "n", "-", "1", "verify"},
		{"flush", "unix", "n", "-", "n", "1000?", "0", "flush"},
		{"proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"},
		{"proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"},
		{"smtp", "unix", "-", "-", "n", "-", "-", "smtp"},
		{"relay", "unix", "-", "-", "n", "-", "-", "smtp"},
		{"showq", "unix", "n", "-", "n", "-", "-", "showq"},
		{"error", "unix", "-", "-", "n", "-", "-", "error"},
		{"retry", "unix", "-", "-", "n", "-", "-", "error"},
		{"discard", "unix", "-", "-", "n", "-", "-", "discard"},
		{"local", "unix", "-", "n", "n", "-", "-", "local"},
		{"virtual", "unix", "-", "n", "n", "-", "-", "virtual"},
		{"lmtp", "unix", "-", "-", "n", "-", "-", "lmtp"},
		{"anvil", "unix", "-", "-", "n", "-", "1", "anvil"},
		{"scache", "unix", "-", "-", "n", "-", "1", "scache"},
		{"postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"},
	}
	var out strings.Builder
	out.WriteString("# Written by mtabench for its private Postfix instance.\n")
	for _, s := range services {
		out.WriteString(strings.Join(s, "  ") + "\n")
	}
	return out.String(), nil
}

// allowConfigDir lists dir in the default instance's
// alternate_config_directories, which Postfix requires for `postfix -c`.
// Debian's package installed with "No configuration" has no main.cf at
// all: then one is created that turns the default instance's network
// services off, so that the instance a boot may now start listens nowhere.
func allowConfigDir(dir string) error {
	const defaultMain = "/etc/postfix/main.cf"
	if _, err := os.Stat(defaultMain); errors.Is(err, fs.ErrNotExist) {
		stub := "# Written by mtabench, which needs this file to list its private instances\n" +
			"# (alternate_config_directories). The default instance offers no network service.\n" +
			"master_service_disable = inet\n"
		if err := os.WriteFile(defaultMain, []byte(stub), 0o644); err != nil {
			return fmt.Errorf("creating the default instance's %s (absent): %w", defaultMain, err)
		}
	}
	out, _ := exec.Command("postconf", "-h", "alternate_config_directories").Output()
	cur := strings.TrimSpace(string(out))
	if strings.Contains(cur, dir) {
		return nil
	}
	val := dir
	if cur != "" {
		val = cur + ", " + dir
	}
	if out, err := exec.Command("postconf", "-e", "alternate_config_directories = "+val).CombinedOutput(); err != nil {
		return fmt.Errorf("listing %s in %s's alternate_config_directories: %v: %s", dir, defaultMain, err, bytes.TrimSpace(out))
	}
	return nil
}

// Stop stops the instance and waits (up to 15 s) for its master process
// to exit, so that its last processes do not take CPU from the next run.
func (p *Postfix) Stop() error {
	pid := 0
	if b, err := os.ReadFile(filepath.Join(p.Dir, "spool", "pid", "master.pid")); err == nil {
		pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	err := exec.Command("postfix", "-c", p.etc, "stop").Run()
	for deadline := time.Now().Add(15 * time.Second); pid > 0 && time.Now().Before(deadline); {
		if syscall.Kill(pid, 0) != nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	return err
}

// Queued returns the number of messages in the instance's queue.
func (p *Postfix) Queued() int {
	n := 0
	for _, q := range []string{"incoming", "active", "deferred", "hold", "maildrop"} {
		_ = filepath.Walk(filepath.Join(p.Dir, "spool", q), func(_ string, info os.FileInfo, err error) error {
			if err == nil && info.Mode().IsRegular() {
				n++
			}
			return nil
		})
	}
	return n
}

// Usage returns the CPU time of the instance's processes: the master,
// its living children, and the children it has reaped. PeakRSS is the sum
// of the peak RSS of the living processes.
func (p *Postfix) Usage() (Usage, error) {
	pidb, err := os.ReadFile(filepath.Join(p.Dir, "spool", "pid", "master.pid"))
	if err != nil {
		return Usage{}, err
	}
	master, _ := strconv.Atoi(strings.TrimSpace(string(pidb)))
	return treeUsage(master)
}

// treeUsage sums CPU over a process, its descendants, and the children it
// has reaped (cutime, cstime).
func treeUsage(root int) (Usage, error) {
	parents := map[int]int{}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return Usage{}, err
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		f := strings.Fields(string(st[strings.LastIndexByte(string(st), ')')+2:]))
		if len(f) > 1 {
			parents[pid], _ = strconv.Atoi(f[1])
		}
	}
	inTree := func(pid int) bool {
		for i := 0; i < 64 && pid > 1; i++ {
			if pid == root {
				return true
			}
			pid = parents[pid]
		}
		return false
	}
	var total Usage
	for pid := range parents {
		if !inTree(pid) {
			continue
		}
		u, err := ProcUsage(pid)
		if err != nil {
			continue
		}
		total.CPU += u.CPU
		total.PeakRSS += u.PeakRSS
	}
	// Reaped children of the master.
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", root))
	if err == nil {
		f := strings.Fields(string(st[strings.LastIndexByte(string(st), ')')+2:]))
		if len(f) > 14 {
			cu, _ := strconv.ParseInt(f[13], 10, 64)
			cs, _ := strconv.ParseInt(f[14], 10, 64)
			total.CPU += time.Duration(cu+cs) * time.Second / 100
		}
	}
	return total, nil
}

func tail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	return strings.Join(lines, "\n")
}
