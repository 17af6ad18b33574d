// Package scheduler decides what is delivered when, over which connection.
// It is the only holder of in-memory delivery state, and it owns no I/O of
// its own: it reads and writes the queue through Store and talks to remote
// servers through Transport, both interfaces defined here.
//
// # The algorithm
//
// One goroutine (run) owns all state. Work is a (message, recipient
// domain) pair. It enters a bounded active window in two ways: a message
// just accepted is handed over in memory (Submit), without a disk scan; and
// a periodic scan of the store's due index brings in retries and, after a
// restart, everything that was queued. Before work from the scan is
// attempted, its next-attempt time is moved one lease into the future in
// one batch, so that a crash can never make the same work due again at
// once (no retry storm); freshly accepted mail is stored with that lease
// already.
//
// Work in the window is routed (domain → destination: the set of next-hop
// hosts, so domains that share MX hosts share limits and connections) and
// queued per destination. A destination gets connection workers up to its
// concurrency limit, within a global limit; each worker takes the next
// message of its destination, sends it, records the per-recipient
// outcome, and goes on until the destination's queue is empty, then parks
// its connection in the connection cache for reuse. Destinations are
// served round-robin as connection slots free up, so a slow or dead
// destination holds at most its own slots and never starves the others.
//
// Outcomes: 2xx delivers a recipient, 5xx fails it, 4xx defers it with
// exponential backoff and jitter between MinBackoff and MaxBackoff; past
// MaxLifetime a deferral becomes a failure. A destination whose
// connections fail (refused, timeout, 421) is backed off as a whole: its
// queued work is deferred to the end of the backoff without an attempt, and
// only one probe connection is made when it is due again.
package scheduler
