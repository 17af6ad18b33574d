package bench

import "testing"

func TestParseSizeDist(t *testing.T) {
	got, err := ParseSizeDist("1024:90, 102400:10")
	if err != nil || len(got) != 2 || got[1] != (SizeWeight{Size: 102400, Weight: 10}) {
		t.Fatalf("ParseSizeDist = %v, %v", got, err)
	}
	for _, bad := range []string{"1024", "x:1", "1024:0", "-1:5"} {
		if _, err := ParseSizeDist(bad); err == nil {
			t.Errorf("ParseSizeDist(%q) accepted", bad)
		}
	}
	if got, err := ParseSizeDist(""); got != nil || err != nil {
		t.Fatalf("empty: %v, %v", got, err)
	}
}
