// Command mta is the appliance's one binary: the server (`mta serve`) and
// the commands that administer a running server (`mta queue ...`).
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/mta/admin"
	"github.com/mtaproject/mta/mta/auth"
	"github.com/mtaproject/mta/mta/config"
	"github.com/mtaproject/mta/mta/dkim"
	"github.com/mtaproject/mta/mta/server"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

const usage = `usage:
  mta serve [--config FILE]            run the server (embedded defaults without --config)
  mta queue ls [--all] [--json] [FILTERS]
                                       list queued messages; FILTERS: --domain D --sender S
                                       --state queued|deferred|held --older-than 4h --reply 4.7.*
  mta queue shape [--top N] [FILTERS]  queued recipients by destination and age (like qshape)
  mta queue show ID                    show one message and its recipients
  mta queue hold ID | release ID       hold a message back / put it back in the queue
                                       (hold, release, rm and bounce also take FILTERS or --all
                                       instead of an ID, and say how many they acted on)
  mta queue rm ID                      remove a message from the queue (its sender is not told)
  mta queue bounce ID                  fail its remaining recipients now and bounce them to the sender
  mta queue flush [ID | FILTERS]       make every deferred message (or one, or those FILTERS select)
                                       due now, and end the destinations' backoff
  mta dest ls [--json]                 destinations: queued work, connections, window, backoff and last error
  mta dest suspend DOMAIN [--for 2h]   no attempts for DOMAIN's mail, which waits without using up its lifetime
  mta dest resume DOMAIN               end a suspension
  mta reload                           apply the configuration file again, as SIGHUP does: routes,
                                       SMTP and delivery limits, TLS certificate, users, log level
                                       now; the log names what needs a restart (docs/config.md)
  mta config check [--config FILE]     validate a configuration file
  mta suppress ls [--tenant T] [--json] the suppression list (hard bounces, API and operator entries)
  mta suppress add|rm ADDRESS [--tenant T] [--reason R]
                                       add an address to a tenant's list (default: SMTP mail's) / remove it
  mta dkim keygen DOMAIN SELECTOR [--type rsa|ed25519] [--out FILE]
                                       make a signing key and print its DNS TXT record
  mta user hash                        read a password on stdin, print a users-file hash
  mta user add NAME [--address LIST] [--sender LIST]
                                       add a user (password on stdin) to the users file
  mta user passwd NAME                 change a user's password (on stdin)
  mta user rm NAME | mta user ls       remove a user / list the users
                                       (user commands edit --file FILE or the auth.users_file of --config FILE)
  mta version                          print the version

queue commands find the server through --config FILE (its listen.http) or
--admin URL (default http://127.0.0.1:9725, or $MTA_ADMIN).
`

func main() {
	if err := run(os.Args[1:], os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "mta:", err)
		os.Exit(1)
	}
}

func run(args []string, stdin io.Reader, stdout io.Writer) error {
	err := dispatch(args, stdin, stdout)
	if errors.Is(err, flag.ErrHelp) {
		return nil // --help on a subcommand: its flags were printed
	}
	return err
}

// isHelp reports whether arg asks for help.
func isHelp(arg string) bool {
	return arg == "--help" || arg == "-help" || arg == "-h" || arg == "help"
}

// commandUsage prints the usage lines of one command ("queue", "user").
func commandUsage(out io.Writer, command string) {
	fmt.Fprintln(out, "usage:")
	keep := false
	for _, line := range strings.Split(usage, "\n") {
		switch {
		case strings.HasPrefix(line, "  mta "):
			keep = strings.HasPrefix(line, "  mta "+command+" ")
		case !strings.HasPrefix(line, "   "):
			keep = false
		}
		if keep {
			fmt.Fprintln(out, line)
		}
	}
	if command == "queue" {
		fmt.Fprintln(out, "\nqueue commands find the server through --config FILE (its listen.http) or\n--admin URL (default http://127.0.0.1:9725, or $MTA_ADMIN).")
	}
}

