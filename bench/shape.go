package bench

import (
	"fmt"
	"strconv"
	"strings"
)

// LoadShape is the shape of the injected mail, shared by the scenarios.
type LoadShape struct {
	SizeDist           []SizeWeight // overrides the scenario's Size when set
	Recipients         int          // recipients per message (default 1)
	NoPipelining       bool         // wait for each reply instead of pipelining
	MessagesPerSession int          // reconnect after this many; 0 = never
}

// apply sets the shape's fields of a load configuration.
func (s LoadShape) apply(c *LoadConfig) {
	c.SizeDist = s.SizeDist
	c.RecipientsPerMessage = s.Recipients
	c.Pipelining = !s.NoPipelining
	c.MessagesPerSession = s.MessagesPerSession
}

// ParseSizeDist parses "size:weight,size:weight", e.g. "1024:90,102400:10".
func ParseSizeDist(text string) ([]SizeWeight, error) {
	if text == "" {
		return nil, nil
	}
	var out []SizeWeight
	for _, part := range strings.Split(text, ",") {
		size, weight, ok := strings.Cut(strings.TrimSpace(part), ":")
		s, err1 := strconv.Atoi(size)
		w, err2 := strconv.Atoi(weight)
		if !ok || err1 != nil || err2 != nil || s <= 0 || w <= 0 {
			return nil, fmt.Errorf("size distribution %q: want size:weight,… with positive integers", text)
		}
		out = append(out, SizeWeight{Size: s, Weight: w})
	}
	return out, nil
}
