package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// LoadConfig describes one load run. The zero value of every optional field
// selects the documented default.
type LoadConfig struct {
	// Addr is host:port of the SMTP server. Only loopback addresses are
	// accepted (127.0.0.0/8, ::1, or the name "localhost"); anything else
	// makes RunLoad fail with ErrNotLoopback. The address actually
	// connected to is checked again after each dial.
	Addr string
	// Sessions is the number of concurrent SMTP sessions (TCP connections).
	// Default 1; never more than Messages.
	Sessions int
	// Messages is the total number of messages to send across all sessions.
	// Must be > 0.
	Messages int
	// MessagesPerSession is the number of messages sent over one connection
	// before QUIT and reconnect; 0 = unlimited.
	MessagesPerSession int
	// Size is the approximate message size in bytes (headers+body, before
	// dot-stuffing), >= 200; 0 means 1024. The body is printable ASCII lines
	// of at most 76 characters with CRLF line endings; some lines start with
	// "." (and some are just "."), so dot-stuffing is exercised.
	Size int
	// SizeDist, if set, overrides Size: each message's size is picked by
	// weight, deterministically from Seed and the message's sequence number.
	SizeDist []SizeWeight
	// RecipientsPerMessage is the number of RCPT TO per message; default 1.
	// Recipient j (0-based) of a message is "user<j+1>@<domain>".
	RecipientsPerMessage int
	// Domains are the recipient domains, round-robin over messages (message
	// seq uses Domains[seq%len(Domains)]); default ["example.com"].
	Domains []string
	// From is the envelope sender and From: header; default
	// "loadgen@bench.test".
	From string
	// Pipelining: if true, send MAIL, all RCPTs and DATA in one write and
	// read the replies after (RFC 2920). The server must advertise
	// PIPELINING, otherwise RunLoad fails. If false, wait for each reply.
	Pipelining bool
	// EHLO is the EHLO argument; default "loadgen.bench.test".
	EHLO string
	// Timeout bounds each reply read (and the write before it) and each
	// dial; default 30s. (For efficiency the I/O deadline is only moved
	// when stale, so the effective bound is 90-100% of Timeout.)
	Timeout time.Duration
	// Seed makes the generated messages deterministic: the same Seed and
	// sequence number always give the same bytes.
	Seed int64
	// Progress, if set, is called at most ~10 times per second from a single
	// goroutine with the number of messages finished so far (any outcome) and
	// the number accepted so far, and once more with the final counts before
	// RunLoad returns.
	Progress func(sent, accepted int)
	// CollectIDs makes RunLoad fill LoadResult.QueueIDs.
	CollectIDs bool
	// OnAccepted, if set, is called for every message accepted with a 2xx at
	// end of DATA, with the queue ID parsed from the reply ("" if none) and
	// the exact message bytes as sent before dot-stuffing (what the server
	// should store after its own trace headers). Calls are serialized (never
	// concurrent) and made in acceptance order, but from the session
	// goroutines, so a slow callback slows the load. msg is reused after the
	// call returns: copy it to keep it.
	OnAccepted func(id string, msg []byte)
}

// SizeWeight is one entry of a message size distribution.
type SizeWeight struct {
	Size   int // message size in bytes, >= 200
	Weight int // relative weight, >= 0; entries of weight 0 are never picked
}

// LoadResult is what a run measured. Every attempted message is counted in
// exactly one of Accepted, TempFailed, PermFailed and Errors.
type LoadResult struct {
	// Attempted counts messages for which a MAIL FROM was sent.
	Attempted int
	// Accepted counts messages with a 2xx reply at end of DATA (even if
	// some of their recipients were refused; see RcptRejected).
	Accepted int
	// TempFailed counts messages refused with 4xx: at MAIL, at DATA, at end
	// of DATA, or at RCPT when no recipient was accepted and at least one
	// refusal was 4xx. A 421 also closes the connection.
	TempFailed int
	// PermFailed counts messages refused with 5xx at MAIL, DATA or end of
	// DATA, or whose recipients were all refused with 5xx.
	PermFailed int
	// Errors counts messages lost to I/O errors, timeouts, protocol errors
	// (malformed or unexpected replies) or cancellation of the context.
	Errors int
	// RcptRejected counts individual RCPT TO refused with 4xx or 5xx.
	RcptRejected int
	// Latency holds one sample per accepted message: the time from writing
	// the final "\r\n.\r\n" to reading the complete end-of-data reply. (For
	// messages over 64 KiB the last 8 KiB are written separately and timed.)
	Latency Durations
	// Elapsed is the wall time from first connect to the last final reply
	// of a message (normally the end-of-data reply; for a refused message,
	// the refusal; for an error, when it occurred).
	Elapsed time.Duration
	// Connections counts TCP connections opened.
	Connections int
	// Replies counts the codes of the end-of-DATA replies, e.g. "250",
	// "451", "552" (only for messages whose content was sent).
	Replies map[string]int
	// QueueIDs holds, if LoadConfig.CollectIDs, the ID from each 2xx
	// end-of-data reply whose text contains "queued as <ID>" (matched
	// case-insensitively; surrounding <>, () and a trailing period are
	// dropped), in order of acceptance. Replies without an ID contribute
	// nothing.
	QueueIDs []string
}

