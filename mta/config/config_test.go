package config

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDefaultsAreValidAndLoopback(t *testing.T) {
	cfg, err := Load("")
	if err != nil {
		t.Fatal(err)
	}
	for name, addr := range map[string]string{
		"smtp": cfg.Listen.SMTP, "submission": cfg.Listen.Submission,
		"pop3": cfg.Listen.POP3, "http": cfg.Listen.HTTP,
	} {
		if !strings.HasPrefix(addr, "127.0.0.1:") {
			t.Errorf("default listen.%s = %q, not loopback", name, addr)
		}
	}
	if cfg.DataDir != "data" {
		t.Errorf("data_dir = %q", cfg.DataDir)
	}
	if !cfg.Trusted(netip.MustParseAddr("127.0.0.9")) || !cfg.Trusted(netip.MustParseAddr("::1")) {
		t.Error("loopback is not trusted by default")
	}
	if cfg.Trusted(netip.MustParseAddr("192.0.2.1")) {
		t.Error("192.0.2.1 trusted by default")
	}
	if !cfg.Spool.Sync {
		t.Error("spool.sync must default to true")
	}
}

func TestParseOverridesDefaults(t *testing.T) {
	cfg, err := Parse([]byte(`
hostname: mx.example.net
local_domains: [Example.COM.]
trusted_networks: [10.0.0.0/8, 192.0.2.7]
smtp:
  max_message_size: 25MiB
  command_timeout: 90s
spool:
  sync: false
`))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.SMTP.MaxMessageSize != 25<<20 || cfg.SMTP.CommandTimeout.D() != 90*time.Second {
		t.Errorf("overrides not applied: %+v", cfg.SMTP)
	}
	if cfg.SMTP.MaxRecipients != 1000 {
		t.Error("unset field lost its default")
	}
	if cfg.LocalDomains[0] != "example.com" {
		t.Errorf("local domain not normalised: %q", cfg.LocalDomains[0])
	}
	if !cfg.Trusted(netip.MustParseAddr("192.0.2.7")) || cfg.Trusted(netip.MustParseAddr("127.0.0.1")) {
		t.Error("trusted_networks not replaced")
	}
	if cfg.Spool.Sync {
		t.Error("spool.sync: false ignored")
	}
}

func TestErrorsNameTheField(t *testing.T) {
	for _, tc := range []struct{ yaml, want string }{
		{"smtp:\n  max_mesage_size: 1\n", "smtp.max_mesage_size: unknown field (line 2)"},
		{"bogus: 1\n", "bogus: unknown field"},
		{"smtp:\n  max_message_size: lots\n", "smtp.max_message_size: not a size"},
		{"smtp:\n  max_recipients: many\n", "smtp.max_recipients: cannot unmarshal"},
		{"smtp:\n  max_recipients: 0\n", "smtp.max_recipients: must be greater than zero"},
		{"smtp:\n  command_timeout: soon\n", "smtp.command_timeout: not a duration"},
		{"trusted_networks: [10.0.0.0/33]\n", "trusted_networks[0]: not a CIDR"},
		{"listen:\n  smtp: 2525\n", "listen.smtp: \"2525\": not an ip:port address (line 2)"},
		{"listen:\n  smtp: \"mail.example.com:25\"\n", "listen.smtp: \"mail.example.com:25\": \"mail.example.com\" is not an IP address"},
		{"listen:\n  smtp: \"127.0.0.1:99999\"\n", "listen.smtp: \"127.0.0.1:99999\": bad port"},
		{"listen: {smtp: \":2525\", submission: \"127.0.0.1:2525\"}\n", "listen.submission: \"127.0.0.1:2525\": the same port as listen.smtp"},
		{"listen: {http: \"0.0.0.0:9725\"}\n", "listen.http: \"0.0.0.0:9725\" is not a loopback address"},
		{"routes:\n  a.test: {hosts: [\"smart.test:99999\"]}\n", "routes.a.test.hosts[0]: \"smart.test:99999\": bad port \"99999\" (line 2)"},
		{"routes:\n  a.test:\n    hosts: [\"[not-ip]:25\"]\n", "routes.a.test.hosts[0]: \"[not-ip]:25\": \"not-ip\" is not an IP address (line 3)"},
		{"routes:\n  a.test: {hosts: [\"bad_host!:25\"]}\n", "is not a host name"},
		{"smtp:\n  bare_line_endings: fix\n", "smtp.bare_line_endings: must be reject or normalize"},
		{"tls:\n  cert_file: a.pem\n", "tls.cert_file: cert_file and key_file"},
		{"log:\n  level: loud\n", "log.level: must be"},
		{"smtp: [1]\n", "smtp: must be a mapping"},
		{"local_domains: [\"a b\"]\n", "local_domains[0]: not a domain"},
		{"smtp: {max_line_length: 80}\n", "smtp.max_line_length: must be at least 1000"},
		{"spool: {memtable_size: 1MiB}\n", "spool.memtable_size: must be between 4MiB and 1GiB"},
		{"spool: {body_file_threshold: 100}\n", "spool.body_file_threshold: must be 0 (off) or at least 1KiB"},
		{"listen: {api: \"0.0.0.0:8026\"}\napi: {tenants: [{name: s, token_file: /x}]}\n", "listen.api: \"0.0.0.0:8026\" is not a loopback address"},
		{"listen: {api: \"127.0.0.1:8026\"}\n", "api.tenants: listen.api is set"},
		{"api: {tenants: [{name: default, token_file: /x}]}\n", "api.tenants[0].name: default is the tenant of SMTP mail"},
		{"memory_budget: 40MiB\nlisten: {api: \"127.0.0.1:8026\"}\napi: {tenants: [{name: s, token_file: /x}]}\n", "memory_budget: must be at least twice api.max_request_size"},
		{"webhooks: [{name: h, tenant: nobody, url: \"ftp://x\", secret_file: /x}]\n", "webhooks[0].tenant"},
		{"bounces: {domain: b.example}\n", "bounces.domain: b.example must be one of local_domains"},
		{"suppression: {bounce_codes: [\"4.1.1\"]}\n", "suppression.bounce_codes[0]"},
		{"dkim: {keys: [{domain: a.example, selector: \"s_1\", key_file: /x}]}\n", "dkim.keys[0].selector"},
	} {
		_, err := Parse([]byte(tc.yaml))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%q) error = %v, want it to contain %q", tc.yaml, err, tc.want)
		}
	}
}

