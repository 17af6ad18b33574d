package auth

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestUsersFile(t *testing.T) {
	h, err := Hash("s3cret")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "users")
	os.WriteFile(path, []byte("# app senders\n\nalice:"+h+"\n"), 0o600)
	u, err := LoadUsers(path)
	if err != nil {
		t.Fatal(err)
	}
	if u.Len() != 1 || !u.Authenticate("alice", "s3cret") {
		t.Fatal("alice with the right password refused")
	}
	if u.Authenticate("alice", "wrong") || u.Authenticate("bob", "s3cret") {
		t.Fatal("wrong credentials accepted")
	}
	os.WriteFile(path, []byte("alice:plaintext\n"), 0o600)
	if _, err := LoadUsers(path); err == nil || !strings.Contains(err.Error(), ":1: user \"alice\": not a bcrypt hash") {
		t.Fatalf("bad hash: %v", err)
	}
}