// Rate returns accepted messages per second over Elapsed.
func (r LoadResult) Rate() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Accepted) / r.Elapsed.Seconds()
}

// ErrNotLoopback is returned (wrapped) for a LoadConfig.Addr that is not a
// loopback address.
var ErrNotLoopback = errors.New("bench: address is not loopback")

// errProtocol marks malformed or out-of-sequence replies.
var errProtocol = errors.New("bench: SMTP protocol error")

// errFatal marks failures that stop the whole run (already recorded).
var errFatal = errors.New("bench: run aborted")

// Fixed commands, allocated once.
var (
	cmdData = []byte("DATA\r\n")
	cmdRset = []byte("RSET\r\n")
	cmdQuit = []byte("QUIT\r\n")
	cmdDot  = []byte(".\r\n")
)

const (
	defaultSize     = 1024
	minSize         = 200
	maxLineLen      = 76
	maxConnFailures = 10
	// Messages larger than splitWriteOver (before dot-stuffing) are written
	// in two parts so that the latency clock starts right before the last
	// splitTail bytes (and their dot-stuffing and terminator), not before
	// the whole transfer.
	splitWriteOver = 64 << 10
	splitTail      = 8 << 10
	// contentBufSize is the size of each session's write buffer for message
	// content.
	contentBufSize = 32 << 10
)

// RunLoad runs one load test and returns what it measured. The result is
// meaningful even when the error is non-nil: the error reports a context
// cancellation, a run-stopping problem (e.g. PIPELINING requested but not
// offered) or sessions that gave up after maxConnFailures consecutive
// connection failures, and the result covers what was done until then.
// Configuration errors return a zero result.
func RunLoad(ctx context.Context, cfg LoadConfig) (LoadResult, error) {
	cfg, err := cfg.normalized()
	if err != nil {
		return LoadResult{}, err
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	r := &runner{
		cfg:    cfg,
		gen:    newGenerator(&cfg),
		ctx:    rctx,
		cancel: cancel,
		wantID: cfg.CollectIDs || cfg.OnAccepted != nil,
	}
	sessions := make([]*session, cfg.Sessions)
	for i := range sessions {
		sessions[i] = newSession(r)
	}

	var progressDone, progressStopped chan struct{}
	if cfg.Progress != nil {
		progressDone = make(chan struct{})
		progressStopped = make(chan struct{})
		go func() {
			defer close(progressStopped)
			t := time.NewTicker(100 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-t.C:
					cfg.Progress(int(r.done.Load()), int(r.accepted.Load()))
				case <-progressDone:
					cfg.Progress(int(r.done.Load()), int(r.accepted.Load()))
					return
				}
			}
		}()
	}

	start := time.Now()
	var wg sync.WaitGroup
	for _, s := range sessions {
		wg.Go(s.run)
	}
	wg.Wait()
	end := time.Now()
	if progressDone != nil {
		close(progressDone)
		<-progressStopped
	}

	res := LoadResult{Replies: make(map[string]int)}
	var last time.Time
	n := 0
	for _, s := range sessions {
		n += len(s.st.latency)
	}
	res.Latency = make(Durations, 0, n)
	var gaveUp int
	var gaveUpErr error
	for _, s := range sessions {
		st := &s.st
		res.Attempted += st.attempted
		res.Accepted += st.accepted
		res.TempFailed += st.temp
		res.PermFailed += st.perm
		res.Errors += st.errors
		res.RcptRejected += st.rcptRejected
		res.Connections += st.connections
		res.Latency = append(res.Latency, st.latency...)
		for code, c := range st.replies {
			if c > 0 {
				res.Replies[fmt.Sprintf("%03d", code)] += c
			}
		}
		if st.last.After(last) {
			last = st.last
		}
		if s.gaveUp {
			gaveUp++
			gaveUpErr = s.lastErr
		}
	}
	if last.IsZero() {
		last = end
	}
	res.Elapsed = last.Sub(start)
	res.QueueIDs = r.queueIDs

	switch {
	case r.fatal != nil:
		err = r.fatal
	case ctx.Err() != nil:
		err = fmt.Errorf("bench: load run interrupted: %w", ctx.Err())
		if cause := context.Cause(ctx); cause != ctx.Err() {
			err = fmt.Errorf("%w: %w", err, cause)
		}
	case gaveUp > 0:
		err = fmt.Errorf("bench: %d of %d sessions gave up after %d consecutive connection failures, last: %w",
			gaveUp, len(sessions), maxConnFailures, gaveUpErr)
	}
	return res, err
}

