// Package pytest finds a Python interpreter for tests that check our
// output with independent Python parsers (email, smtplib, poplib,
// flufl.bounce). It is for tests only.
package pytest

import (
	"bytes"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// Python returns the path of a python3 that can import every module in
// modules, or skips the test with a message that says what to install. The
// system interpreter (/usr/bin/python3, where apt installs modules such as
// python3-flufl.bounce) is tried before the one on PATH.
func Python(t testing.TB, modules ...string) string {
	t.Helper()
	candidates := []string{"/usr/bin/python3"}
	if p, err := exec.LookPath("python3"); err == nil {
		candidates = append(candidates, p)
	}
	script := "import " + strings.Join(append([]string{"sys"}, modules...), ", ")
	for _, py := range candidates {
		if err := exec.Command(py, "-c", script).Run(); err == nil {
			return py
		}
	}
	what := "python3"
	for _, m := range modules {
		switch m {
		case "flufl.bounce":
			what += " python3-flufl.bounce"
		case "dkim":
			what += " python3-dkim"
		}
	}
	t.Skipf("no python3 that can import %v: install %s (apt), or run make test", modules, what)
	return ""
}

// DSN is what Python's email package and flufl.bounce read in a delivery
// status notification (see read_dsn.py).
type DSN struct {
	LinesOK     bool              `json:"lines_ok"` // no line over 998 octets
	BareLF      bool              `json:"bare_lf"`  // a line break that is not CRLF
	Headers     map[string]string `json:"headers"`
	ContentType string            `json:"content_type"`
	ReportType  string            `json:"report_type"`
	Parts       []struct {
		Type    string `json:"type"`
		Text    string `json:"text"`
		Subject string `json:"subject"` // of a returned message
		Body    any    `json:"body"`
	} `json:"parts"`
	PerMessage map[string]string   `json:"per_message"`
	Recipients []map[string]string `json:"recipients"`
	// FluflPermanent is flufl.bounce's scan_message: the addresses it
	// finds as permanently failed; nil without flufl.bounce.
	FluflPermanent []string `json:"flufl_permanent"`
	FluflAll       []string `json:"flufl_all"`
}

// ReadDSN parses msg with read_dsn.py under py.
func ReadDSN(t testing.TB, py string, msg []byte) *DSN {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	cmd := exec.Command(py, filepath.Join(filepath.Dir(file), "read_dsn.py"))
	cmd.Stdin = bytes.NewReader(msg)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("read_dsn.py: %v\n%s\nmessage:\n%s", err, stderr.String(), msg)
	}
	var d DSN
	if err := json.Unmarshal(out, &d); err != nil {
		t.Fatalf("read_dsn.py output: %v\n%s", err, out)
	}
	return &d
}
