package bench

import (
	"bytes"
	"strconv"
)

// generator builds the deterministic messages of a run. The body text comes
// from a pool of pre-generated lines (built once from Seed) starting at a
// line picked per message, so building a message is mostly copying.
type generator struct {
	seed     int64
	from     string
	domains  []string
	rcpts    int
	size     int
	dist     []SizeWeight
	totalW   uint64
	pool     []byte // CRLF-terminated lines
	starts   []int  // offsets of the lines a body may start at
	seedText []byte // seed in hex, for Message-ID
}

const (
	poolSpread = 64 << 10 // bodies start within the first poolSpread bytes
	printable  = "!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~"
)

func newGenerator(cfg *LoadConfig) *generator {
	g := &generator{
		seed:    cfg.Seed,
		from:    cfg.From,
		domains: cfg.Domains,
		rcpts:   cfg.RecipientsPerMessage,
		size:    cfg.Size,
	}
	maxSize := cfg.Size
	for _, sw := range cfg.SizeDist {
		if sw.Weight > 0 {
			g.dist = append(g.dist, sw)
			g.totalW += uint64(sw.Weight)
			maxSize = max(maxSize, sw.Size)
		}
	}
	g.seedText = strconv.AppendUint(nil, uint64(cfg.Seed), 16)
	g.pool, g.starts = buildPool(uint64(cfg.Seed), poolSpread+maxSize+2*(maxLineLen+2))
	return g
}

// splitmix64 step: a tiny, good-enough deterministic generator.
func splitmix(x *uint64) uint64 {
	*x += 0x9e3779b97f4a7c15
	z := *x
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// buildPool generates at least n bytes of body lines: printable ASCII of at
// most maxLineLen characters, no leading or trailing space, CRLF endings,
// including some empty lines, lines starting with "." and lines that are
// only dots.
func buildPool(seed uint64, n int) (pool []byte, starts []int) {
	st := seed ^ 0x5deece66d1234567
	pool = make([]byte, 0, n+maxLineLen+2)
	for len(pool) < n {
		if len(pool) < poolSpread {
			starts = append(starts, len(pool))
		}
		r := splitmix(&st)
		switch {
		case r%97 == 0:
			pool = append(pool, '.')
		case r%89 == 0:
			pool = append(pool, '.', '.')
		case r%53 == 0:
			// empty line
		default:
			length := 20 + int((r>>8)%(maxLineLen-20+1))
			lead := (r>>20)%11 == 0
			var bits uint64
			for i := range length {
				if i%8 == 0 {
					bits = splitmix(&st)
				}
				b := byte(bits)
				bits >>= 8
				c := printable[int(b)%len(printable)]
				switch {
				case i == 0 && lead:
					c = '.'
				case i > 0 && i < length-1 && b%7 == 0:
					c = ' '
				}
				pool = append(pool, c)
			}
		}
		pool = append(pool, '\r', '\n')
	}
	return pool, starts
}

// mix gives the per-message random state.
func (g *generator) mix(seq int) uint64 {
	st := uint64(g.seed) ^ (uint64(seq)+1)*0xd1b54a32d192ed03
	splitmix(&st)
	return st
}

// msgSize picks the size of message seq.
func (g *generator) msgSize(st *uint64) int {
	if len(g.dist) == 0 {
		return g.size
	}
	x := splitmix(st) % g.totalW
	for _, sw := range g.dist {
		if x < uint64(sw.Weight) {
			return sw.Size
		}
		x -= uint64(sw.Weight)
	}
	return g.dist[len(g.dist)-1].Size // unreachable
}

// appendRcpt appends recipient j of message seq.
func (g *generator) appendRcpt(b []byte, seq, j int) []byte {
	b = append(b, "user"...)
	b = strconv.AppendInt(b, int64(j+1), 10)
	b = append(b, '@')
	return append(b, g.domains[seq%len(g.domains)]...)
}

// rcptLen is the length of recipient j of message seq.
func (g *generator) rcptLen(seq, j int) int {
	n := len("user@") + len(g.domains[seq%len(g.domains)])
	for k := j + 1; k > 0; k /= 10 {
		n++
	}
	return n
}

// message is one generated message as three segments; their concatenation
// is the message (headers and body, CRLF line endings, not dot-stuffed).
// Only head and tail are per-message copies: body aliases the shared pool,
// so a message of any size costs a few hundred bytes.
type message struct {
	head []byte // headers and the blank line after them
	body []byte // whole body lines, a slice of generator.pool: read-only
	tail []byte // a cut last body line and CRLF, or empty
}

// len is the message size in bytes.
func (m *message) len() int { return len(m.head) + len(m.body) + len(m.tail) }

// appendTo appends the message bytes to dst.
func (m *message) appendTo(dst []byte) []byte {
	dst = append(dst, m.head...)
	dst = append(dst, m.body...)
	return append(dst, m.tail...)
}

// compose makes m message seq: it appends the headers to m.head (callers
// normally pass m.head[:0]), points m.body into the pool and reuses m.tail's
// capacity for the tail. A long To: header is folded. The message size is
// the configured size unless the headers alone exceed it (then the body is
// one short line) or the last body line would be shorter than one character
// (then it is 1 or 2 bytes short).
func (g *generator) compose(m *message, seq int) {
	st := g.mix(seq)
	size := g.msgSize(&st)
	start := len(m.head)
	m.head = g.appendHeader(m.head, seq)

	remaining := max(size-(len(m.head)-start), 3)
	p := g.pool[g.starts[splitmix(&st)%uint64(len(g.starts))]:]
	n := 0 // length of the whole lines that fit
	for {
		i := bytes.IndexByte(p[n:], '\n')
		if i < 0 || n+i+1 > remaining { // i < 0 cannot happen: the pool is long enough
			break
		}
		n += i + 1
	}
	m.body = p[:n:n]
	remaining -= n
	p = p[n:]
	m.tail = m.tail[:0]
	if remaining >= 3 && remaining-2 <= len(p) {
		// A prefix of the next line, which is longer than remaining-2.
		m.tail = append(m.tail, p[:remaining-2]...)
		if m.tail[len(m.tail)-1] == ' ' {
			m.tail[len(m.tail)-1] = '~'
		}
		m.tail = append(m.tail, '\r', '\n')
	}
}

// appendHeader appends the headers of message seq and the empty line that
// ends them.
func (g *generator) appendHeader(dst []byte, seq int) []byte {
	dst = append(dst, "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nFrom: "...)
	dst = append(dst, g.from...)
	dst = append(dst, "\r\nTo: "...)
	lineStart := len(dst) - len("To: ")
	for j := range g.rcpts {
		if j > 0 {
			// Fold before a recipient that would not fit in the line.
			if len(dst)-lineStart+len(", ")+g.rcptLen(seq, j) > maxLineLen {
				dst = append(dst, ",\r\n "...)
				lineStart = len(dst) - 1
			} else {
				dst = append(dst, ", "...)
			}
		}
		dst = g.appendRcpt(dst, seq, j)
	}
	dst = append(dst, "\r\nSubject: bench message "...)
	dst = strconv.AppendInt(dst, int64(seq), 10)
	dst = append(dst, "\r\nMessage-ID: <"...)
	dst = strconv.AppendInt(dst, int64(seq), 10)
	dst = append(dst, '.')
	dst = append(dst, g.seedText...)
	dst = append(dst, "@loadgen.bench.test>\r\nX-Load-Seq: "...)
	dst = strconv.AppendInt(dst, int64(seq), 10)
	return append(dst, "\r\n\r\n"...)
}
