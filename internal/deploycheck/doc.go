// Package deploycheck holds the tests that check the files in deploy/: the
// systemd unit (systemd-analyze verify), the Prometheus rules (promtool),
// every shipped configuration (mta config check, with the files it names
// stood in for) and the Kubernetes manifests (valid YAML with a kind). It
// has no code of its own.
package deploycheck
