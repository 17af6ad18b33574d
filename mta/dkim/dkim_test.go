package dkim

import (
	"bytes"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/emersion/go-msgauth/dkim"

	"github.com/mtaproject/mta/internal/pytest"
)

// keyring writes a key per (type, domain, selector) and returns the signer
// and the TXT record values by DNS name.
func keyring(t *testing.T, specs ...[3]string) (*Signer, map[string]string) {
	t.Helper()
	dir := t.TempDir()
	var keys []Key
	records := map[string]string{}
	for _, s := range specs {
		pemKey, record, err := Generate(KeyType(s[0]), s[1], s[2])
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, s[1]+"."+s[2]+".pem")
		os.WriteFile(path, pemKey, 0o600)
		keys = append(keys, Key{Domain: s[1], Selector: s[2], KeyFile: path})
		records[s[2]+"._domainkey."+s[1]] = txtValue(t, record)
	}
	sg, err := New(keys, nil)
	if err != nil {
		t.Fatal(err)
	}
	return sg, records
}

// txtValue joins the strings of a zone-file TXT line.
func txtValue(t *testing.T, record string) string {
	t.Helper()
	var b strings.Builder
	for _, m := range regexp.MustCompile(`"([^"]*)"`).FindAllStringSubmatch(record, -1) {
		b.WriteString(m[1])
	}
	return b.String()
}

func verify(t *testing.T, msg []byte, records map[string]string) error {
	t.Helper()
	vs, err := dkim.VerifyWithOptions(bytes.NewReader(msg), &dkim.VerifyOptions{LookupTXT: func(name string) ([]string, error) {
		if v, ok := records[name]; ok {
			return []string{v}, nil
		}
		return nil, errors.New("no such record " + name)
	}})
	if err != nil {
		return err
	}
	if len(vs) != 1 {
		t.Fatalf("%d signatures", len(vs))
	}
	return vs[0].Err
}

const sample = "From: Shop <noreply@mail.shop.example>\r\nTo: ann@example.org\r\nSubject: Your order\r\n" +
	"Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@shop.example>\r\nList-Unsubscribe: <mailto:u@shop.example>\r\n" +
	"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello Ann,\r\nyour order has shipped.\r\n"

// TestSignVerifies: RSA-2048 and Ed25519 signatures verify with
// go-msgauth's verifier; a changed body, a changed subject and an added
// From field (over-signed) fail.
func TestSignVerifies(t *testing.T) {
	for _, kt := range []KeyType{RSA, Ed25519} {
		t.Run(string(kt), func(t *testing.T) {
			sg, records := keyring(t, [3]string{string(kt), "shop.example", "s1"})
			sig, err := sg.Sign(nil, []byte(sample))
			if err != nil || !strings.HasPrefix(sig, "DKIM-Signature: ") || !strings.HasSuffix(sig, "\r\n") {
				t.Fatalf("signature %q: %v", sig, err)
			}
			if !strings.Contains(sig, "d=shop.example") || !strings.Contains(sig, "s=s1") || !strings.Contains(sig, "a="+map[KeyType]string{RSA: "rsa", Ed25519: "ed25519"}[kt]+"-sha256") {
				t.Errorf("signature tags: %s", sig)
			}
			hTag := regexp.MustCompile(`(?:^|;)h=([^;]*)`).FindStringSubmatch(strings.NewReplacer("\r\n", "", " ", "").Replace(sig))[1]
			n := map[string]int{}
			for _, f := range strings.Split(strings.ToLower(hTag), ":") {
				n[f]++
			}
			if n["from"] != 2 || n["list-unsubscribe-post"] != 1 || n["cc"] != 1 || n["reply-to"] != 1 || n["list-id"] != 0 {
				t.Errorf("h=%s: want From twice (over-signed), an absent List-Unsubscribe-Post, Cc and Reply-To once, no absent List-Id", hTag)
			}
			signed := []byte(sig + sample)
			if err := verify(t, signed, records); err != nil {
				t.Fatalf("a fresh signature does not verify: %v", err)
			}
			for name, tamper := range map[string]func([]byte) []byte{
				"body":     func(b []byte) []byte { return bytes.Replace(b, []byte("shipped"), []byte("shopped"), 1) },
				"subject":  func(b []byte) []byte { return bytes.Replace(b, []byte("Your order"), []byte("Your 0rder"), 1) },
				"new From": func(b []byte) []byte { return append([]byte("From: evil@attacker.example\r\n"), b...) },
				"new Reply-To": func(b []byte) []byte {
					return bytes.Replace(b, []byte("\r\nTo: ann"), []byte("\r\nReply-To: attacker@evil.test\r\nTo: ann"), 1)
				},
				"new Cc": func(b []byte) []byte {
					return bytes.Replace(b, []byte("\r\nTo: ann"), []byte("\r\nCc: x@evil.test\r\nTo: ann"), 1)
				},
			} {
				if err := verify(t, tamper(append([]byte{}, signed...)), records); err == nil {
					t.Errorf("a changed %s still verifies", name)
				}
			}
		})
	}
}

