package archtest

import (
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/mtaproject/mta"

// allowed lists, for each package of ours, the packages of ours it may
// import directly (tests excepted). A package missing here may import
// nothing of ours but mta and metrics. cmd/* may import anything.
var allowed = map[string][]string{
	"mta":                 {},
	"metrics":             {},
	"spool":               {"mta", "metrics"},
	"scheduler":           {"mta", "mta/dsn", "metrics", "scheduler/conncache"},
	"scheduler/conncache": {"mta", "metrics"},
	"mta/outbound":        {"mta", "mta/resolve", "mta/smtpclient", "scheduler"},
	"mta/mailbox":         {"mta", "scheduler"},
	"mta/resolve":         {"mta", "metrics"},
	"mta/smtpclient":      {"mta", "metrics", "mta/sevenbit"},
	"mta/config":          {"mta"},
	"mta/smtpd":           {"mta", "metrics"},
	"mta/auth":            {},
	"mta/certs":           {},
	"mta/admin":           {"mta", "spool"},
	"mta/server":          {"*"},
	"bench":               {"*"},
	"internal/archtest":   {},
}

// TestImportRules runs `go list` over the module and checks every direct
// import between our packages, and that nothing but cmd/* imports bench.
func TestImportRules(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", "{{.ImportPath}} {{join .Imports \" \"}}", module+"/...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		fields := strings.Fields(line)
		pkg := strings.TrimPrefix(strings.TrimPrefix(fields[0], module), "/")
		if strings.HasPrefix(pkg, "cmd/") {
			continue
		}
		rule, known := allowed[pkg]
		if !known {
			rule = []string{"mta", "metrics"}
		}
		for _, imp := range fields[1:] {
			if !strings.HasPrefix(imp, module+"/") {
				continue
			}
			dep := strings.TrimPrefix(imp, module+"/")
			if dep == "bench" {
				t.Errorf("%s imports bench: nothing but cmd/* may", pkg)
			}
			if !permitted(rule, dep) {
				t.Errorf("%s imports %s, which the import rules do not allow (allowed: %v)", pkg, dep, rule)
			}
		}
	}
}

func permitted(rule []string, dep string) bool {
	for _, r := range rule {
		if r == "*" || r == dep {
			return true
		}
	}
	return false
}
