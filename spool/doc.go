// Package spool is the durable message store, on Pebble. It is the only
// package that imports Pebble, and it knows nothing of SMTP.
//
// # Keyspace
//
//	m/<id>                        → Message record (envelope, per-recipient state), see record.go
//	b/<id>                        → the message bytes as received, with our Received: header,
//	                                unless the record puts them in a body file (bodyfiles.go)
//	q/<due:8 bytes BE>/<id>/<dom> → empty; the due index, one entry per pending destination domain
//
// A queue ID is 16 characters of Crockford base32 over a 48-bit millisecond
// timestamp and a 32-bit sequence, so IDs sort by acceptance time.
//
// # Durability
//
// Every transition (accept, defer, deliver, fail, hold, release, remove) is
// one Pebble batch, so a crash leaves either the old state or the new one.
// The bytes of a large message go to a body file, synced before the batch
// that points to them is committed.
// Put commits with pebble.Sync when Options.Sync is set: it returns only once
// the batch is in the write-ahead log on disk. Concurrent Puts share WAL
// fsyncs, because Pebble's commit pipeline syncs everything queued behind
// one another together (group commit).
//
// Pebble treats a failed WAL write as fatal. The spool therefore refuses new
// messages with mta.ErrStorageFull while the free space of its directory is
// below its reserve (Options.MinFreeSpace, but at least three memtables, the
// room Pebble's next WAL file and flush need; see Reserve), and turns
// Pebble's fatal error into a broken spool that refuses all writes (callers
// answer 451) instead of exiting.
//
// # Memory
//
// The spool holds no per-message state in memory: a million queued messages
// cost disk, not RAM. Due returns a bounded batch of index entries.
package spool
