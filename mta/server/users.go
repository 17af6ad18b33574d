package server

import (
	"context"
	"github.com/mtaproject/mta/mta/mailbox"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/mtaproject/mta/mta/auth"
	"github.com/mtaproject/mta/mta/pop3d"
	"github.com/mtaproject/mta/spool"
)

// userDirectory is the users file as the server sees it: SMTP AUTH, POP3
// logins and local mailboxes all read the current version, and it is read
// again when the file changes, without a restart. A file that no longer
// parses is logged and the previous version kept.
type userDirectory struct {
	path string
	cur  atomic.Pointer[auth.Users]
	log  *zap.Logger
	mu   sync.Mutex // one reload at a time (the watcher, SIGHUP, the API)
	// seen is the modification time and size of the version loaded.
	seenMod  time.Time
	seenSize int64
}

// newUserDirectory wraps users, loaded from path ("" for none).
func newUserDirectory(path string, users *auth.Users, log *zap.Logger) *userDirectory {
	if users == nil {
		users = &auth.Users{}
	}
	d := &userDirectory{path: path, log: log}
	d.cur.Store(users)
	if fi, err := os.Stat(path); err == nil {
		d.seenMod, d.seenSize = fi.ModTime(), fi.Size()
	}
	return d
}

func (d *userDirectory) users() *auth.Users { return d.cur.Load() }

// Authenticate checks a password against the current users file.
func (d *userDirectory) Authenticate(user, password string) bool {
	return d.users().Authenticate(user, password)
}

// MaySend reports whether user may send as from.
func (d *userDirectory) MaySend(user, from string) bool { return d.users().MaySend(user, from) }

// Mailbox returns the user whose mailbox receives address.
func (d *userDirectory) Mailbox(address string) (string, bool) { return d.users().Mailbox(address) }

// reloadIfChanged reads the file again if its modification time or size
// changed since the version in use was read.
func (d *userDirectory) reloadIfChanged() {
	if d.path == "" {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	fi, err := os.Stat(d.path)
	if err != nil {
		d.log.Error("users file unreadable; keeping the version loaded", zap.String("file", d.path), zap.Error(err))
		return
	}
	if fi.ModTime().Equal(d.seenMod) && fi.Size() == d.seenSize {
		return
	}
	d.seenMod, d.seenSize = fi.ModTime(), fi.Size()
	u, err := auth.LoadUsers(d.path)
	if err != nil {
		d.log.Error("users file changed but does not parse; keeping the version loaded", zap.String("file", d.path), zap.Error(err))
		return
	}
	d.cur.Store(u)
	d.log.Info("users file reloaded", zap.String("file", d.path), zap.Int("users", u.Len()))
}

// watch checks the file every interval until ctx ends.
func (d *userDirectory) watch(ctx context.Context, interval time.Duration) {
	every(ctx, interval, d.reloadIfChanged)
}

// every calls fn every interval until ctx ends.
func every(ctx context.Context, interval time.Duration, fn func()) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			fn()
		}
	}
}

// pop3Backend gives the POP3 edge the users file and the spool's
// mailboxes (a user's mailbox is named after the user).
type pop3Backend struct {
	users     *userDirectory
	sp        *spool.Spool
	mailboxes *mailbox.Transport // its usage of a mailbox is measured again after a deletion
}

func (b pop3Backend) Authenticate(user, password string) bool {
	return b.users.Authenticate(user, password)
}

func (b pop3Backend) List(user string) ([]pop3d.Message, error) {
	list, err := b.sp.MailboxList(user)
	out := make([]pop3d.Message, len(list))
	for i, m := range list {
		out[i] = pop3d.Message{UID: m.UID, Size: m.Size}
	}
	return out, err
}

func (b pop3Backend) Retrieve(user, uid string) ([]byte, error) { return b.sp.MailboxGet(user, uid) }

// Delete removes the messages, and makes the quota check measure the
// mailbox again: room its owner made counts at once, not when the
// measurement would have expired anyway.
func (b pop3Backend) Delete(user string, uids []string) error {
	err := b.sp.MailboxDelete(user, uids)
	if b.mailboxes != nil {
		b.mailboxes.Forget(user)
	}
	return err
}
