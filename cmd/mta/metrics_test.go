package main

import (
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strings"
	"testing"
)

// TestAlertsAndDashboardUseExistingMetrics: every mta_ metric the shipped
// alert rules and Grafana dashboard use is exported by a freshly started
// server (names pre-registered, so panels do not start empty), and
// mta_build_info says which build runs.
func TestAlertsAndDashboardUseExistingMetrics(t *testing.T) {
	if testing.Short() {
		t.Skip("starts subprocesses")
	}
	p := startMTA(t, t.TempDir(), "")
	_, scrape := httpGet(t, "http://"+p.HTTP+"/metrics")
	exported := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^# TYPE (\S+) `).FindAllStringSubmatch(scrape, -1) {
		exported[m[1]] = true
	}
	used := map[string][]string{}
	name := regexp.MustCompile(`\bmta_[a-z0-9_]+`)
	for _, file := range []string{"../../deploy/prometheus/alerts.yaml", "../../deploy/grafana/mta-dashboard.json"} {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range name.FindAllString(string(data), -1) {
			base := n
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				if b := strings.TrimSuffix(n, suffix); b != n && exported[b] {
					base = b
				}
			}
			used[base] = append(used[base], file)
		}
	}
	var missing []string
	for n, files := range used {
		if !exported[n] {
			missing = append(missing, n+" (used in "+files[0]+")")
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("metrics used by alerts or the dashboard but not exported:\n%s", strings.Join(missing, "\n"))
	}
	if len(used) < 10 {
		t.Errorf("only %d metric names found in the deploy files: is the pattern right?", len(used))
	}
	// promtool's lint of the exposition (names, types, help, units).
	if promtool, err := exec.LookPath("promtool"); err == nil {
		cmd := exec.Command(promtool, "check", "metrics")
		cmd.Stdin = strings.NewReader(scrape)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool check metrics: %v\n%s", err, out)
		}
	} else {
		t.Log("promtool not found (apt-get install prometheus): the scrape was not linted")
	}
	for _, want := range []string{`mta_queue_messages{state="queued"}`, `mta_queue_messages_by_age{age="5m"}`, "mta_spool_compaction_debt_bytes",
		"mta_spool_l0_files", "mta_spool_disk_bytes", "mta_dns_query_duration_seconds_bucket", `mta_delivery_end_to_end_seconds_bucket{outcome="delivered"`,
		"mta_delivery_attempts_per_delivery_bucket", `mta_delivery_replies_total{code="2.0.0",outcome="delivered"} 0`, `mta_config_reloads_total{result="ok"}`, `mta_delivery_starttls_total{result="fell_back"}`, `mta_pop3_logins_total{listener="pop3",result="failure"}`} {
		if !strings.Contains(scrape, want) {
			t.Errorf("the scrape lacks %s", want)
		}
	}
	if !regexp.MustCompile(`mta_build_info\{goversion="go[^"]+",revision="[^"]*",version="[^"]+"\} 1`).MatchString(scrape) {
		t.Errorf("no mta_build_info in the scrape")
	}
}