// TestDkimpyVerifies: Python's dkimpy, an independent implementation,
// verifies our RSA and Ed25519 signatures, and refuses a changed body.
func TestDkimpyVerifies(t *testing.T) {
	py := pytest.Python(t, "dkim")
	for _, kt := range []KeyType{RSA, Ed25519} {
		sg, records := keyring(t, [3]string{string(kt), "shop.example", "s1"})
		sig, err := sg.Sign(nil, []byte(sample))
		if err != nil {
			t.Fatal(err)
		}
		record := records["s1._domainkey.shop.example"]
		script := `
import sys, dkim
record = sys.argv[1].encode()
def dnsfunc(name, timeout=5):
    return record if name.rstrip(b".") == b"s1._domainkey.shop.example" else None
msg = sys.stdin.buffer.read()
print("ok" if dkim.verify(msg, dnsfunc=dnsfunc) else "fail")
`
		run := func(msg []byte) string {
			cmd := exec.Command(py, "-c", script, record)
			cmd.Stdin = bytes.NewReader(msg)
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("dkimpy: %v\n%s", err, out)
			}
			return strings.TrimSpace(string(out))
		}
		signed := []byte(sig + sample)
		if got := run(signed); got != "ok" {
			t.Errorf("%s: dkimpy says %q for our signature", kt, got)
		}
		if got := run(bytes.Replace(signed, []byte("shipped"), []byte("shopped"), 1)); got != "fail" {
			t.Errorf("%s: dkimpy says %q for a changed body", kt, got)
		}
	}
}

// TestKeyChoiceAndErrors: the From domain or its closest parent picks the
// key; other domains are not signed; bad key files are refused with the
// file named.
func TestKeyChoiceAndErrors(t *testing.T) {
	sg, _ := keyring(t, [3]string{"ed25519", "shop.example", "a"}, [3]string{"ed25519", "eu.shop.example", "b"})
	for addr, want := range map[string]string{"x@shop.example": "shop.example", "x@mail.shop.example": "shop.example",
		"x@eu.shop.example": "eu.shop.example", "x@a.eu.shop.example": "eu.shop.example", "x@example.org": "", "x@notshop.example": ""} {
		got := ""
		if k := sg.For(addr); k != nil {
			got = k.Domain
		}
		if got != want {
			t.Errorf("For(%s) = %q, want %q", addr, got, want)
		}
	}
	if sig, err := sg.Sign(nil, []byte(strings.Replace(sample, "mail.shop.example", "example.org", 1))); sig != "" || err != nil {
		t.Errorf("mail from a domain without a key: %q, %v", sig, err)
	}
	if sig, err := sg.SignWith(nil, []byte(strings.Replace(sample, "mail.shop.example", "example.org", 1)), anyFrom, "eu.shop.example"); !strings.Contains(sig, "d=eu.shop.example") || err != nil {
		t.Errorf("a tenant's signing domain for a From without a key: %q, %v", sig, err)
	}
	if sig, _ := sg.SignWith(nil, []byte(sample), anyFrom, "eu.shop.example"); !strings.Contains(sig, "d=shop.example;") {
		t.Errorf("the From domain's own key goes first: %q", sig)
	}
	if sig, _ := sg.SignWith(nil, []byte(sample), nil, ""); sig != "" {
		t.Errorf("signed by the From domain where that is not allowed: %q", sig)
	}
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "junk.pem"), []byte("not a key"), 0o600)
	pub, _, _ := ed25519.GenerateKey(nil)
	pubDER, _ := x509.MarshalPKIXPublicKey(pub)
	os.WriteFile(filepath.Join(dir, "public.pem"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), 0o600)
	for file, want := range map[string]string{"junk.pem": "no PEM block", "public.pem": `"PUBLIC KEY"`, "missing.pem": "no such file"} {
		_, err := New([]Key{{Domain: "shop.example", Selector: "s", KeyFile: filepath.Join(dir, file)}}, nil)
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), file) {
			t.Errorf("%s: %v, want %q", file, err, want)
		}
	}
}

