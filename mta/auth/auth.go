// Package auth owns the users file shared by SMTP AUTH and POP3: lines of
// "name:bcrypt-hash[:senders[:addresses]]". The optional third field lists
// the MAIL FROM addresses the user may use: full addresses and domains
// ("@example.com" or "example.com"), separated by commas; empty means any.
// The optional fourth lists the addresses whose mail lands in the user's
// mailbox: full addresses (aliases such as postmaster@) and "@domain" for
// a domain's catch-all.
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
	// mailboxes maps lower-cased addresses, and "@domain" for a
	// catch-all, to the user whose mailbox receives them.
	mailboxes map[string]string
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
	return ParseUsers(path, data)
}

// ParseUsers parses the content of a users file; path names it in errors.
func ParseUsers(path string, data []byte) (*Users, error) {
	u := &Users{hashes: map[string][]byte{}, senders: map[string][]string{}, mailboxes: map[string]string{}}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fields := strings.Split(line, ":")
		name := fields[0]
		if len(fields) < 2 || len(fields) > 4 || !ValidName(name) {
			return nil, fmt.Errorf("auth.users_file %s:%d: want name:bcrypt-hash[:senders[:addresses]] with a name of letters, digits and . _ - @ +", path, n)
		}
		if _, dup := u.hashes[name]; dup {
			return nil, fmt.Errorf("auth.users_file %s:%d: user %q appears twice", path, n, name)
		}
		hash := fields[1]
		if len(fields) > 2 && strings.TrimSpace(fields[2]) != "" {
			list, err := parseSenders(fields[2])
			if err != nil {
				return nil, fmt.Errorf("auth.users_file %s:%d: user %q: %w", path, n, name, err)
			}
			u.senders[name] = list
		}
		if len(fields) > 3 {
			for _, a := range strings.Split(fields[3], ",") {
				a = strings.ToLower(strings.TrimSpace(a))
				if a == "" {
					continue
				}
				if at := strings.LastIndexByte(a, '@'); at < 0 || at == len(a)-1 || strings.ContainsAny(a, " \t<>") {
					return nil, fmt.Errorf("auth.users_file %s:%d: user %q: address %q: want local@domain or @domain", path, n, name, a)
				}
				if other, taken := u.mailboxes[a]; taken {
					return nil, fmt.Errorf("auth.users_file %s:%d: user %q: address %q already belongs to user %q", path, n, name, a, other)
				}
				u.mailboxes[a] = name
			}
		}
		if _, err := bcrypt.Cost([]byte(hash)); err != nil {
			return nil, fmt.Errorf("auth.users_file %s:%d: user %q: not a bcrypt hash (make one with `mta user hash`)", path, n, name)
		}
		u.hashes[name] = []byte(hash)
	}
	return u, sc.Err()
}

// ValidName reports whether name can be a user (and mailbox) name: 1 to 64
// letters, digits and . _ - @ +.
func ValidName(name string) bool {
	if name == "" || len(name) > 64 {
		return false
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("._-@+", c)) {
			return false
		}
	}
	return true
}

// Mailbox returns the user whose mailbox receives mail for address: the
// user that lists the address, else the one that lists its domain as a
// catch-all.
func (u *Users) Mailbox(address string) (user string, ok bool) {
	a := strings.ToLower(address)
	if user, ok = u.mailboxes[a]; ok {
		return user, true
	}
	if at := strings.LastIndexByte(a, '@'); at >= 0 {
		user, ok = u.mailboxes[a[at:]]
	}
	return user, ok
}

// HasMailboxes reports whether any user receives mail.
func (u *Users) HasMailboxes() bool { return len(u.mailboxes) > 0 }

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