func TestLoadChecksReferencedFiles(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "mta.yaml")
	os.WriteFile(path, []byte("hostname: mx.test\nauth:\n  users_file: "+dir+"/nope\nadmin: {token_file: "+dir+"/token}\n"), 0o600)
	_, err := Load(path)
	for _, want := range []string{"auth.users_file: " + dir + "/nope: no such file or directory (line 3)", "admin.token_file: " + dir + "/token: no such file or directory (line 4)"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Load: %v, want it to contain %q", err, want)
		}
	}
	os.WriteFile(filepath.Join(dir, "nope"), nil, 0o600)
	os.WriteFile(filepath.Join(dir, "token"), []byte("t\n"), 0o600)
	if _, err := Load(path); err != nil {
		t.Fatal(err)
	}
}

func TestHostnameWarning(t *testing.T) {
	cfg, err := Parse([]byte("hostname: mail\nlisten: {smtp: \"0.0.0.0:2525\"}\n"))
	if err != nil || len(cfg.Warnings()) != 1 || !strings.Contains(cfg.Warnings()[0], "not a fully qualified domain name") {
		t.Fatalf("warnings %q, err %v", cfg.Warnings(), err)
	}
	if cfg, _ := Parse([]byte("hostname: mail\n")); len(cfg.Warnings()) != 0 {
		t.Fatalf("warned with loopback listeners only: %q", cfg.Warnings())
	}
}

func TestLoadNamesTheFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "mta.yaml")
	if err := os.WriteFile(path, []byte("spool:\n  sink: true\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(path)
	if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "spool.sink") {
		t.Fatalf("error = %v", err)
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.yaml")); err == nil {
		t.Fatal("missing file accepted")
	}
}

func TestByteSize(t *testing.T) {
	for in, want := range map[string]int64{"10": 10, "10MiB": 10 << 20, "2 KB": 2000, "1GiB": 1 << 30, "7B": 7} {
		var s ByteSize
		if err := s.UnmarshalText([]byte(in)); err != nil || int64(s) != want {
			t.Errorf("%q → %d, %v; want %d", in, s, err, want)
		}
	}
	var s ByteSize
	if s.UnmarshalText([]byte("1.5MiB")) == nil {
		t.Error("fractional size accepted")
	}
}

// TestDeployExamplesAreValid keeps the configurations shipped in deploy/
// loadable.
func TestDeployExamplesAreValid(t *testing.T) {
	for _, path := range []string{"../../deploy/mta.example.yaml", "../../deploy/container/mta.yaml", "../../deploy/kubernetes/configmap.yaml"} {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasSuffix(path, "configmap.yaml") {
			// The configuration is the block under "mta.yaml: |".
			_, block, ok := strings.Cut(string(data), "mta.yaml: |\n")
			if !ok {
				t.Fatalf("%s: no mta.yaml block", path)
			}
			var lines []string
			for _, l := range strings.Split(block, "\n") {
				lines = append(lines, strings.TrimPrefix(l, "    "))
			}
			data = []byte(strings.Join(lines, "\n"))
		}
		cfg, err := Parse(data)
		if err != nil {
			t.Errorf("%s: %v", path, err)
		} else if len(cfg.Warnings()) > 0 {
			t.Errorf("%s: warnings %q", path, cfg.Warnings())
		}
	}
}

