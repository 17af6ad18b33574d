package deploycheck

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/mtaproject/mta/mta/auth"
	"github.com/mtaproject/mta/mta/certs"
)

const deploy = "../../deploy"

// mtaBinary builds cmd/mta into a temporary directory.
func mtaBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "mta")
	if out, err := exec.Command("go", "build", "-o", bin, "../../cmd/mta").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func TestSystemdUnitVerifies(t *testing.T) {
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not found: apt-get install systemd (make test does)")
	}
	unit, err := os.ReadFile(filepath.Join(deploy, "systemd/mta.service"))
	if err != nil {
		t.Fatal(err)
	}
	// The unit names /usr/local/bin/mta; verify checks that it exists.
	path := filepath.Join(t.TempDir(), "mta.service")
	os.WriteFile(path, bytes.ReplaceAll(unit, []byte("/usr/local/bin/mta"), []byte(mtaBinary(t))), 0o644)
	if out, err := exec.Command(sa, "verify", "--man=no", path).CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

func TestPrometheusRulesCheck(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool not found: apt-get install prometheus (make test does)")
	}
	if out, err := exec.Command(promtool, "check", "rules", filepath.Join(deploy, "prometheus/alerts.yaml")).CombinedOutput(); err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}
}

// TestShippedConfigsPassConfigCheck runs `mta config check` on every
// configuration in deploy/, with the files they name (certificates, the
// users file, the admin token) made in a temporary directory.
func TestShippedConfigsPassConfigCheck(t *testing.T) {
	bin := mtaBinary(t)
	root := t.TempDir()
	if _, err := certs.SelfSigned(filepath.Join(root, "tls"), "mx.example.com"); err != nil {
		t.Fatal(err)
	}
	hash, _ := auth.Hash("x")
	files := map[string]string{ // as named in the shipped files → stand-in
		"/etc/mta/tls/fullchain.pem": filepath.Join(root, "tls/cert.pem"),
		"/etc/mta/tls/privkey.pem":   filepath.Join(root, "tls/key.pem"),
		"/etc/mta/users":             filepath.Join(root, "users"),
		"/var/lib/mta":               filepath.Join(root, "data"),
	}
	os.WriteFile(files["/etc/mta/users"], []byte("app:"+hash+"\n"), 0o600)
	configs := map[string][]byte{}
	for _, f := range []string{"mta.example.yaml", "container/mta.yaml"} {
		b, err := os.ReadFile(filepath.Join(deploy, f))
		if err != nil {
			t.Fatal(err)
		}
		configs[f] = b
	}
	// The Kubernetes ConfigMap carries mta.yaml as data.
	cm, err := os.ReadFile(filepath.Join(deploy, "kubernetes/configmap.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Data map[string]string `yaml:"data"`
	}
	if err := yaml.Unmarshal(cm, &doc); err != nil || doc.Data["mta.yaml"] == "" {
		t.Fatalf("configmap: %v, keys %v", err, doc.Data)
	}
	configs["kubernetes/configmap.yaml"] = []byte(doc.Data["mta.yaml"])
	for name, b := range configs {
		s := string(b)
		for from, to := range files {
			s = strings.ReplaceAll(s, from, to)
		}
		path := filepath.Join(root, strings.ReplaceAll(name, "/", "_"))
		os.WriteFile(path, []byte(s), 0o600)
		if out, err := exec.Command(bin, "config", "check", "--config", path).CombinedOutput(); err != nil {
			t.Errorf("%s: mta config check: %v\n%s", name, err, out)
		}
	}
}

// TestKubernetesManifestsAreValidYAML: every document of every manifest
// parses and says what it is.
func TestKubernetesManifestsAreValidYAML(t *testing.T) {
	paths, _ := filepath.Glob(filepath.Join(deploy, "kubernetes/*.yaml"))
	more, _ := filepath.Glob(filepath.Join(deploy, "kubernetes/optional/*.yaml"))
	paths = append(paths, more...)
	if len(paths) < 4 {
		t.Fatalf("found only %v", paths)
	}
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(data))
		for n := 0; ; n++ {
			var doc map[string]any
			if err := dec.Decode(&doc); err != nil {
				if err.Error() == "EOF" {
					break
				}
				t.Fatalf("%s: document %d: %v", p, n, err)
			}
			if doc == nil {
				continue
			}
			if doc["apiVersion"] == nil || doc["kind"] == nil || doc["metadata"] == nil {
				t.Errorf("%s: document %d lacks apiVersion, kind or metadata", p, n)
			}
		}
	}
}
