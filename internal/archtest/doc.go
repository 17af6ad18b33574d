// Package archtest holds the test that keeps the package import rules of
// docs/architecture.md true. It has no code of its own.
package archtest
