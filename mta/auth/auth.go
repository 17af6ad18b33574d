// Package auth owns the credentials of SMTP AUTH: a users file of
// "name:bcrypt-hash[:senders]" lines, loaded at start. The optional third
// field lists the MAIL FROM addresses the user may use: full addresses and
// domains ("@example.com" or "example.com"), separated by commas.
package auth

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strings"

	"golang.org/x/crypto/bcrypt"
)

// Users is a read-only set of user names with bcrypt password hashes.
type Users struct {
	hashes  map[string][]byte
	senders map[string][]string // lower-cased addresses and "@domain"s; no entry: any sender
}

// dummyHash is compared against for unknown users, so that a wrong user name
// costs as much time as a wrong password and reveals nothing.
var dummyHash, _ = bcrypt.GenerateFromPassword([]byte("not a password"), bcrypt.DefaultCost)

// LoadUsers reads a users file: one "name:hash" per line, where hash is a
// bcrypt hash (as printed by `mta user hash`); blank lines and lines
// starting with # are ignored. Errors name the file and line.
func LoadUsers(path string) (*Users, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("auth.users_file: %w", err)
	}
	u := &Users{hashes: map[string][]byte{}, senders: map[string][]string{}}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, hash, ok := strings.Cut(line, ":")
		if !ok || name == "" {
			return nil, fmt.Errorf("auth.users_file %s:%d: want name:bcrypt-hash[:senders]", path, n)
		}
		hash, senders, restricted := strings.Cut(hash, ":")
		if restricted {
			list, err := parseSenders(senders)
			if err != nil {
				return nil, fmt.Errorf("auth.users_file %s:%d: user %q: %w", path, n, name, err)
			}
			u.senders[name] = list
		}
		if _, err := bcrypt.Cost([]byte(hash)); err != nil {
			return nil, fmt.Errorf("auth.users_file %s:%d: user %q: not a bcrypt hash (make one with `mta user hash`)", path, n, name)
		}
		u.hashes[name] = []byte(hash)
	}
	return u, sc.Err()
}

// Len returns the number of users.
func (u *Users) Len() int { return len(u.hashes) }

// Authenticate reports whether password is right for user.
func (u *Users) Authenticate(user, password string) bool {
	hash, ok := u.hashes[user]
	if !ok {
		_ = bcrypt.CompareHashAndPassword(dummyHash, []byte(password))
		return false
	}
	return bcrypt.CompareHashAndPassword(hash, []byte(password)) == nil
}

// parseSenders parses the third field of a users file line.
func parseSenders(field string) ([]string, error) {
	var list []string
	for _, s := range strings.Split(field, ",") {
		s = strings.ToLower(strings.TrimSpace(s))
		switch {
		case s == "":
			continue
		case !strings.Contains(s, "@"):
			s = "@" + s
		case strings.HasPrefix(s, "@") || strings.Count(s, "@") == 1 && !strings.HasSuffix(s, "@"):
		default:
			return nil, fmt.Errorf("sender %q: want an address, @domain or domain", s)
		}
		list = append(list, s)
	}
	if len(list) == 0 {
		return nil, fmt.Errorf("empty sender list (leave the field out to allow any sender)")
	}
	return list, nil
}

// MaySend reports whether user may use from as the MAIL FROM address: any
// address when the users file gives the user no sender list, else one on
// the list or at a domain on it. The null sender is always allowed, as
// bounces need it.
func (u *Users) MaySend(user, from string) bool {
	list, restricted := u.senders[user]
	if !restricted || from == "" {
		return true
	}
	from = strings.ToLower(from)
	at := strings.LastIndexByte(from, '@')
	for _, s := range list {
		if s == from || at >= 0 && s == from[at:] {
			return true
		}
	}
	return false
}

// Hash returns the bcrypt hash of password for a users file.
func Hash(password string) (string, error) {
	h, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.DefaultCost)
	return string(h), err
}