// normalized validates cfg and fills in defaults. Slices are copied so that
// the caller may reuse them while the run is going on.
func (cfg LoadConfig) normalized() (LoadConfig, error) {
	if err := checkLoopback(cfg.Addr); err != nil {
		return cfg, err
	}
	bad := func(format string, args ...any) (LoadConfig, error) {
		return cfg, fmt.Errorf("bench: invalid LoadConfig: "+format, args...)
	}
	if cfg.Messages <= 0 {
		return bad("Messages = %d, want > 0", cfg.Messages)
	}
	if cfg.Sessions < 0 {
		return bad("Sessions = %d", cfg.Sessions)
	}
	cfg.Sessions = min(max(cfg.Sessions, 1), cfg.Messages)
	if cfg.MessagesPerSession < 0 {
		return bad("MessagesPerSession = %d", cfg.MessagesPerSession)
	}
	if cfg.RecipientsPerMessage < 0 {
		return bad("RecipientsPerMessage = %d", cfg.RecipientsPerMessage)
	}
	if cfg.RecipientsPerMessage == 0 {
		cfg.RecipientsPerMessage = 1
	}
	if cfg.Timeout < 0 {
		return bad("Timeout = %v", cfg.Timeout)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 30 * time.Second
	}
	if len(cfg.SizeDist) > 0 {
		total := 0
		for _, sw := range cfg.SizeDist {
			if sw.Size < minSize || sw.Weight < 0 {
				return bad("SizeDist entry %+v: want Size >= %d and Weight >= 0", sw, minSize)
			}
			total += sw.Weight
		}
		if total <= 0 {
			return bad("SizeDist has no positive weight")
		}
		cfg.SizeDist = append([]SizeWeight(nil), cfg.SizeDist...)
	} else {
		if cfg.Size == 0 {
			cfg.Size = defaultSize
		}
		if cfg.Size < minSize {
			return bad("Size = %d, want >= %d", cfg.Size, minSize)
		}
	}
	if len(cfg.Domains) == 0 {
		cfg.Domains = []string{"example.com"}
	} else {
		cfg.Domains = append([]string(nil), cfg.Domains...)
	}
	for _, d := range cfg.Domains {
		if !isToken(d) {
			return bad("domain %q", d)
		}
	}
	if cfg.From == "" {
		cfg.From = "loadgen@bench.test"
	}
	if !isToken(cfg.From) {
		return bad("From %q", cfg.From)
	}
	if cfg.EHLO == "" {
		cfg.EHLO = "loadgen.bench.test"
	}
	if !isToken(cfg.EHLO) {
		return bad("EHLO %q", cfg.EHLO)
	}
	return cfg, nil
}

// isToken reports whether s can be put into a command or header verbatim.
func isToken(s string) bool {
	return s != "" && !strings.ContainsAny(s, " \t\r\n<>,")
}

// checkLoopback refuses any address that is not literally loopback.
func checkLoopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%w: %q: %v", ErrNotLoopback, addr, err)
	}
	if strings.EqualFold(strings.TrimSuffix(host, "."), "localhost") {
		return nil
	}
	if ip, err := netip.ParseAddr(host); err == nil && ip.Unmap().IsLoopback() {
		return nil
	}
	return fmt.Errorf("%w: %q (use 127.0.0.1, [::1] or localhost)", ErrNotLoopback, addr)
}

// runner is the state shared by the sessions of one run.
type runner struct {
	cfg    LoadConfig
	gen    *generator
	ctx    context.Context
	cancel context.CancelFunc
	wantID bool // parse queue IDs from end-of-data replies

	next     atomic.Int64 // next message sequence number to hand out
	done     atomic.Int64 // messages finished (for Progress)
	accepted atomic.Int64 // messages accepted (for Progress)

	mu       sync.Mutex // guards queueIDs, fatal and OnAccepted calls
	queueIDs []string
	fatal    error
}

func (r *runner) setFatal(err error) {
	r.mu.Lock()
	if r.fatal == nil {
		r.fatal = err
	}
	r.mu.Unlock()
	r.cancel()
}
