package sevenbit

import (
	"bytes"
	"errors"
	"io"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/mail"
	"strings"
	"testing"
)

// leaf is one decoded MIME leaf: its content type and its content.
type leaf struct {
	mediaType string
	content   string
}

// leaves decodes msg the way a mail reader does and returns its leaves in
// order. 8bit and binary parts are taken as they are, quoted-printable and
// base64 ones decoded.
func leaves(t *testing.T, msg []byte) []leaf {
	t.Helper()
	m, err := mail.ReadMessage(bytes.NewReader(msg))
	if err != nil {
		t.Fatalf("reading message: %v", err)
	}
	var out []leaf
	walk(t, textproto(m.Header), m.Body, "text/plain", &out)
	return out
}

type header interface{ Get(string) string }

type textproto mail.Header

func (h textproto) Get(k string) string { return mail.Header(h).Get(k) }

func walk(t *testing.T, h header, body io.Reader, defaultType string, out *[]leaf) {
	t.Helper()
	mediaType, params := defaultType, map[string]string{}
	if ct := h.Get("Content-Type"); ct != "" {
		var err error
		if mediaType, params, err = mime.ParseMediaType(ct); err != nil {
			t.Fatalf("content type %q: %v", ct, err)
		}
	}
	switch {
	case strings.HasPrefix(mediaType, "multipart/"):
		r := multipart.NewReader(body, params["boundary"])
		for {
			p, err := r.NextRawPart()
			if err == io.EOF {
				return
			}
			if err != nil {
				t.Fatalf("next part: %v", err)
			}
			walk(t, p.Header, p, "text/plain", out)
		}
	case mediaType == "message/rfc822":
		m, err := mail.ReadMessage(body)
		if err != nil {
			t.Fatalf("embedded message: %v", err)
		}
		walk(t, textproto(m.Header), m.Body, "text/plain", out)
	default:
		switch strings.ToLower(h.Get("Content-Transfer-Encoding")) {
		case "quoted-printable":
			body = quotedprintable.NewReader(body)
		case "base64":
			b, _ := io.ReadAll(body)
			*out = append(*out, leaf{mediaType, "base64:" + strings.Join(strings.Fields(string(b)), "")})
			return
		}
		b, err := io.ReadAll(body)
		if err != nil {
			t.Fatalf("reading part: %v", err)
		}
		// Line breaks are canonical CRLF once decoded, whatever the input used.
		*out = append(*out, leaf{mediaType, strings.ReplaceAll(strings.ReplaceAll(string(b), "\r\n", "\n"), "\n", "\r\n")})
	}
}

func check7Bit(t *testing.T, b []byte) {
	t.Helper()
	for i, c := range b {
		if c >= 0x80 {
			t.Fatalf("8-bit octet %#x at %d in converted message:\n%s", c, i, b)
		}
	}
	for _, line := range bytes.Split(b, []byte("\r\n")) {
		if len(line) > 998 {
			t.Fatalf("line of %d octets in converted message", len(line))
		}
	}
}

// roundTrip converts msg, checks that the result is 7-bit and reads the same
// as msg, and returns it.
func roundTrip(t *testing.T, msg string) string {
	t.Helper()
	out, err := Convert([]byte(msg))
	if err != nil {
		t.Fatalf("Convert: %v", err)
	}
	check7Bit(t, out)
	want, got := leaves(t, []byte(msg)), leaves(t, out)
	if len(want) != len(got) {
		t.Fatalf("%d leaves before, %d after:\n%s", len(want), len(got), out)
	}
	for i := range want {
		if want[i].content != got[i].content {
			t.Errorf("leaf %d (%s) changed:\nbefore %q\nafter  %q", i, want[i].mediaType, want[i].content, got[i].content)
		}
	}
	return string(out)
}

func TestConvertPlainMessage(t *testing.T) {
	msg := "From: a@x.test\r\nSubject: hi\r\n\r\nGrüße aus Köln.\r\n.leading dot\r\ntrailing space \r\n"
	out := roundTrip(t, msg)
	for _, want := range []string{"MIME-Version: 1.0\r\n", "Content-Type: text/plain; charset=unknown-8bit\r\n",
		"Content-Transfer-Encoding: quoted-printable\r\n", "Gr=C3=BC=C3=9Fe aus K=C3=B6ln.\r\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("converted message lacks %q:\n%s", want, out)
		}
	}
	if !strings.HasPrefix(out, "From: a@x.test\r\nSubject: hi\r\n") {
		t.Errorf("header fields were not kept in order:\n%s", out)
	}
}

func TestConvertReplacesTransferEncoding(t *testing.T) {
	msg := "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding:\r\n 8bit\r\nSubject: x\r\n\r\n" +
		strings.Repeat("é", 1500) + "\r\n"
	out := roundTrip(t, msg)
	if strings.Count(out, "Content-Transfer-Encoding") != 1 || !strings.Contains(out, "Content-Transfer-Encoding: quoted-printable\r\nSubject: x\r\n") && !strings.Contains(out, "Subject: x\r\nContent-Transfer-Encoding: quoted-printable\r\n") {
		t.Errorf("the folded 8bit field was not replaced by one quoted-printable field:\n%.400s", out)
	}
	if strings.Contains(out, "unknown-8bit") {
		t.Error("a declared charset was replaced")
	}
}

