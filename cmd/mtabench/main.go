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
	"syscall"

	"github.com/mtaproject/mta/bench"
)

const usage = `usage: mtabench SCENARIO [flags]

scenarios:
  accept   SMTP acceptance into the spool, fsync on vs. off

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
