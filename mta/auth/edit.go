package auth

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Entry is one user of a users file.
type Entry struct {
	Name      string
	Hash      string   // bcrypt
	Senders   []string // MAIL FROM addresses and @domains; empty: any
	Addresses []string // addresses whose mail lands in the user's mailbox
}

// line renders e as a users file line.
func (e *Entry) line() string {
	s := e.Name + ":" + e.Hash
	if len(e.Senders) > 0 || len(e.Addresses) > 0 {
		s += ":" + strings.Join(e.Senders, ",")
	}
	if len(e.Addresses) > 0 {
		s += ":" + strings.Join(e.Addresses, ",")
	}
	return s
}

// parseEntry reads a non-comment line; ok is false for anything else.
func parseEntry(line string) (e Entry, ok bool) {
	line = strings.TrimSpace(line)
	if line == "" || strings.HasPrefix(line, "#") {
		return e, false
	}
	f := strings.Split(line, ":")
	e.Name = f[0]
	if len(f) > 1 {
		e.Hash = f[1]
	}
	if len(f) > 2 {
		e.Senders = SplitList(f[2])
	}
	if len(f) > 3 {
		e.Addresses = SplitList(f[3])
	}
	return e, true
}

// SplitList splits a comma-separated list of a users file line (senders,
// addresses), dropping blanks.
func SplitList(s string) []string {
	var out []string
	for _, x := range strings.Split(s, ",") {
		if x = strings.TrimSpace(x); x != "" {
			out = append(out, x)
		}
	}
	return out
}

// Entries returns the users of the file at path, in file order.
func Entries(path string) ([]Entry, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []Entry
	for _, l := range strings.Split(string(data), "\n") {
		if e, ok := parseEntry(l); ok {
			out = append(out, e)
		}
	}
	return out, nil
}

// ErrNoUser is returned by Update for a user that is not in the file.
var ErrNoUser = errors.New("no such user")

// Update changes the entry of one user in the users file at path: fn gets
// the current entry (nil when there is none) and returns the new one, or
// nil to remove the user. Other lines, comments included, are kept as they
// are. The new file is checked as LoadUsers would, written beside the old
// one with the same permissions, synced and renamed over it, under an
// exclusive lock, so that a running server never reads half a file and two
// editors never lose each other's change. A missing file is created (mode
// 0600).
func Update(path, name string, fn func(old *Entry) (*Entry, error)) error {
	// A symlinked users file is edited where it lives.
	if real, err := filepath.EvalSymlinks(path); err == nil {
		path = real
	}
	lock, err := os.OpenFile(path+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return err
	}
	data, err := os.ReadFile(path)
	mode := os.FileMode(0o600)
	uid, gid := -1, -1
	if err == nil {
		if fi, err := os.Stat(path); err == nil {
			mode = fi.Mode().Perm()
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				uid, gid = int(st.Uid), int(st.Gid)
			}
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	lines := strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
	if len(data) == 0 {
		lines = nil
	}
	at := -1
	var old *Entry
	for i, l := range lines {
		if e, ok := parseEntry(l); ok && e.Name == name {
			at, old = i, &e
			break
		}
	}
	e, err := fn(old)
	if err != nil {
		return err
	}
	switch {
	case e == nil && at >= 0:
		lines = append(lines[:at], lines[at+1:]...)
	case e == nil:
		return ErrNoUser
	case at >= 0:
		lines[at] = e.line()
	default:
		lines = append(lines, e.line())
	}
	var buf bytes.Buffer
	for _, l := range lines {
		buf.WriteString(l)
		buf.WriteByte('\n')
	}
	if _, err := ParseUsers(path, buf.Bytes()); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".users-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(buf.Bytes()); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	// Keep the owner and group too (root:mta 0640 in the deploy notes),
	// or the server, which reads it as its group, could no longer.
	if uid >= 0 && (uid != os.Geteuid() || gid != os.Getegid()) {
		if err := tmp.Chown(uid, gid); err != nil {
			tmp.Close()
			return fmt.Errorf("keeping %s's owner: %w", path, err)
		}
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("replacing %s: %w", path, err)
	}
	if dir, err := os.Open(filepath.Dir(path)); err == nil {
		dir.Sync()
		dir.Close()
	}
	return nil
}
