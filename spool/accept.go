package spool

import (
	"time"

	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta"
)

// Accept stores a message received over SMTP: it builds the record from the
// envelope and calls Put. It is what the SMTP edge's Spooler interface asks
// for.
func (s *Spool) Accept(id string, env *mta.Envelope, header, body []byte) error {
	m := &Message{
		ID:       id,
		From:     env.From,
		EnvID:    env.EnvID,
		Ret:      env.Ret,
		SMTPUTF8: env.SMTPUTF8,
		Body8Bit: env.Body8Bit,
		ClientIP: env.ClientIP,
		HELO:     env.HELO,
		AuthUser: env.AuthUser,
		Received: env.Received,
	}
	m.Recipients = make([]RecipientState, len(env.Recipients))
	for i, r := range env.Recipients {
		m.Recipients[i].Recipient = r
	}
	return s.Put(m, header, body)
}

// Room returns mta.ErrStorageFull if size more bytes would take the file
// system below the free-space reserve, and the spool's error if it is broken.
func (s *Spool) Room(size int64) error {
	if err := s.Healthy(); err != nil {
		return err
	}
	if s.free.below(s.opts.MinFreeSpace+size, s.opts.Now()) {
		s.reclaim()
		return mta.ErrStorageFull
	}
	return nil
}

// reclaim asks Pebble, at most every reclaimInterval, to flush its
// memtable while the spool is short of space: the WAL it was writing
// becomes obsolete and reusable, and the deletions of delivered mail reach
// the tables, where compactions free their space. Without it a drained
// queue could keep its space, and acceptance its 452, until a restart.
func (s *Spool) reclaim() {
	now := s.opts.Now().UnixNano()
	last := s.lastReclaim.Load()
	if now-last < int64(reclaimInterval) || !s.lastReclaim.CompareAndSwap(last, now) {
		return
	}
	s.closeMu.RLock()
	defer s.closeMu.RUnlock()
	if s.closed {
		return
	}
	if _, err := s.db.AsyncFlush(); err != nil {
		s.log.Warn("spool: flush to reclaim space", zap.Error(err))
	}
}

const reclaimInterval = 5 * time.Second