func dispatch(args []string, stdin io.Reader, stdout io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return errors.New("no command given")
	}
	if len(args) >= 2 && isHelp(args[1]) && (args[0] == "queue" || args[0] == "user" || args[0] == "config" || args[0] == "dest") {
		commandUsage(stdout, args[0])
		return nil
	}
	switch args[0] {
	case "serve":
		return serve(args[1:])
	case "queue":
		return queue(args[1:], stdout)
	case "config":
		return configCmd(args[1:], stdout)
	case "user":
		return user(args[1:], stdin, stdout)
	case "dkim":
		return dkimCmd(args[1:], stdout)
	case "suppress":
		return suppress(args[1:], stdout)
	case "dest":
		return dest(args[1:], stdout)
	case "reload":
		fs := flag.NewFlagSet("reload", flag.ContinueOnError)
		c, rest, err := adminClient(fs, args[1:])
		if err != nil {
			return err
		}
		if len(rest) > 0 {
			return fmt.Errorf("reload: unexpected %q", rest[0])
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := c.Reload(ctx); err != nil {
			var ae *admin.APIError
			if errors.As(err, &ae) && ae.Code != http.StatusUnauthorized && ae.Code != http.StatusForbidden && ae.Code != http.StatusMisdirectedRequest {
				return fmt.Errorf("reload refused, the running configuration stays: %w", err)
			}
			return fmt.Errorf("reload not done: %w", err) // not reached, or not let in: nothing was tried
		}
		fmt.Fprintln(stdout, "configuration reloaded (the server log names what needs a restart)")
		return nil
	case "version", "--version", "-v":
		fmt.Fprintln(stdout, "mta", versionString())
		return nil
	case "help", "--help", "-h":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(os.Stderr, usage)
	return fmt.Errorf("unknown command %q", args[0])
}

func versionString() string {
	v := version
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				v += " (" + s.Value[:12] + ")"
			}
		}
	}
	return v
}

func serve(args []string) error {
	// SIGHUP means reload; caught from the start, so that one during the
	// start-up (a certificate renewal's reload) does not kill the process.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	cfgPath := fs.String("config", "", "configuration file (YAML); embedded defaults when empty")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("serve: unexpected %q (the configuration file goes with --config)", fs.Arg(0))
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return err
	}
	log, level, err := server.NewLoggerLevel(cfg.Log)
	if err != nil {
		return err
	}
	defer log.Sync()
	for _, w := range cfg.Warnings() {
		log.Warn(w)
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		// Message bodies are bounded by memory_budget; the rest of the Go
		// heap (sessions, buffers) is small. A soft limit of the budget
		// plus half a gigabyte makes the garbage collector return freed
		// bodies before the heap grows past it (with twice the budget, a
		// 1 GiB budget peaked at 2.6 GiB RSS instead of 1.7; BENCHMARKS.md).
		debug.SetMemoryLimit(int64(cfg.MemoryBudget) + 512<<20)
	}
	server.Version = version
	srv, err := server.New(cfg, log)
	if err != nil {
		return err
	}
	srv.SetLogLevel(level)
	go func() {
		for range hup {
			_ = srv.Reload() // the outcome is logged and counted
		}
	}()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-ctx.Done()
		stop() // a second signal now kills the process at once
	}()
	return srv.Run(ctx)
}

// adminClient finds the running server: --admin, $MTA_ADMIN, the
// configuration's listen.http, or the default.
func adminClient(fs *flag.FlagSet, args []string) (*admin.Client, []string, error) {
	url := fs.String("admin", os.Getenv("MTA_ADMIN"), "admin API base URL")
	token := fs.String("admin-token", os.Getenv("MTA_ADMIN_TOKEN"), "admin API bearer token (admin.token_file on the server)")
	cfgPath := fs.String("config", "", "configuration file, to find listen.http and admin.token_file")
	rest, err := parseInterspersed(fs, args)
	if err != nil {
		return nil, nil, err
	}
	base, tok := *url, *token
	if base == "" || tok == "" && *cfgPath != "" {
		cfg, err := config.Load(*cfgPath)
		if err != nil {
			return nil, nil, err
		}
		if base == "" {
			if cfg.Listen.HTTP == "" {
				return nil, nil, errors.New("listen.http is disabled in the configuration: the queue commands need it")
			}
			base = "http://" + dialable(cfg.Listen.HTTP)
		}
		if tok == "" && cfg.Admin.TokenFile != "" {
			// The token the configuration names, when this user may read it.
			if tok, err = server.ReadAdminToken(cfg.Admin.TokenFile); err != nil {
				return nil, nil, fmt.Errorf("admin.token_file: %w (or give --admin-token, $MTA_ADMIN_TOKEN)", err)
			}
		}
	}
	return &admin.Client{Base: base, Token: tok}, rest, nil
}

