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

func TestSenderLists(t *testing.T) {
	h, _ := Hash("pw")
	path := filepath.Join(t.TempDir(), "users")
	os.WriteFile(path, []byte("free:"+h+"\napp:"+h+":noreply@example.com, @mail.example.org,example.net\n"), 0o600)
	u, err := LoadUsers(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		user, from string
		ok         bool
	}{
		{"free", "anyone@anywhere.test", true},
		{"app", "noreply@example.com", true},
		{"app", "NoReply@Example.COM", true},
		{"app", "other@example.com", false},
		{"app", "x@mail.example.org", true},
		{"app", "x@sub.mail.example.org", false},
		{"app", "x@example.net", true},
		{"app", "", true},
	} {
		if got := u.MaySend(tc.user, tc.from); got != tc.ok {
			t.Errorf("MaySend(%q, %q) = %v", tc.user, tc.from, got)
		}
	}
	os.WriteFile(path, []byte("app:"+h+":a@b@c\n"), 0o600)
	if _, err := LoadUsers(path); err == nil || !strings.Contains(err.Error(), ":1: user \"app\": sender") {
		t.Fatalf("bad sender list: %v", err)
	}
}
