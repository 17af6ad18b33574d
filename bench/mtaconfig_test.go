package bench

import (
	"testing"

	"go.yaml.in/yaml/v3"
)

// TestMergeSections: a section given twice (the scenario's and the
// user's --mta-config) becomes one, key by key, the later value winning,
// at every depth; other sections are left as they are.
func TestMergeSections(t *testing.T) {
	in := "dns: {servers: [\"127.0.0.1:53\"], ipv6: false}\n" +
		"delivery: {port: 2525, tls: none, min_backoff: 1s}\n" +
		"smtp: {max_connections_per_ip: 60}\n" +
		"delivery: {max_connections_per_destination: 5, min_backoff: 3s}\n" +
		"log: {level: warn}\n" +
		"log: {accounting: {file: /tmp/a.log}}\n" +
		"smtp:\n"
	out, err := mergeSections(in)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]map[string]any
	if err := yaml.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("merged text is not valid YAML without duplicates: %v\n%s", err, out)
	}
	d := got["delivery"]
	if d["port"] != 2525 || d["tls"] != "none" || d["min_backoff"] != "3s" || d["max_connections_per_destination"] != 5 {
		t.Errorf("delivery merged as %v", d)
	}
	if got["smtp"]["max_connections_per_ip"] != 60 || got["dns"]["ipv6"] != false {
		t.Errorf("untouched sections changed: %v", got)
	}
	if got["log"]["level"] != "warn" || got["log"]["accounting"] == nil {
		t.Errorf("log merged as %v", got["log"])
	}
	if _, err := mergeSections("delivery: {port: [\n"); err == nil {
		t.Error("broken YAML was accepted")
	}
}
