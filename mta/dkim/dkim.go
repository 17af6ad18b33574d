// Package dkim signs outgoing mail (RFC 6376, with RSA-SHA256 and
// Ed25519-SHA256 per RFC 8463) with github.com/emersion/go-msgauth: keys
// per signing domain, chosen by the From domain, with the header fields
// that matter signed and the ones an attacker would add over-signed. It
// also makes keys and their DNS records (`mta dkim keygen`).
package dkim

import (
	"bytes"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/mail"
	"os"
	"strings"
	"time"

	"github.com/emersion/go-msgauth/dkim"

	"github.com/mtaproject/mta/mta"
)

// Key is one signing key as configured.
type Key struct {
	Domain   string // the signing domain (d=); mail whose From domain is it or under it is signed
	Selector string // s=: the key is published at SELECTOR._domainkey.DOMAIN
	KeyFile  string // PEM: PKCS #8, PKCS #1 (RSA) or an Ed25519 private key
}

// DefaultHeaders are the header fields signed when present (RFC 6376
// §5.4.1's recommendation, and the MIME and list fields that change how a
// message shows).
var DefaultHeaders = []string{"From", "Reply-To", "Subject", "Date", "To", "Cc", "Message-ID",
	"In-Reply-To", "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
	"List-Unsubscribe", "List-Unsubscribe-Post", "List-Id", "Feedback-ID"}

// OverSigned are signed once more than they appear (and once when absent),
// so that nobody can add one after signing without breaking the
// signature (RFC 6376 §8.15): a replayed message cannot gain a Reply-To,
// a recipient or a MIME structure. List-Id and Feedback-ID are left out:
// a mailing list that adds its List-Id re-signs anyway.
var OverSigned = []string{"From", "Reply-To", "Subject", "Date", "To", "Cc", "Message-ID",
	"In-Reply-To", "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
	"List-Unsubscribe", "List-Unsubscribe-Post"}

// Signer signs messages with the key of their From domain. It is safe for
// concurrent use.
type Signer struct {
	keys    map[string]*loaded // by domain, lower case
	headers []string
	now     func() time.Time
}

type loaded struct {
	Key
	signer crypto.Signer
}

// New loads the keys. Its errors name the key file and what is wrong.
// headers nil means DefaultHeaders.
func New(keys []Key, headers []string) (*Signer, error) {
	s := &Signer{keys: map[string]*loaded{}, headers: headers, now: time.Now}
	if s.headers == nil {
		s.headers = DefaultHeaders
	}
	for _, k := range keys {
		d, ok := mta.NormalizeDomain(k.Domain)
		if !ok {
			return nil, fmt.Errorf("dkim: %q is not a domain", k.Domain)
		}
		if _, dup := s.keys[d]; dup {
			return nil, fmt.Errorf("dkim: two keys for %s", d)
		}
		signer, err := LoadKey(k.KeyFile)
		if err != nil {
			return nil, err
		}
		k.Domain = d
		s.keys[d] = &loaded{Key: k, signer: signer}
	}
	return s, nil
}

