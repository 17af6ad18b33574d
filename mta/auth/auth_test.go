package auth

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
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

// TestUpdateKeepsOwnerModeAndComments: an edit keeps the file's mode,
// owner and group (the server reads it through its group) and every other
// line, and follows a symlink.
func TestUpdateKeepsOwnerModeAndComments(t *testing.T) {
	dir := t.TempDir()
	real := filepath.Join(dir, "users.real")
	hash, _ := Hash("x")
	os.WriteFile(real, []byte("# team\napp:"+hash+"\n"), 0o640)
	if os.Geteuid() == 0 {
		os.Chown(real, 0, 65534) // a group the server would be in
	}
	link := filepath.Join(dir, "users")
	os.Symlink(real, link)
	if err := Update(link, "bob", func(*Entry) (*Entry, error) {
		return &Entry{Name: "bob", Hash: hash, Addresses: []string{"bob@x.test"}}, nil
	}); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(link)
	if err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Fatalf("the symlink was replaced: %v %v", fi.Mode(), err)
	}
	fi, _ = os.Stat(real)
	if fi.Mode().Perm() != 0o640 {
		t.Errorf("mode %v", fi.Mode().Perm())
	}
	if st := fi.Sys().(*syscall.Stat_t); os.Geteuid() == 0 && st.Gid != 65534 {
		t.Errorf("group %d, want 65534", st.Gid)
	}
	data, _ := os.ReadFile(real)
	if !strings.HasPrefix(string(data), "# team\napp:") || !strings.Contains(string(data), "\nbob:"+hash+"::bob@x.test\n") {
		t.Errorf("file:\n%s", data)
	}
}