// BenchmarkSign measures the signing cost per message.
func BenchmarkSign(b *testing.B) {
	for _, kt := range []KeyType{RSA, Ed25519} {
		b.Run(string(kt), func(b *testing.B) {
			dir := b.TempDir()
			pemKey, _, _ := Generate(kt, "shop.example", "s")
			os.WriteFile(filepath.Join(dir, "k.pem"), pemKey, 0o600)
			sg, err := New([]Key{{Domain: "shop.example", Selector: "s", KeyFile: filepath.Join(dir, "k.pem")}}, nil)
			if err != nil {
				b.Fatal(err)
			}
			msg := []byte(sample + strings.Repeat("a line of the body of a typical notification\r\n", 100))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := sg.Sign(nil, msg); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// anyFrom lets SignWith use the key of any From domain.
func anyFrom(string) bool { return true }

// TestFromFieldsAsReadersReadThem: a From display name encoded in a
// charset net/mail does not know (ISO-2022-JP, windows-1252) is signed
// like any other; so is a From domain in Unicode (by the key of its
// A-labels); a
// second From written "From :" (obsolete syntax, RFC 5322 §4.5) counts as
// a From: no signature for two of them.
func TestFromFieldsAsReadersReadThem(t *testing.T) {
	sg, records := keyring(t, [3]string{"ed25519", "shop.example", "s1"}, [3]string{"ed25519", "bücher.example", "s1"})
	records["s1._domainkey.xn--bcher-kva.example"] = records["s1._domainkey.bücher.example"]
	for _, tc := range []struct {
		name, from string
		signs      string // the d= of the signature, "" for none
	}{
		{"iso-2022-jp", "From: =?ISO-2022-JP?B?GyRCJUYlOSVIGyhC?= <noreply@shop.example>", "shop.example"},
		{"windows-1252", "From: =?windows-1252?Q?Caf=E9?= <noreply@shop.example>", "shop.example"},
		{"unicode domain", "From: noreply@bücher.example", "xn--bcher-kva.example"},
		{"two From", "From: noreply@shop.example\r\nFrom : ceo@bank.example", ""},
	} {
		msg := strings.Replace(sample, "From: Shop <noreply@mail.shop.example>", tc.from, 1)
		sig, err := sg.Sign(nil, []byte(msg))
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		switch {
		case tc.signs == "" && sig != "":
			t.Errorf("%s: signed %s", tc.name, sig)
		case tc.signs != "" && !strings.Contains(sig, "d="+tc.signs+";"):
			t.Errorf("%s: signature %q, want d=%s", tc.name, sig, tc.signs)
		case tc.signs != "":
			if err := verify(t, []byte(sig+msg), records); err != nil {
				t.Errorf("%s: does not verify: %v", tc.name, err)
			}
		}
	}
}