// LoadKey reads a private key for signing: RSA of at least 1024 bits
// (2048 recommended), or Ed25519.
func LoadKey(path string) (crypto.Signer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(b)
	if block == nil {
		return nil, fmt.Errorf("%s: no PEM block (want a private key as written by `mta dkim keygen`)", path)
	}
	var key any
	switch block.Type {
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("%s: a %q PEM block, want PRIVATE KEY or RSA PRIVATE KEY", path, block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	switch k := key.(type) {
	case *rsa.PrivateKey:
		if k.N.BitLen() < 1024 {
			return nil, fmt.Errorf("%s: an RSA key of %d bits; verifiers ignore keys under 1024 (RFC 8301), use 2048", path, k.N.BitLen())
		}
		return k, nil
	case ed25519.PrivateKey:
		return k, nil
	}
	return nil, fmt.Errorf("%s: a %T key, want RSA or Ed25519", path, key)
}

// For returns the key that signs mail from address: the key of its
// domain or of the closest parent domain (relaxed alignment, RFC 7489
// §3.1.1); nil when none.
func (s *Signer) For(address string) *Key {
	d, ok := mta.NormalizeDomain(mta.Domain(address)) // as the keys are: A-labels, no final dot
	for ok && d != "" {
		if k := s.keys[d]; k != nil {
			return &k.Key
		}
		_, parent, ok := strings.Cut(d, ".")
		if !ok {
			break
		}
		d = parent
	}
	return nil
}

// Empty reports whether the signer has no keys.
func (s *Signer) Empty() bool { return s == nil || len(s.keys) == 0 }

// Sign returns the DKIM-Signature field (with its CRLF) for the message
// that is header followed by body (the header section may go on into
// body: header is what the server put in front), signed with the key for
// its From address; "" when no key applies.
func (s *Signer) Sign(header, body []byte) (string, error) {
	return s.SignWith(header, body, func(string) bool { return true }, "")
}

// SignWith is Sign with a choice: byFrom (nil: never) says whether the
// key of the From address's domain may be used, and fallback (a tenant's
// signing domain) is used when that gives none.
func (s *Signer) SignWith(header, body []byte, byFrom func(from string) bool, fallback string) (string, error) {
	if s.Empty() {
		return "", nil
	}
	m, err := mail.ReadMessage(io.MultiReader(bytes.NewReader(header), bytes.NewReader(body)))
	if err != nil {
		return "", fmt.Errorf("dkim: reading the header: %v", err)
	}
	froms := mta.HeaderValues(m.Header, "From")
	if len(froms) != 1 {
		return "", nil // no single From field: nothing to align with
	}
	from, err := mta.ParseAddressField(froms[0])
	if err != nil {
		return "", nil // no From address
	}
	var key *Key
	if byFrom != nil && byFrom(from.Address) {
		key = s.For(from.Address)
	}
	if key == nil && fallback != "" {
		if k := s.keys[strings.ToLower(fallback)]; k != nil {
			key = &k.Key
		}
	}
	if key == nil {
		return "", nil
	}
	opts := &dkim.SignOptions{
		Domain:                 key.Domain,
		Selector:               key.Selector,
		Signer:                 s.keys[key.Domain].signer,
		HeaderCanonicalization: dkim.CanonicalizationRelaxed,
		BodyCanonicalization:   dkim.CanonicalizationRelaxed,
		HeaderKeys:             s.headerKeys(m.Header),
	}
	signer, err := dkim.NewSigner(opts)
	if err != nil {
		return "", err
	}
	for _, part := range [][]byte{header, body} {
		if _, err := signer.Write(part); err != nil {
			signer.Close()
			return "", err
		}
	}
	if err := signer.Close(); err != nil {
		return "", err
	}
	return signer.Signature(), nil
}

// headerKeys lists each signed field as often as it appears, and the
// over-signed ones once more.
func (s *Signer) headerKeys(h mail.Header) []string {
	var keys []string
	for _, name := range s.headers {
		n := len(mta.HeaderValues(h, name)) // "From :" too, which the verifier counts as From
		for _, o := range OverSigned {
			if strings.EqualFold(o, name) {
				n++
			}
		}
		for range n {
			keys = append(keys, name)
		}
	}
	return keys
}

// KeyType names a key algorithm for Generate.
type KeyType string

// Key types.
const (
	RSA     KeyType = "rsa"
	Ed25519 KeyType = "ed25519"
)

// Generate makes a new private key (PKCS #8 PEM) and the TXT record that
// publishes it at SELECTOR._domainkey.DOMAIN.
func Generate(t KeyType, domain, selector string) (keyPEM []byte, record string, err error) {
	var priv crypto.Signer
	var k string
	switch t {
	case RSA, "":
		priv, err = rsa.GenerateKey(rand.Reader, 2048)
		k = "rsa"
	case Ed25519:
		_, priv, err = ed25519.GenerateKey(rand.Reader)
		k = "ed25519"
	default:
		return nil, "", fmt.Errorf("key type %q: want rsa or ed25519", t)
	}
	if err != nil {
		return nil, "", err
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, "", err
	}
	var pub []byte
	switch p := priv.Public().(type) {
	case *rsa.PublicKey:
		pub, err = x509.MarshalPKIXPublicKey(p)
	case ed25519.PublicKey:
		pub = p // RFC 8463: the raw 32 octets
	default:
		err = errors.New("unknown public key")
	}
	if err != nil {
		return nil, "", err
	}
	value := "v=DKIM1; k=" + k + "; p=" + base64.StdEncoding.EncodeToString(pub)
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), TXTRecord(domain, selector, value), nil
}

// TXTRecord renders a zone-file line for value, split into strings of at
// most 255 octets as TXT records need.
func TXTRecord(domain, selector, value string) string {
	var parts []string
	for len(value) > 255 {
		parts = append(parts, `"`+value[:255]+`"`)
		value = value[255:]
	}
	parts = append(parts, `"`+value+`"`)
	return selector + "._domainkey." + strings.TrimSuffix(domain, ".") + ". IN TXT ( " + strings.Join(parts, " ") + " )"
}
