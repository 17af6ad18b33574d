// Command mtabench runs the benchmark scenarios of package bench against
// the mta binary (and, side by side, a private Postfix instance and the
// direct generator-to-sink ceiling), prints a table, and with --json writes
// the result and a chart.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/mtaproject/mta/bench"
)

const usage = `usage: mtabench SCENARIO [flags]

scenarios:
  accept       SMTP acceptance into the spool, fsync on vs. off
  inject       the same recipients by SMTP and by the HTTP injection API (--dkim rsa|ed25519 to sign)
  relay        end to end: inject over SMTP, deliver to a sink; one destination
  relay-1000   the same to 1,000 destinations
  distant      one destination that takes 50 ms per reply
  faults       10 % temporary and 1 % permanent recipient failures at the sink
  backlog      queue a million messages with the receiver down, then time the drain and watch RSS

tools:
  sink         run the receiver alone on loopback and print what arrives (--addr 127.0.0.1:2526)

run "mtabench SCENARIO -h" for its flags.
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "accept":
		err = accept(ctx, os.Args[2:])
	case "inject":
		err = injectScenario(ctx, os.Args[2:])
	case "backlog":
		err = backlog(ctx, os.Args[2:])
	case "sink":
		err = sink(ctx, os.Args[2:])
	case "relay", "relay-1000", "distant", "faults":
		err = relay(ctx, os.Args[1], os.Args[2:])
	default:
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mtabench:", err)
		os.Exit(1)
	}
}

// common holds the flags every scenario has.
type common struct {
	mta, dir, json           string
	sessions, messages, size int
	quiet                    bool
	sizeDist                 string
	shape                    bench.LoadShape
}

func commonFlags(fs *flag.FlagSet, messages int) *common {
	c := &common{}
	fs.StringVar(&c.mta, "mta", "bin/mta", "path of the mta binary")
	fs.StringVar(&c.dir, "dir", filepath.Join(os.TempDir(), "mtabench"), "work directory for data")
	fs.StringVar(&c.json, "json", "", "write the report as JSON to this file")
	fs.IntVar(&c.sessions, "sessions", 50, "concurrent SMTP sessions injecting")
	fs.IntVar(&c.messages, "messages", messages, "messages per run")
	fs.IntVar(&c.size, "size", 1024, "message size in bytes")
	fs.BoolVar(&c.quiet, "quiet", false, "no live progress")
	fs.StringVar(&c.sizeDist, "size-dist", "", "message sizes by weight, e.g. 1024:90,102400:10 (overrides --size)")
	fs.IntVar(&c.shape.Recipients, "rcpts", 1, "recipients per message")
	fs.BoolVar(&c.shape.NoPipelining, "no-pipelining", false, "wait for each reply instead of pipelining")
	fs.IntVar(&c.shape.MessagesPerSession, "per-session", 0, "messages per connection before reconnecting (0: unlimited)")
	return c
}

// load returns the load shape, after parsing --size-dist.
func (c *common) load() bench.LoadShape {
	dist, err := bench.ParseSizeDist(c.sizeDist)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mtabench:", err)
		os.Exit(2)
	}
	s := c.shape
	s.SizeDist = dist
	return s
}

func (c *common) progress() io.Writer {
	if c.quiet {
		return nil
	}
	return os.Stderr
}

// finish prints a report and writes it as JSON if asked.
func (c *common) finish(rep interface{ WriteTable(io.Writer) }) error {
	rep.WriteTable(os.Stdout)
	if c.json == "" {
		return nil
	}
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(c.json, b, 0o644)
}

func injectScenario(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("inject", flag.ExitOnError)
	c := commonFlags(fs, 20000)
	o := bench.InjectOptions{}
	fs.IntVar(&o.Runs, "runs", 3, "runs per mode")
	fs.IntVar(&o.PerRequest, "per-request", 100, "recipients per API request")
	fs.StringVar(&o.DKIM, "dkim", "", "sign with a key of this type (rsa or ed25519) in both modes")
	_ = fs.Parse(args)
	o.MTA, o.WorkDir, o.Sessions, o.Recipients, o.Size, o.Progress = c.mta, c.dir, c.sessions, c.messages, c.size, c.progress()
	rep, err := bench.RunInject(ctx, o)
	if err != nil {
		return err
	}
	return c.finish(rep)
}

func accept(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("accept", flag.ExitOnError)
	c := commonFlags(fs, 100000)
	o := bench.AcceptOptions{}
	fs.IntVar(&o.Runs, "runs", 3, "runs per mode")
	fs.StringVar(&o.ExtraYAML, "mta-config", "", "YAML merged into the mta configuration, section by section (e.g. \"log:\\n  level: warn\\n\")")
	fs.DurationVar(&o.MinSyncInterval, "min-sync-interval", 0, "the mta's spool.min_sync_interval")
	fs.IntVar(&o.Warmup, "warmup", 0, "messages accepted before each measured run (steady state: the WAL in recycled files)")
	fs.StringVar(&o.MemTableSize, "memtable-size", "", "the mta's spool.memtable_size (e.g. 32MiB); default: the mta's default")
	fs.StringVar(&o.Profile, "profile", "", "write a CPU profile of the mta (first run of each mode) to this file, the mode inserted before its extension")
	_ = fs.Parse(args)
	o.MTA, o.WorkDir, o.Sessions, o.Messages, o.Size, o.Progress = c.mta, c.dir, c.sessions, c.messages, c.size, c.progress()
	o.Shape = c.load()
	rep, err := bench.RunAccept(ctx, o)
	if err != nil {
		return err
	}
	return c.finish(rep)
}

func relay(ctx context.Context, scenario string, args []string) error {
	fs := flag.NewFlagSet(scenario, flag.ExitOnError)
	c := commonFlags(fs, 20000)
	o := bench.RelayOptions{DrainLimit: 5 * time.Minute, Domains: 1}
	switch scenario {
	case "relay-1000":
		o.Domains = 1000
	case "distant":
		o.Faults.Latency = 50 * time.Millisecond
	case "faults":
		o.Faults.RcptTempFail, o.Faults.RcptPermFail = 0.10, 0.01
	}
	targets := fs.String("targets", "mta,postfix,direct", "systems to run: mta, postfix, direct (generator to sink)")
	fs.IntVar(&o.Runs, "runs", 3, "runs per target")
	fs.IntVar(&o.Domains, "domains", o.Domains, "recipient domains")
	fs.DurationVar(&o.DrainLimit, "drain-limit", o.DrainLimit, "how long to wait for delivery to finish")
	fs.StringVar(&o.Profile, "profile", "", "write a CPU profile of the mta process (first run) to this file")
	fs.BoolVar(&o.SinkChunking, "sink-chunking", false, "the sink offers CHUNKING (BDAT), as the big providers do")
	fs.StringVar(&o.ReplyStyle, "reply-style", "", "texts of the sink's injected failures: gmail, outlook or yahoo")
	fs.StringVar(&o.MTAConfig, "mta-config", "", "YAML merged into the mta configuration, section by section (e.g. \"log: {accounting: {file: /tmp/a.log}}\")")
	fs.StringVar(&o.Client, "client", "", "load generator: our own (default) or smtp-source (Postfix's, which does not pipeline; one domain)")
	_ = fs.Parse(args)
	o.MTA, o.WorkDir, o.Sessions, o.Messages, o.Size, o.Progress = c.mta, c.dir, c.sessions, c.messages, c.size, c.progress()
	o.Shape = c.load()
	o.Targets = strings.Split(*targets, ",")
	if why := bench.PostfixAvailable(); why != "" && slices.Contains(o.Targets, "postfix") {
		fmt.Fprintf(os.Stderr, "mtabench: skipping postfix: %s\n", why)
		o.Targets = slices.DeleteFunc(o.Targets, func(t string) bool { return t == "postfix" })
	}
	rep, err := bench.RunRelay(ctx, scenario, o)
	if err != nil {
		return err
	}
	if err := c.finish(rep); err != nil {
		return err
	}
	if c.json != "" {
		svg := strings.TrimSuffix(c.json, filepath.Ext(c.json)) + ".svg"
		if err := rep.WriteSVG(svg); err != nil {
			return err
		}
		fmt.Printf("wrote %s and %s\n", c.json, svg)
	}
	return nil
}

func backlog(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("backlog", flag.ExitOnError)
	c := commonFlags(fs, 1_000_000)
	o := bench.BacklogOptions{}
	fs.IntVar(&o.Domains, "domains", 1, "recipient domains")
	fs.StringVar(&o.Profile, "profile", "", "write a heap profile of the mta with the backlog queued to this file")
	fs.StringVar(&o.ExtraYAML, "mta-config", "", "YAML merged into the mta configuration, section by section (e.g. \"spool: {memtable_size: 32MiB}\")")
	_ = fs.Parse(args)
	o.MTA, o.WorkDir, o.Sessions, o.Messages, o.Size, o.Progress = c.mta, c.dir, c.sessions, c.messages, c.size, c.progress()
	o.Shape = c.load()
	rep, err := bench.RunBacklog(ctx, o)
	if err != nil {
		return err
	}
	return c.finish(rep)
}
