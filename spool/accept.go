package spool

import (
	"context"
	"time"

	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
)

// Accept stores a message received over SMTP: it builds the record from the
// envelope and calls Put. It is what the SMTP edge's Spooler interface asks
// for.
func (s *Spool) Accept(id string, env *mta.Envelope, header, body []byte) error {
	return s.Put(NewMessage(id, env), header, body)
}

// NewMessage is the record of a new message with the given envelope, all
// its recipients waiting.
func NewMessage(id string, env *mta.Envelope) *Message {
	m := &Message{
		ID:        id,
		From:      env.From,
		EnvID:     env.EnvID,
		Ret:       env.Ret,
		SMTPUTF8:  env.SMTPUTF8,
		Body8Bit:  env.Body8Bit,
		ClientIP:  env.ClientIP,
		HELO:      env.HELO,
		AuthUser:  env.AuthUser,
		MessageID: env.MessageID,
		Received:  env.Received,
		Priority:  env.Priority,
		Metadata:  env.Metadata,
	}
	m.Recipients = make([]RecipientState, len(env.Recipients))
	for i, r := range env.Recipients {
		m.Recipients[i].Recipient = r
	}
	return m
}

// Room returns mta.ErrStorageFull if size more bytes would take the file
// system below the free-space reserve, and the spool's error if it is broken.
func (s *Spool) Room(size int64) error {
	if err := s.Healthy(); err != nil {
		return err
	}
	if s.short(size) {
		s.reclaim()
		return mta.ErrStorageFull
	}
	return nil
}

// short reports whether writing size more bytes would take the file system
// below the spool's free-space reserve.
func (s *Spool) short(size int64) bool { return s.free.short(size, s.opts.Now()) }

// admit is short for a write about to happen, which it counts against the
// free space when it fits (see freeSpace.admit).
func (s *Spool) admit(size int64) bool { return s.free.admit(size, s.opts.Now()) }

// Reserve returns the free space the spool leaves on its file system:
// Options.MinFreeSpace, or more where Pebble needs more (pebbleHeadroom).
func (s *Spool) Reserve() int64 { return s.free.reserve }

// reclaim asks Pebble, at most every reclaimInterval and one at a time,
// to give back the space of delivered mail while the spool is short of
// it: it flushes the memtable (the WAL it was writing becomes obsolete and
// reusable) and compacts the keyspace, so that the deletions reach the
// tables and their space is freed. Without it a drained queue could keep
// its space, and acceptance its 452, until a restart.
func (s *Spool) reclaim() {
	now := s.opts.Now().UnixNano()
	last := s.lastReclaim.Load()
	if now-last < int64(reclaimInterval) || !s.lastReclaim.CompareAndSwap(last, now) {
		return
	}
	s.bodies.sealIfUnused()
	if !s.reclaiming.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer s.reclaiming.Store(false)
		s.closeMu.RLock()
		defer s.closeMu.RUnlock()
		if s.closed || s.reclaimCtx.Err() != nil {
			return
		}
		// A flush that cannot write its table on a full file system is
		// retried by Pebble and may never finish: wait for it only until
		// the spool closes.
		flushed, err := s.db.AsyncFlush()
		if err != nil {
			s.log.Warn("spool: flush to reclaim space", zap.Error(err))
			return
		}
		select {
		case <-flushed:
		case <-s.reclaimCtx.Done():
			return
		}
		ctx, cancel := context.WithTimeout(s.reclaimCtx, time.Minute)
		defer cancel()
		if err := s.db.Compact(ctx, []byte{0}, []byte{0xff}, false); err != nil {
			s.log.Warn("spool: compaction to reclaim space", zap.Error(err))
		}
	}()
}

const reclaimInterval = 5 * time.Second
