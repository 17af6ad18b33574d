// Package bench is the benchmark harness: load generator, SMTP sink, DNS stub,
// scenarios. Nothing imports bench.
package bench
