// Command mtabench runs the benchmark scenarios of package bench against
// the mta binary and prints a table; with --json it also writes the result.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
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
  relay        end to end: inject over SMTP, deliver to a sink; one destination
  relay-1000   the same to 1,000 destinations
  distant      one destination that takes 50 ms per reply
  faults       10 % temporary and 1 % permanent recipient failures at the sink
  backlog      queue a million messages with the receiver down, then time the drain and watch RSS

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
	case "backlog":
		err = backlog(ctx, os.Args[2:])
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

func accept(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("accept", flag.ExitOnError)
	o := bench.AcceptOptions{}
	fs.StringVar(&o.MTA, "mta", "bin/mta", "path of the mta binary")
	fs.StringVar(&o.WorkDir, "dir", filepath.Join(os.TempDir(), "mtabench"), "work directory for data")
	fs.IntVar(&o.Sessions, "sessions", 50, "concurrent SMTP sessions")
	fs.IntVar(&o.Messages, "messages", 100000, "messages per run")
	fs.IntVar(&o.Size, "size", 1024, "message size in bytes")
	fs.BoolVar(&o.Pipelining, "pipelining", true, "pipeline MAIL/RCPT/DATA")
	fs.IntVar(&o.Runs, "runs", 3, "runs per mode")
	fs.StringVar(&o.ExtraYAML, "mta-config", "", "YAML appended to the mta configuration (e.g. \"log:\\n  level: warn\\n\")")
	fs.DurationVar(&o.MinSyncInterval, "min-sync-interval", 0, "the mta's spool.min_sync_interval")
	jsonPath := fs.String("json", "", "write the report as JSON to this file")
	quiet := fs.Bool("quiet", false, "no live progress")
	_ = fs.Parse(args)
	if !*quiet {
		o.Progress = os.Stderr
	}
	rep, err := bench.RunAccept(ctx, o)
	if err != nil {
		return err
	}
	rep.WriteTable(os.Stdout)
	if *jsonPath != "" {
		b, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(*jsonPath, b, 0o644); err != nil {
			return err
		}
	}
	return nil
}

func relay(ctx context.Context, scenario string, args []string) error {
	fs := flag.NewFlagSet(scenario, flag.ExitOnError)
	o := bench.RelayOptions{DrainLimit: 5 * time.Minute}
	fs.StringVar(&o.MTA, "mta", "bin/mta", "path of the mta binary")
	fs.StringVar(&o.WorkDir, "dir", filepath.Join(os.TempDir(), "mtabench"), "work directory for data")
	targets := fs.String("targets", "mta,postfix,direct", "systems to run: mta, postfix, direct (generator to sink)")
	fs.IntVar(&o.Sessions, "sessions", 50, "concurrent SMTP sessions injecting")
	fs.IntVar(&o.Messages, "messages", 20000, "messages per run")
	fs.IntVar(&o.Size, "size", 1024, "message size in bytes")
	fs.IntVar(&o.Runs, "runs", 3, "runs per target")
	fs.DurationVar(&o.DrainLimit, "drain-limit", o.DrainLimit, "how long to wait for delivery to finish")
	fs.StringVar(&o.Profile, "profile", "", "write a CPU profile of the mta process (first run) to this file")
	jsonPath := fs.String("json", "", "write the report as JSON here, and the chart next to it (.svg)")
	quiet := fs.Bool("quiet", false, "no live progress")
	o.Domains = 1
	switch scenario {
	case "relay-1000":
		o.Domains = 1000
	case "distant":
		o.Faults.Latency = 50 * time.Millisecond
	case "faults":
		o.Faults.RcptTempFail, o.Faults.RcptPermFail = 0.10, 0.01
	}
	fs.IntVar(&o.Domains, "domains", o.Domains, "recipient domains")
	_ = fs.Parse(args)
	o.Targets = strings.Split(*targets, ",")
	if why := bench.PostfixAvailable(); why != "" && slices.Contains(o.Targets, "postfix") {
		fmt.Fprintf(os.Stderr, "mtabench: skipping postfix: %s\n", why)
		o.Targets = slices.DeleteFunc(o.Targets, func(t string) bool { return t == "postfix" })
	}
	if !*quiet {
		o.Progress = os.Stderr
	}
	rep, err := bench.RunRelay(ctx, scenario, o)
	if err != nil {
		return err
	}
	rep.WriteTable(os.Stdout)
	if *jsonPath != "" {
		b, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(*jsonPath, b, 0o644); err != nil {
			return err
		}
		svg := strings.TrimSuffix(*jsonPath, filepath.Ext(*jsonPath)) + ".svg"
		if err := rep.WriteSVG(svg); err != nil {
			return err
		}
		fmt.Printf("wrote %s and %s\n", *jsonPath, svg)
	}
	return nil
}

func backlog(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("backlog", flag.ExitOnError)
	o := bench.BacklogOptions{}
	fs.StringVar(&o.MTA, "mta", "bin/mta", "path of the mta binary")
	fs.StringVar(&o.WorkDir, "dir", filepath.Join(os.TempDir(), "mtabench"), "work directory for data")
	fs.IntVar(&o.Sessions, "sessions", 50, "concurrent SMTP sessions injecting")
	fs.IntVar(&o.Messages, "messages", 1_000_000, "messages to queue")
	fs.IntVar(&o.Size, "size", 1024, "message size in bytes")
	fs.IntVar(&o.Domains, "domains", 1, "recipient domains")
	jsonPath := fs.String("json", "", "write the report as JSON to this file")
	quiet := fs.Bool("quiet", false, "no live progress")
	_ = fs.Parse(args)
	if !*quiet {
		o.Progress = os.Stderr
	}
	rep, err := bench.RunBacklog(ctx, o)
	if err != nil {
		return err
	}
	rep.WriteTable(os.Stdout)
	if *jsonPath != "" {
		b, _ := json.MarshalIndent(rep, "", "  ")
		return os.WriteFile(*jsonPath, b, 0o644)
	}
	return nil
}