func TestConvertMultipart(t *testing.T) {
	msg := "MIME-Version: 1.0\r\n" +
		"Content-Type: multipart/mixed; boundary=\"outer\"\r\n" +
		"Content-Transfer-Encoding: 8bit\r\n\r\n" +
		"Präambel\r\n" +
		"--outer\r\n" +
		"Content-Type: multipart/alternative; boundary=inner\r\n\r\n" +
		"--inner\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nnaïve café\r\n" +
		"--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>naïve</p>\r\n--inner--\r\n" +
		"--outer \r\n" +
		"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECAwQF\r\n" +
		"--outer\r\n" +
		"Content-Type: text/plain\r\n\r\nplain ascii, kept as it is\r\n" +
		"--outer\r\n" +
		"Content-Type: message/rfc822\r\n\r\n" +
		"From: b@y.test\r\nSubject: forwarded\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\nd\xe9j\xe0 vu\r\n" +
		"--outer--\r\nEpilog ünd so\r\n"
	out := roundTrip(t, msg)
	for _, want := range []string{
		"Content-Type: multipart/mixed; boundary=\"outer\"\r\nContent-Transfer-Encoding: 7bit\r\n\r\nPr??ambel\r\n--outer\r\n",
		"Content-Type: text/plain\r\n\r\nplain ascii, kept as it is\r\n--outer\r\n",
		"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECAwQF\r\n--outer\r\n",
		"Content-Transfer-Encoding: quoted-printable\r\n\r\nd=E9j=E0 vu\r\n--outer--\r\nEpilog ??nd so\r\n",
		"--outer \r\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("converted message lacks %q:\n%s", want, out)
		}
	}
}

func TestConvertLFLineBreaksAndBinary(t *testing.T) {
	roundTrip(t, "Subject: lf\n\nzwei\nZeilen ä\n")
	out, err := Convert([]byte("Content-Type: application/x-thing\r\nContent-Transfer-Encoding: binary\r\n\r\n\xff\r\n\x00\xfe"))
	if err != nil {
		t.Fatal(err)
	}
	check7Bit(t, out)
	if !bytes.HasSuffix(out, []byte("\r\n\r\n=FF=0D=0A=00=FE")) {
		t.Errorf("binary part was not encoded octet for octet: %q", out)
	}
}

func TestConvertLeavesASCIIAlone(t *testing.T) {
	msg := []byte("Subject: Grüße\r\n\r\nascii body\r\n")
	if Needed(msg) {
		t.Error("an 8-bit header with an ASCII body needs no 8BITMIME")
	}
	out, err := Convert(msg)
	if err != nil || !bytes.Equal(out, msg) {
		t.Errorf("Convert changed a message that needed nothing: %q, %v", out, err)
	}
	if !Needed([]byte("Subject: x\r\n\r\n\xe9\r\n")) {
		t.Error("an 8-bit body was not noticed")
	}
}

func TestConvertRefusesWhatItCannotConvert(t *testing.T) {
	deep := "Content-Type: text/plain\r\n\r\n\xe9\r\n"
	for i := 0; i < MaxDepth+2; i++ {
		deep = "Content-Type: message/rfc822\r\n\r\n" + deep
	}
	for name, msg := range map[string]string{
		"8-bit header":          "Subject: Grüße\r\n\r\nGrüße\r\n",
		"8-bit part header":     "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Description: é\r\n\r\né\r\n--b--\r\n",
		"no boundary":           "Content-Type: multipart/mixed\r\n\r\né\r\n",
		"message/global":        "Content-Type: message/global\r\n\r\nSubject: é\r\n\r\né\r\n",
		"8-bit in base64":       "Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n\xe9\r\n",
		"8-bit in qp":           "Content-Type: text/plain\r\nContent-Transfer-Encoding: Quoted-Printable\r\n\r\n\xe9\r\n",
		"nesting past MaxDepth": deep,
	} {
		if out, err := Convert([]byte(msg)); err == nil {
			t.Errorf("%s: converted instead of refused:\n%s", name, out)
		}
	}
	if _, err := Convert([]byte("Subject: é\r\n\r\né")); !errors.Is(err, ErrHeader8Bit) {
		t.Errorf("8-bit header: %v, want ErrHeader8Bit", err)
	}
}

func FuzzConvert(f *testing.F) {
	f.Add([]byte("Subject: x\r\n\r\n\xe9\r\n"))
	f.Add([]byte("Content-Type: multipart/mixed; boundary=b\r\n\r\n\xe9\r\n--b\r\n\r\n\xe9\r\n--b--\r\n\xe9"))
	f.Add([]byte("Content-Type: message/rfc822\r\n\r\nContent-Type: multipart/x; boundary=\"a b\"\n\n--a b\n\n\xff\n--a b"))
	f.Fuzz(func(t *testing.T, msg []byte) {
		out, err := Convert(msg)
		if err != nil || !Needed(msg) {
			return
		}
		for i, c := range out {
			if c >= 0x80 {
				t.Fatalf("8-bit octet at %d after a successful conversion: %q", i, out)
			}
		}
	})
}

// TestSoftBreaksNeverMakeABoundary: a line that has the boundary inside it
// (legal: only a line that starts with it is a delimiter) must not be
// soft-broken so that an encoded line starts with it.
func TestSoftBreaksNeverMakeABoundary(t *testing.T) {
	for pad := 1; pad < 160; pad++ {
		line := strings.Repeat("é", pad/8) + strings.Repeat("x", pad%8) + "--b1 and more text after the boundary"
		msg := "Content-Type: multipart/mixed; boundary=b1\r\n\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" +
			line + "\r\n.dot line\r\n--b1--\r\n"
		out := roundTrip(t, msg)
		for _, l := range strings.Split(out, "\r\n") {
			if strings.HasPrefix(l, "--b1") && l != "--b1" && l != "--b1--" {
				t.Fatalf("pad %d: an encoded line starts with the boundary: %q", pad, l)
			}
			if len(l) > 76 {
				t.Fatalf("pad %d: encoded line of %d octets", pad, len(l))
			}
		}
	}
}
