// Package auth owns the credentials of SMTP AUTH: a users file of
// "name:bcrypt-hash" lines, loaded at start.
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
	hashes map[string][]byte
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
	u := &Users{hashes: map[string][]byte{}}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, hash, ok := strings.Cut(line, ":")
		if !ok || name == "" {
			return nil, fmt.Errorf("auth.users_file %s:%d: want name:bcrypt-hash", path, n)
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

// Hash returns the bcrypt hash of password for a users file.
func Hash(password string) (string, error) {
	h, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.DefaultCost)
	return string(h), err
}
