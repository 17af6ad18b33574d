package spool

import (
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
		return mta.ErrStorageFull
	}
	return nil
}
