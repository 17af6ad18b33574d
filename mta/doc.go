// Package mta is the shared vocabulary of the appliance: addresses,
// envelopes, DSN parameters and SMTP replies. It is a leaf: it imports only
// the standard library, so every other package may depend on it.
package mta