// dialable is a listen address as a client on this host reaches it: a
// wildcard (":9725", "0.0.0.0:9725", "[::]:9725") is reached on loopback.
func dialable(listen string) string {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return listen
	}
	switch host {
	case "", "0.0.0.0":
		return net.JoinHostPort("127.0.0.1", port)
	case "::":
		return net.JoinHostPort("::1", port)
	}
	return listen
}

// parseInterspersed parses flags that may come before or after the
// positional arguments ("queue show ID --admin URL"), which package flag
// alone does not allow, and returns the positional arguments.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return positional, nil
		}
		positional = append(positional, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

func queue(args []string, out io.Writer) error {
	if len(args) == 0 {
		return errors.New("queue: want ls, shape, show, hold, release, rm, bounce or flush")
	}
	fs := flag.NewFlagSet("queue "+args[0], flag.ContinueOnError)
	all := fs.Bool("all", false, "ls: list every message, not just the first 1000 (--json always does); hold/release/rm/bounce/flush: act on every message")
	asJSON := fs.Bool("json", false, "ls: one JSON object per message; shape: the table as JSON")
	top := fs.Int("top", 20, "shape: destinations shown (the rest are summed)")
	var f admin.Filter
	fs.StringVar(&f.Domain, "domain", "", "only messages with a queued recipient in this domain")
	fs.StringVar(&f.Sender, "sender", "", "only messages from this sender (address, @domain, or <> for the null sender)")
	fs.StringVar(&f.State, "state", "", "only messages in this state: queued, deferred or held")
	fs.DurationVar(&f.OlderThan, "older-than", 0, "only messages received longer ago than this (e.g. 4h)")
	fs.StringVar(&f.Reply, "reply", "", "only messages with a queued recipient whose last reply matches (enhanced code pattern such as 4.7.*, or text)")
	c, rest, err := adminClient(fs, args[1:])
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	needID := func() (string, error) {
		if len(rest) != 1 || strings.TrimSpace(rest[0]) == "" {
			return "", fmt.Errorf("queue %s: want one queue ID", args[0])
		}
		return rest[0], nil
	}
	if f.OlderThan < 0 {
		return fmt.Errorf("queue %s: --older-than %s: want a duration of zero or more", args[0], f.OlderThan)
	}
	switch args[0] {
	case "ls", "shape":
		if len(rest) > 0 {
			return fmt.Errorf("queue %s: unexpected %q (show ID for one message; filters are flags, such as --domain)", args[0], rest[0])
		}
	}
	switch args[0] {
	case "ls":
		return queueList(ctx, c, f, *all, *asJSON, out)
	case "shape":
		sh, err := c.Shape(ctx, f, *top)
		if err != nil {
			return err
		}
		if *asJSON {
			return json.NewEncoder(out).Encode(sh)
		}
		printShape(out, sh)
		return nil
	case "show":
		id, err := needID()
		if err != nil {
			return err
		}
		m, err := c.Show(ctx, id)
		if err != nil {
			return err
		}
		printMessage(out, m)
		return nil
	case "flush":
		if len(rest) == 0 && f.Empty() {
			n, err := c.Flush(ctx)
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "%s due now\n", messages(n))
			return nil
		}
		fallthrough
	case "hold", "release", "rm", "bounce":
		done := map[string]string{"hold": "held", "release": "released", "rm": "removed", "bounce": "bounced", "flush": "due now"}[args[0]]
		if len(rest) == 0 && (!f.Empty() || *all) {
			action := map[string]string{"rm": "remove"}[args[0]]
			if action == "" {
				action = args[0]
			}
			res, err := c.Bulk(ctx, action, f, *all)
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "%s %s\n", messages(res.Matched), done)
			if res.Failed > 0 {
				return fmt.Errorf("queue %s: failed on %d messages (see the server log)", args[0], res.Failed)
			}
			return nil
		}
		if len(rest) == 1 && (!f.Empty() || *all) {
			return fmt.Errorf("queue %s: give a queue ID or filters, not both", args[0])
		}
		id, err := needID()
		if err != nil {
			return fmt.Errorf("%w, or filters (--domain, --sender, --state, --older-than, --reply) or --all", err)
		}
		action := map[string]func(context.Context, string) error{"hold": c.Hold, "release": c.Release, "rm": c.Remove, "bounce": c.Bounce, "flush": c.FlushMessage}[args[0]]
		if err := action(ctx, id); err != nil {
			return err
		}
		fmt.Fprintf(out, "%s: %s\n", id, done)
		return nil
	}
	return fmt.Errorf("queue: unknown command %q", args[0])
}