func TestDeliveryAndRoutes(t *testing.T) {
	cfg, err := Parse([]byte(`
hostname: mx.test
delivery:
  min_backoff: 2s
  max_backoff: 10s
routes:
  Example.COM.: {hosts: ["[127.0.0.1]:2600"]}
  "*": {hosts: ["smart.test:587"], tls: required, auth: {username: u, password_file: /p}}
`))
	if err != nil {
		t.Fatal(err)
	}
	domains, err := Parse([]byte("delivery:\n  domains:\n    Near.Example.: {max_connections: 4}\n    far.example: {max_messages_per_connection: 100}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if d := domains.Delivery.Domains; len(d) != 2 || d["near.example"].MaxConnections != 4 || d["far.example"].MaxMessagesPerConnection != 100 {
		t.Fatalf("delivery.domains = %+v", d)
	}
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Delivery.HeloName != "mx.test" || cfg.Delivery.MinBackoff.D() != 2*time.Second {
		t.Fatalf("delivery = %+v", cfg.Delivery)
	}
	if r := cfg.Routes["example.com"]; len(r.Hosts) != 1 {
		t.Fatalf("routes = %+v", cfg.Routes)
	}
	for _, tc := range []struct{ yaml, want string }{
		{"delivery: {min_backoff: 1h, max_backoff: 1m}", "delivery.max_backoff: must not be less than"},
		{"delivery: {tls: always}", "delivery.tls: must be none, opportunistic or required"},
		{"routes: {x.test: {hosts: []}}", "routes.x.test.hosts: needs at least one host"},
		{"routes: {x.test: {hosts: [a], auth: {username: u}}}", "routes.x.test.auth: needs username and password_file"},
		{"routes: {x.test: {hostz: [a]}}", "routes.x.test.hostz: unknown field"},
		{"dns: {servers: [8.8.8.8]}", "dns.servers[0]: not a host:port"},
		{"delivery: {domains: {\"a b\": {max_connections: 2}}}", "delivery.domains.a b: not a domain name"},
		{"delivery: {domains: {a.test: {max_connections: -1}}}", "delivery.domains.a.test.max_connections: must not be negative"},
		{"delivery: {domains: {a.test: {max_connections: 501}}}", "delivery.domains.a.test.max_connections: 501 is more than delivery.max_connections (500)"},
		{"delivery: {domains: {a.test: {max_messages_per_connection: -5}}}", "delivery.domains.a.test.max_messages_per_connection: must not be negative"},
		{"delivery: {domains: {a.test: {}}}", "delivery.domains.a.test: sets none of"},
		{"delivery: {max_connections: 10, max_connections_per_destination: 20}", "delivery.max_connections_per_destination: 20 is more than"},
		{"delivery: {max_connections_per_destination: 1000}", "delivery.max_connections_per_destination: 1000 is more than delivery.max_connections (500)"},
		{"delivery: {domains: {a.test: {max_recipients_per_transaction: -1}}}", "delivery.domains.a.test.max_recipients_per_transaction: must not be negative"},
		{"delivery: {max_recipients_per_transaction: 0}", "delivery.max_recipients_per_transaction: must be greater than zero"},
		{"delivery: {domains: {a.test: {max_conections: 2}}}", "delivery.domains.a.test.max_conections: unknown field"},
		{"delivery: {domains: {A.test: {max_connections: 2}, a.test.: {max_connections: 3}}}", "is given twice"},
	} {
		if _, err := Parse([]byte(tc.yaml)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%q) = %v, want %q", tc.yaml, err, tc.want)
		}
	}
}

func TestEmptySectionKeepsDefaults(t *testing.T) {
	cfg, err := Parse([]byte("admin:\nsmtp:\n  # nothing set\n"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.SMTP.MaxRecipients != 1000 || cfg.Admin.TokenFile != "" {
		t.Fatalf("defaults lost: %+v", cfg.SMTP)
	}
}

func TestPOP3SNeedsACertificate(t *testing.T) {
	_, err := Parse([]byte("listen: {pop3s: \"127.0.0.1:2995\"}\ntls: {self_signed: false}\n"))
	if err == nil || !strings.Contains(err.Error(), "listen.pop3s") {
		t.Fatalf("pop3s without a certificate: %v", err)
	}
	if _, err := Parse([]byte("listen: {pop3s: \"127.0.0.1:2995\"}\n")); err != nil {
		t.Fatalf("pop3s with the self-signed default: %v", err)
	}
}

// TestWarnsOfAReadableDKIMKey: a private key file others may read is
// named in the warnings (OpenDKIM refuses one); a mode 600 one is not.
func TestWarnsOfAReadableDKIMKey(t *testing.T) {
	dir := t.TempDir()
	for _, mode := range []os.FileMode{0o644, 0o600} {
		key := filepath.Join(dir, fmt.Sprintf("k%o.pem", mode))
		os.WriteFile(key, []byte("x"), mode)
		os.Chmod(key, mode)
		path := filepath.Join(dir, "mta.yaml")
		os.WriteFile(path, []byte("dkim: {keys: [{domain: shop.example, selector: s1, key_file: "+key+"}]}\n"), 0o600)
		cfg, err := Load(path)
		if err != nil {
			t.Fatal(err)
		}
		warned := strings.Contains(strings.Join(cfg.Warnings(), "\n"), "dkim.keys[0].key_file")
		if warned != (mode == 0o644) {
			t.Errorf("mode %o: warnings %q", mode, cfg.Warnings())
		}
	}
}