func queueList(ctx context.Context, c *admin.Client, f admin.Filter, all, asJSON bool, out io.Writer) error {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	enc := json.NewEncoder(out)
	if !asJSON {
		fmt.Fprintln(tw, "ID\tSIZE\tAGE\tSTATE\tFROM\tRCPTS\tQUEUED")
	}
	after, total := "", 0
	for {
		page, err := c.ListFiltered(ctx, f, after, 1000)
		if err != nil {
			return err
		}
		for _, m := range page.Messages {
			total++
			if asJSON {
				if err := enc.Encode(m); err != nil {
					return err
				}
				continue
			}
			queued := 0
			for _, r := range m.Recipients {
				if r.Status == "queued" {
					queued++
				}
			}
			from := printable(m.From)
			if from == "" {
				from = "<>"
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%d\t%d\n", printable(m.ID), m.Size, time.Since(m.Received).Round(time.Second), printable(m.State), from, len(m.Recipients), queued)
		}
		// JSON is for scripts: it lists the whole queue, as postqueue -j
		// does, rather than stopping silently at a page.
		if page.Next == "" || !all && !asJSON && total >= 1000 {
			if page.Next != "" {
				fmt.Fprintln(tw, "... more: use --all")
			}
			break
		}
		after = page.Next
	}
	if asJSON {
		return nil
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(out, "%s\n", messages(total))
	return nil
}

// printMessage shows one message. Every field that came from the network
// (addresses, HELO name, remote replies) goes through printable, so that
// nobody can send escape sequences to an operator's terminal.
func printMessage(out io.Writer, m admin.Message) {
	from := printable(m.From)
	if from == "" {
		from = "<>"
	}
	fmt.Fprintf(out, "id:        %s\nfrom:      %s\nreceived:  %s from %s (%s)\nsize:      %d\nheld:      %v\n",
		printable(m.ID), from, m.Received.Format(time.RFC3339), printable(m.ClientIP), printable(m.HELO), m.Size, m.Held)
	if m.AuthUser != "" {
		fmt.Fprintf(out, "auth user: %s\n", printable(m.AuthUser))
	}
	if m.EnvID != "" || m.Ret != "" {
		fmt.Fprintf(out, "dsn:       envid=%s ret=%s\n", printable(m.EnvID), printable(string(m.Ret)))
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "RECIPIENT\tSTATUS\tATTEMPTS\tNEXT\tLAST REPLY")
	for _, r := range m.Recipients {
		next := "-"
		if r.NextAttempt != nil {
			next = r.NextAttempt.Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", printable(r.Address), printable(r.Status), r.Attempts, next, printable(r.LastReply))
	}
	tw.Flush()
}

// printable escapes what a terminal could act on: C0 and C1 control
// characters, DEL, format characters such as bidirectional overrides, and
// invalid UTF-8, as \xHH or \uHHHH. Printable text, UTF-8 letters included,
// is kept as it is.
func printable(s string) string {
	clean := true
	for _, r := range s {
		if r == utf8.RuneError || !unicode.IsPrint(r) {
			clean = false
			break
		}
	}
	if clean {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && n <= 1:
			fmt.Fprintf(&b, "\\x%02x", s[i])
		case !unicode.IsPrint(r) && r < 0x100:
			fmt.Fprintf(&b, "\\x%02x", r)
		case !unicode.IsPrint(r):
			fmt.Fprintf(&b, "\\u%04x", r)
		default:
			b.WriteString(s[i : i+n])
		}
		i += n
	}
	return b.String()
}

func configCmd(args []string, out io.Writer) error {
	if len(args) == 0 || args[0] != "check" {
		return errors.New("config: want check")
	}
	fs := flag.NewFlagSet("config check", flag.ContinueOnError)
	cfgPath := fs.String("config", "", "configuration file")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if *cfgPath == "" && fs.NArg() == 1 {
		*cfgPath = fs.Arg(0)
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return err
	}
	if err := server.Check(cfg); err != nil {
		return err
	}
	for _, w := range cfg.Warnings() {
		fmt.Fprintln(out, "warning:", w)
	}
	fmt.Fprintln(out, "configuration ok")
	return nil
}

// suppress is `mta suppress ls|add|rm`.
func suppress(args []string, out io.Writer) error {
	if len(args) == 0 {
		return errors.New("suppress: want ls, add or rm")
	}
	fs := flag.NewFlagSet("suppress "+args[0], flag.ContinueOnError)
	tenant := fs.String("tenant", "", "the tenant's list (an api.tenants name, or default for SMTP mail); ls without it: every tenant's")
	reason := fs.String("reason", "", "add: why, kept with the entry")
	asJSON := fs.Bool("json", false, "ls: one JSON object per entry")
	c, rest, err := adminClient(fs, args[1:])
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	one := func() (string, error) {
		if len(rest) != 1 {
			return "", fmt.Errorf("suppress %s: want one address", args[0])
		}
		return rest[0], nil
	}
	list := *tenant
	if list == "" && args[0] != "ls" {
		list = "default"
	}
	switch args[0] {
	case "ls":
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		enc := json.NewEncoder(out)
		if !*asJSON {
			fmt.Fprintln(tw, "TENANT\tADDRESS\tSOURCE\tADDED\tREASON")
		}
		n := 0
		for after := ""; ; {
			page, err := c.Suppressions(ctx, list, after, 1000)
			if err != nil {
				return err
			}
			for _, e := range page.Suppressions {
				n++
				if *asJSON {
					if err := enc.Encode(e); err != nil {
						return err
					}
					continue
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", printable(e.Tenant), printable(e.Address), printable(e.Source), e.Added.UTC().Format(time.RFC3339), printable(e.Reason))
			}
			if page.Next == "" {
				break
			}
			after = page.Next
		}
		if *asJSON {
			return nil
		}
		tw.Flush()
		fmt.Fprintf(out, "%d suppressed addresses\n", n)
		return nil
	case "add":
		a, err := one()
		if err != nil {
			return err
		}
		if err := c.Suppress(ctx, list, a, *reason); err != nil {
			return err
		}
		fmt.Fprintf(out, "%s: suppressed for %s\n", a, list)
		return nil
	case "rm":
		a, err := one()
		if err != nil {
			return err
		}
		if err := c.Unsuppress(ctx, list, a); err != nil {
			return err
		}
		fmt.Fprintf(out, "%s: no longer suppressed for %s\n", a, list)
		return nil
	}
	return fmt.Errorf("suppress: unknown command %q", args[0])
}

// dkimCmd is `mta dkim keygen`.
func dkimCmd(args []string, out io.Writer) error {
	if len(args) == 0 || args[0] != "keygen" {
		return errors.New("dkim: want keygen DOMAIN SELECTOR [--type rsa|ed25519] [--out FILE]")
	}
	fs := flag.NewFlagSet("dkim keygen", flag.ContinueOnError)
	keyType := fs.String("type", "rsa", "key type: rsa (2048 bits, verified everywhere) or ed25519 (RFC 8463, small and fast)")
	file := fs.String("out", "", "write the private key to this file (mode 0600; it must not exist); default: DOMAIN.SELECTOR.pem")
	rest, err := parseInterspersed(fs, args[1:])
	if err != nil {
		return err
	}
	if len(rest) != 2 {
		return errors.New("dkim keygen: want DOMAIN SELECTOR")
	}
	domain, ok := mta.NormalizeDomain(rest[0])
	if !ok {
		return fmt.Errorf("dkim keygen: %q is not a domain", rest[0])
	}
	selector := rest[1]
	if _, ok := mta.NormalizeDomain(selector); !ok || strings.ContainsAny(selector, "_") {
		return fmt.Errorf("dkim keygen: %q is not a selector (a DNS label such as s2026)", selector)
	}
	key, record, err := dkim.Generate(dkim.KeyType(*keyType), domain, selector)
	if err != nil {
		return fmt.Errorf("dkim keygen: %w", err)
	}
	path := *file
	if path == "" {
		path = domain + "." + selector + ".pem"
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("dkim keygen: %w (an existing key is never overwritten)", err)
	}
	if _, err := f.Write(key); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	fmt.Fprintf(out, "; private key written to %s; add to the configuration:\n", path)
	fmt.Fprintf(out, ";   dkim: {keys: [{domain: %s, selector: %s, key_file: %s}]}\n", domain, selector, path)
	fmt.Fprintf(out, "; and publish this record in DNS:\n%s\n", record)
	return nil
}

func user(args []string, stdin io.Reader, out io.Writer) error {
	if len(args) == 0 {
		return errors.New("user: want hash, add, passwd, rm or ls")
	}
	if args[0] == "hash" {
		if len(args) != 1 {
			return errors.New("user hash: takes no arguments; the password comes on stdin")
		}
		pw, err := readPassword(stdin, "user hash")
		if err != nil {
			return err
		}
		h, err := auth.Hash(pw)
		if err != nil {
			return err
		}
		fmt.Fprintln(out, h)
		return nil
	}
	fs := flag.NewFlagSet("user "+args[0], flag.ContinueOnError)
	cfgPath := fs.String("config", "", "configuration file whose auth.users_file to edit")
	file := fs.String("file", "", "users file to edit (instead of --config)")
	addresses := fs.String("address", "", "add, passwd: comma-separated addresses (and @domain catch-alls) whose mail lands in the user's mailbox")
	senders := fs.String("sender", "", "add, passwd: comma-separated MAIL FROM addresses and @domains the user may use (empty: any)")
	rest, err := parseInterspersed(fs, args[1:])
	if err != nil {
		return err
	}
	path := *file
	if path == "" {
		cfg, err := config.Load(*cfgPath)
		if err != nil {
			return err
		}
		if path = cfg.Auth.UsersFile; path == "" {
			return errors.New("user " + args[0] + ": no users file: give --file FILE, or --config FILE with auth.users_file set")
		}
	}
	if args[0] == "ls" {
		entries, err := auth.Entries(path)
		if err != nil {
			return err
		}
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "USER\tADDRESSES\tSENDERS")
		for _, e := range entries {
			senders := strings.Join(e.Senders, ",")
			if senders == "" {
				senders = "(any)"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\n", e.Name, strings.Join(e.Addresses, ","), senders)
		}
		return tw.Flush()
	}
	if len(rest) != 1 {
		return fmt.Errorf("user %s: want one user name", args[0])
	}
	name := rest[0]
	if !auth.ValidName(name) {
		return fmt.Errorf("user %s: %q: a user name is 1 to 64 letters, digits and . _ - @ +", args[0], name)
	}
	switch args[0] {
	case "add", "passwd":
		pw, err := readPassword(stdin, "user "+args[0])
		if err != nil {
			return err
		}
		hash, err := auth.Hash(pw)
		if err != nil {
			return err
		}
		err = auth.Update(path, name, func(old *auth.Entry) (*auth.Entry, error) {
			if args[0] == "add" && old != nil {
				return nil, fmt.Errorf("user add: %s already exists (mta user passwd changes its password)", name)
			}
			if args[0] == "passwd" && old == nil {
				return nil, fmt.Errorf("user passwd: no user %s (mta user add creates one)", name)
			}
			e := &auth.Entry{Name: name, Hash: hash}
			if old != nil {
				e.Senders, e.Addresses = old.Senders, old.Addresses
			}
			if *addresses != "" {
				e.Addresses = auth.SplitList(*addresses)
			}
			if *senders != "" {
				e.Senders = auth.SplitList(*senders)
			}
			return e, nil
		})
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "%s: %s in %s (a running server reads it within seconds)\n", name, map[string]string{"add": "added", "passwd": "password changed"}[args[0]], path)
		return nil
	case "rm":
		if err := auth.Update(path, name, func(*auth.Entry) (*auth.Entry, error) { return nil, nil }); err != nil {
			if errors.Is(err, auth.ErrNoUser) {
				return fmt.Errorf("user rm: no user %s in %s", name, path)
			}
			return err
		}
		fmt.Fprintf(out, "%s: removed from %s (its mailbox stays in the spool)\n", name, path)
		return nil
	}
	return fmt.Errorf("user: unknown subcommand %q: want hash, add, passwd, rm or ls", args[0])
}

// readPassword reads one line from stdin as a password.
func readPassword(stdin io.Reader, what string) (string, error) {
	line, err := bufio.NewReader(stdin).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return "", err
	}
	pw := strings.TrimRight(line, "\r\n")
	if pw == "" {
		return "", errors.New(what + ": empty password on stdin")
	}
	return pw, nil
}

// printShape prints a queue shape as qshape does: a row per destination,
// a column per age bucket.
func printShape(out io.Writer, sh admin.Shape) {
	tw := tabwriter.NewWriter(out, 0, 4, 1, ' ', tabwriter.AlignRight)
	fmt.Fprint(tw, "DESTINATION\tT\t")
	for _, b := range sh.Buckets {
		fmt.Fprint(tw, b+"\t")
	}
	fmt.Fprintln(tw)
	row := func(r admin.ShapeRow) {
		fmt.Fprintf(tw, "%s\t%d\t", printable(r.Domain), r.Total)
		for _, c := range r.Counts {
			fmt.Fprintf(tw, "%d\t", c)
		}
		fmt.Fprintln(tw)
	}
	row(sh.Total)
	for _, r := range sh.Domains {
		row(r)
	}
	if sh.Others != nil {
		row(*sh.Others)
	}
	tw.Flush()
}

func dest(args []string, out io.Writer) error {
	if len(args) == 0 || args[0] != "ls" && args[0] != "suspend" && args[0] != "resume" {
		return errors.New("dest: want ls, suspend or resume")
	}
	fs := flag.NewFlagSet("dest "+args[0], flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "ls: the list as JSON")
	forD := fs.Duration("for", 0, "suspend: how long (e.g. 2h); 0: until resumed")
	c, rest, err := adminClient(fs, args[1:])
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if args[0] != "ls" {
		if len(rest) != 1 || strings.TrimSpace(rest[0]) == "" {
			return fmt.Errorf("dest %s: want one domain", args[0])
		}
		if *forD < 0 {
			return fmt.Errorf("dest suspend: --for must be positive (leave it out to suspend until resumed)")
		}
		if args[0] == "suspend" {
			if err := c.Suspend(ctx, rest[0], *forD); err != nil {
				return err
			}
			until := "until resumed"
			if *forD > 0 {
				until = "for " + forD.String()
			}
			fmt.Fprintf(out, "%s: suspended %s (its mail waits, without attempts and without using up its lifetime)\n", rest[0], until)
			return nil
		}
		if err := c.Resume(ctx, rest[0]); err != nil {
			return fmt.Errorf("dest resume %s: %w", rest[0], err)
		}
		fmt.Fprintf(out, "%s: resumed (its waiting mail is tried at once)\n", rest[0])
		return nil
	}
	if len(rest) > 0 {
		return fmt.Errorf("dest ls: unexpected %q", rest[0])
	}
	suspended, err := c.Suspensions(ctx)
	if err != nil {
		return err
	}
	list, err := c.Destinations(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		return json.NewEncoder(out).Encode(map[string]any{"destinations": list, "suspended": suspended})
	}
	var names []string
	for d := range suspended {
		names = append(names, d)
	}
	sort.Strings(names)
	for _, d := range names {
		until := "until resumed"
		if t := suspended[d]; !t.IsZero() {
			until = "until " + t.Local().Format(time.DateTime)
		}
		fmt.Fprintf(out, "suspended: %s %s\n", printable(d), until)
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DESTINATION\tCLASS\tQUEUED\tCONNS\tWINDOW\tSTATE\tLAST ERROR")
	for _, d := range list {
		state := "ok"
		if d.BackedOff {
			state = "backed off until " + d.BackoffEnds.Local().Format(time.TimeOnly)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%s\t%s\n", printable(d.Key), d.Class, d.Queued, d.Connections, d.Window, state, printable(d.LastError))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(out, "%d destinations\n", len(list))
	return nil
}

// messages is "1 message", "0 messages", "2 messages".
func messages(n int) string {
	if n == 1 {
		return "1 message"
	}
	return fmt.Sprintf("%d messages", n)
}
