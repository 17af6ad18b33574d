// Package config owns the appliance's configuration: the YAML file format,
// the embedded defaults, and validation whose error messages name the field
// at fault. The file is decoded strictly: an unknown key is an error, never
// silently ignored.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/mtaproject/mta/mta"
)

// Config is the whole configuration. Every field is documented, with its
// default, in docs/config.md.
type Config struct {
	Hostname        string           `yaml:"hostname"`         // name in the banner, EHLO and Received:; default: the OS host name
	DataDir         string           `yaml:"data_dir"`         // spool and generated files; default ./data
	LocalDomains    []string         `yaml:"local_domains"`    // domains this appliance receives mail for
	TrustedNetworks []string         `yaml:"trusted_networks"` // CIDRs allowed to relay without AUTH
	Listen          Listen           `yaml:"listen"`
	SMTP            SMTP             `yaml:"smtp"`
	TLS             TLS              `yaml:"tls"`
	Auth            Auth             `yaml:"auth"`
	Spool           Spool            `yaml:"spool"`
	Delivery        Delivery         `yaml:"delivery"`
	DSN             DSN              `yaml:"dsn"`
	Mailboxes       Mailboxes        `yaml:"mailboxes"`
	DNS             DNS              `yaml:"dns"`
	Routes          map[string]Route `yaml:"routes"`
	Log             Log              `yaml:"log"`
	Admin           Admin            `yaml:"admin"`
	API             API              `yaml:"api"`
	DKIM            DKIM             `yaml:"dkim"`
	Suppression     Suppression      `yaml:"suppression"`
	Webhooks        []Webhook        `yaml:"webhooks"`
	Bounces         Bounces          `yaml:"bounces"`
	Debug           Debug            `yaml:"debug"`
	MemoryBudget    ByteSize         `yaml:"memory_budget"` // message bodies held in memory at once, received and being delivered

	trusted  []netip.Prefix
	path     string         // the file loaded; "" for the embedded defaults
	lines    map[string]int // line in the file of each field set there, by dotted path
	warnings []string
}

// Mailboxes holds the settings of local mailboxes (mail for local_domains,
// read over POP3).
type Mailboxes struct {
	Quota ByteSize `yaml:"quota"` // octets a mailbox may hold; 0: no limit
}

// DSN holds the delivery status notification (bounce) settings.
type DSN struct {
	// MaxReturnedSize is the largest original a failure notice returns
	// whole; a larger one is returned as its header only.
	MaxReturnedSize ByteSize `yaml:"max_returned_size"`
	// DelayWarning is how long a recipient that asked for NOTIFY=DELAY
	// may wait before it is warned once; 0 disables delay notices.
	DelayWarning Duration `yaml:"delay_warning"`
	// Postmaster receives the notices that could not be delivered to the
	// sender (double bounces); "" drops them, logged.
	Postmaster string `yaml:"postmaster"`
}

// Listen holds the listener addresses; an empty address disables a listener.
type Listen struct {
	SMTP       string `yaml:"smtp"`       // relay/MX SMTP
	Submission string `yaml:"submission"` // message submission (RFC 6409): AUTH required
	POP3       string `yaml:"pop3"`       // POP3 mailbox access (STLS when TLS is configured)
	POP3S      string `yaml:"pop3s"`      // POP3 over implicit TLS (port 995)
	HTTP       string `yaml:"http"`       // /metrics, /healthz, /readyz and the admin API
	API        string `yaml:"api"`        // the HTTP injection API (api.tenants)
}

// SMTP holds the inbound SMTP limits and policies.
type SMTP struct {
	MaxMessageSize         ByteSize `yaml:"max_message_size"`
	MaxRecipients          int      `yaml:"max_recipients"`
	MaxLineLength          int      `yaml:"max_line_length"`
	MaxHops                int      `yaml:"max_hops"` // Received: fields a message may already have (mail loops)
	MaxConnections         int      `yaml:"max_connections"`
	MaxConnectionsPerIP    int      `yaml:"max_connections_per_ip"`
	CommandTimeout         Duration `yaml:"command_timeout"`
	DataTimeout            Duration `yaml:"data_timeout"`
	ShutdownTimeout        Duration `yaml:"shutdown_timeout"`
	BareLineEndings        string   `yaml:"bare_line_endings"`         // reject | normalize, for untrusted clients
	BareLineEndingsTrusted string   `yaml:"bare_line_endings_trusted"` // reject | normalize, for trusted or authenticated clients
	RejectEarlyData        bool     `yaml:"reject_early_data"`
	AddMissingHeaders      bool     `yaml:"add_missing_headers"` // Date: and Message-ID: for trusted and authenticated clients
}

// TLS holds the certificate used for STARTTLS.
type TLS struct {
	CertFile   string `yaml:"cert_file"`
	KeyFile    string `yaml:"key_file"`
	SelfSigned bool   `yaml:"self_signed"` // generate one in data_dir/tls when no cert_file is set
}

// Auth holds SMTP AUTH settings.
type Auth struct {
	UsersFile             string   `yaml:"users_file"`              // lines "name:bcrypt-hash"; empty: no AUTH
	CleartextFromLoopback bool     `yaml:"cleartext_from_loopback"` // allow AUTH without TLS from loopback clients
	MaxFailures           int      `yaml:"max_failures"`            // failed AUTH per connection before it is closed
	ClientFailureLimit    int      `yaml:"client_failure_limit"`    // failed AUTH per client address within the window before it is blocked; 0: no limit
	ClientFailureWindow   Duration `yaml:"client_failure_window"`   // the window, and how long a blocked address stays blocked
}

// Spool holds the message store settings.
type Spool struct {
	Sync            bool     `yaml:"sync"`              // fsync before 250; off only for benchmarks
	MinFreeSpace    ByteSize `yaml:"min_free_space"`    // below this free space on data_dir, new mail gets 452 4.3.1
	MinSyncInterval Duration `yaml:"min_sync_interval"` // group commit: delay a WAL sync so that more messages share it
	MemTableSize    ByteSize `yaml:"memtable_size"`     // Pebble memtable: mail delivered before it fills never reaches a table file
	// BodyFileThreshold is the message size from which the bytes are kept
	// in body files beside Pebble, written once and removed whole, instead
	// of being carried through Pebble's flushes and compactions; 0: never.
	BodyFileThreshold ByteSize `yaml:"body_file_threshold"`
}

// Delivery holds the outbound side: scheduler and SMTP client.
type Delivery struct {
	Enabled                          bool     `yaml:"enabled"`                             // false: accept and queue, deliver nothing
	HeloName                         string   `yaml:"helo_name"`                           // EHLO name; default: hostname
	Port                             int      `yaml:"port"`                                // SMTP port of MX hosts
	TLS                              string   `yaml:"tls"`                                 // none | opportunistic | required
	Chunking                         bool     `yaml:"chunking"`                            // use BDAT when offered
	MaxConnections                   int      `yaml:"max_connections"`                     // outbound connections in total
	MaxConnectionsPerDestination     int      `yaml:"max_connections_per_destination"`     // per next-hop set
	InitialConnectionsPerDestination int      `yaml:"initial_connections_per_destination"` // start, +1 per good new connection
	MaxMessagesPerConnection         int      `yaml:"max_messages_per_connection"`
	MaxRecipientsPerTransaction      int      `yaml:"max_recipients_per_transaction"` // RCPTs in one transaction; more go in the next
	MaxMXAddresses                   int      `yaml:"max_mx_addresses"`               // addresses tried per connection attempt
	IdleTimeout                      Duration `yaml:"idle_timeout"`                   // idle connection kept for reuse
	MinBackoff                       Duration `yaml:"min_backoff"`
	MaxBackoff                       Duration `yaml:"max_backoff"`
	MaxLifetime                      Duration `yaml:"max_lifetime"`  // then a deferred recipient fails (bounce)
	ActiveWindow                     int      `yaml:"active_window"` // messages×domains held in memory
	Lease                            Duration `yaml:"lease"`         // next attempt written before an attempt: the retry delay after a crash
	Timeouts                         Timeouts `yaml:"timeouts"`
	// Domains are limits of the operator's for the mail of one recipient
	// domain each (docs/delivery.md, "Limits for one domain").
	Domains map[string]DomainLimits `yaml:"domains"`
}

// DomainLimits replace the delivery limits of the same names for the mail
// of one recipient domain; 0 keeps delivery's value.
type DomainLimits struct {
	MaxConnections              int `yaml:"max_connections"`                // at once, instead of max_connections_per_destination
	MaxMessagesPerConnection    int `yaml:"max_messages_per_connection"`    // instead of delivery.max_messages_per_connection
	MaxRecipientsPerTransaction int `yaml:"max_recipients_per_transaction"` // instead of delivery.max_recipients_per_transaction
}

// Timeouts are the SMTP client timeouts (RFC 5321 §4.5.3.2).
type Timeouts struct {
	Connect   Duration `yaml:"connect"`
	Greeting  Duration `yaml:"greeting"`
	Command   Duration `yaml:"command"`
	DataInit  Duration `yaml:"data_init"`
	DataBlock Duration `yaml:"data_block"`
	DataDone  Duration `yaml:"data_done"`
}

// DNS holds the resolver settings.
type DNS struct {
	Servers []string `yaml:"servers"` // "host:port"; empty: /etc/resolv.conf
	Timeout Duration `yaml:"timeout"` // per query
	IPv6    bool     `yaml:"ipv6"`    // also deliver to AAAA addresses (after the A ones)
}

// Route is a static next hop for a domain (or "*" for all others).
type Route struct {
	Hosts []string   `yaml:"hosts"` // "host:port" (A/AAAA lookup, no MX) or "[ip]:port"
	TLS   string     `yaml:"tls"`   // none | opportunistic | required; default delivery.tls
	Auth  *RouteAuth `yaml:"auth"`
}

// RouteAuth is SMTP AUTH for a smarthost.
type RouteAuth struct {
	Username     string `yaml:"username"`
	PasswordFile string `yaml:"password_file"` // file holding the password (first line)
}

// Admin holds the queue admin API settings.
type Admin struct {
	Enabled   bool   `yaml:"enabled"`    // serve the queue admin API (/api/) on listen.http
	TokenFile string `yaml:"token_file"` // file whose first line is the bearer token the admin API requires; empty: none (loopback listen.http only)
}

// API holds the settings of the HTTP injection API (listen.api,
// docs/injection.md).
type API struct {
	MaxRequestSize ByteSize `yaml:"max_request_size"` // bytes of one request body
	MaxRecipients  int      `yaml:"max_recipients"`   // recipients of one request
	Tenants        []Tenant `yaml:"tenants"`
	TLS            bool     `yaml:"tls"` // serve HTTPS with the tls.* certificate; needed off loopback
}

// DKIM holds the signing keys (docs/dkim.md).
type DKIM struct {
	Keys    []DKIMKey `yaml:"keys"`
	Headers []string  `yaml:"headers"` // fields signed when present; empty: the built-in list
}

// Suppression holds the suppression list's settings (docs/suppression.md).
type Suppression struct {
	Enabled bool `yaml:"enabled"` // refuse suppressed recipients of our users' mail, and add hard bounces
	// BounceCodes are the enhanced codes of remote permanent failures
	// that add the recipient: "5.1.1", or a class such as "5.1.*".
	BounceCodes []string `yaml:"bounce_codes"`
}

// Webhook is one endpoint that receives a tenant's message events
// (docs/webhooks.md).
type Webhook struct {
	Name       string   `yaml:"name"`        // in metrics, logs and event IDs
	Tenant     string   `yaml:"tenant"`      // whose events: an api.tenants name, or "default" for SMTP mail
	URL        string   `yaml:"url"`         // http or https
	SecretFile string   `yaml:"secret_file"` // first line: the HMAC-SHA256 key of the signature header
	MaxBuffer  ByteSize `yaml:"max_buffer"`  // events kept on disk while the endpoint does not take them; default 64MiB
}

// Bounces holds the return-path processing settings (docs/return-path.md).
type Bounces struct {
	// Domain is where VERP return paths point:
	// bounces+<queue-id>=<rcpt-domain>@DOMAIN; one of local_domains.
	Domain    string   `yaml:"domain"`
	Keep      Duration `yaml:"keep"`       // how long a message sent with one can be matched
	RulesFile string   `yaml:"rules_file"` // extra rules for non-standard bounces: "STATUS REGEXP" per line
}

// DKIMKey is one signing domain's key.
type DKIMKey struct {
	Domain   string `yaml:"domain"`   // d=; mail from it and its subdomains is signed
	Selector string `yaml:"selector"` // s=; published at SELECTOR._domainkey.DOMAIN
	KeyFile  string `yaml:"key_file"` // PEM private key (RSA or Ed25519; mta dkim keygen)
}

// Tenant is one application allowed to inject mail.
type Tenant struct {
	Name        string   `yaml:"name"`
	TokenFile   string   `yaml:"token_file"`   // file whose first line is its bearer token
	FromDomains []string `yaml:"from_domains"` // domains it may send from; empty: any
	// SigningDomain is the DKIM key (one of dkim.keys) that signs its mail
	// when the From domain has no key of its own.
	SigningDomain string `yaml:"signing_domain"`
}

// Debug holds settings for diagnosing the server.
type Debug struct {
	Pprof bool `yaml:"pprof"` // serve /debug/pprof/ on the HTTP listener
}

// Log holds logging settings.
type Log struct {
	Level  string `yaml:"level"`  // debug | info | warn | error
	Format string `yaml:"format"` // json | console
	// FlushInterval is how long a log line may wait in memory before it
	// is written, so that lines share write calls; warnings and errors
	// are written at once. 0 writes every line as it is logged.
	FlushInterval Duration   `yaml:"flush_interval"`
	Accounting    Accounting `yaml:"accounting"`
}

// Accounting is the accounting log: one JSON line per message event
// (docs/accounting.md).
type Accounting struct {
	File     string   `yaml:"file"`      // path; "" for none
	Stdout   bool     `yaml:"stdout"`    // also to standard output
	MaxSize  ByteSize `yaml:"max_size"`  // per file before rotation
	MaxFiles int      `yaml:"max_files"` // rotated files kept
}

// Default returns the embedded defaults: everything on loopback, data in
// ./data.
func Default() *Config {
	return &Config{
		DataDir:         "./data",
		TrustedNetworks: []string{"127.0.0.0/8", "::1/128"},
		Listen: Listen{
			SMTP:       "127.0.0.1:2525",
			Submission: "127.0.0.1:2587",
			POP3:       "127.0.0.1:2110",
			HTTP:       "127.0.0.1:9725",
		},
		SMTP: SMTP{
			MaxMessageSize:         10 << 20,
			MaxRecipients:          1000,
			MaxLineLength:          8192,
			MaxHops:                50,
			MaxConnections:         1000,
			MaxConnectionsPerIP:    200,
			CommandTimeout:         Duration(5 * 60e9),
			DataTimeout:            Duration(10 * 60e9),
			ShutdownTimeout:        Duration(30e9),
			BareLineEndings:        "reject",
			BareLineEndingsTrusted: "normalize",
			RejectEarlyData:        true,
			AddMissingHeaders:      true,
		},
		TLS:  TLS{SelfSigned: true},
		Auth: Auth{CleartextFromLoopback: true, MaxFailures: 3, ClientFailureLimit: 10, ClientFailureWindow: Duration(10 * 60e9)},
		Delivery: Delivery{
			Enabled:                          true,
			Port:                             25,
			TLS:                              "opportunistic",
			Chunking:                         true,
			MaxConnections:                   500,
			MaxConnectionsPerDestination:     20,
			InitialConnectionsPerDestination: 5,
			MaxMessagesPerConnection:         1000,
			MaxRecipientsPerTransaction:      100,
			MaxMXAddresses:                   5,
			IdleTimeout:                      Duration(10e9),
			MinBackoff:                       Duration(5 * 60e9),
			MaxBackoff:                       Duration(4000e9),
			MaxLifetime:                      Duration(5 * 24 * 3600e9),
			ActiveWindow:                     20000,
			Lease:                            Duration(60e9),
			Timeouts: Timeouts{
				Connect: Duration(30e9), Greeting: Duration(5 * 60e9), Command: Duration(5 * 60e9),
				DataInit: Duration(2 * 60e9), DataBlock: Duration(3 * 60e9), DataDone: Duration(10 * 60e9),
			},
		},
		DSN:          DSN{MaxReturnedSize: 100 << 10, DelayWarning: Duration(4 * 3600e9)},
		Mailboxes:    Mailboxes{Quota: 1 << 30},
		DNS:          DNS{Timeout: Duration(5e9), IPv6: true},
		Spool:        Spool{Sync: true, MinFreeSpace: 100 << 20, BodyFileThreshold: 32 << 10},
		Log:          Log{Level: "info", Format: "json", FlushInterval: Duration(100 * time.Millisecond), Accounting: Accounting{MaxSize: 100 << 20, MaxFiles: 10}},
		Admin:        Admin{Enabled: true},
		API:          API{MaxRequestSize: 32 << 20, MaxRecipients: 10000},
		Bounces:      Bounces{Keep: Duration(30 * 24 * 3600e9)},
		Suppression:  Suppression{Enabled: true, BounceCodes: []string{"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10", "5.2.1"}},
		MemoryBudget: 1 << 30,
	}
}

// Path returns the file the configuration was loaded from; "" for the
// embedded defaults.
func (c *Config) Path() string { return c.path }

// Load reads the file at path over the defaults, validates the result and
// checks that the files it names can be read. An empty path returns the
// validated defaults.
func Load(path string) (*Config, error) {
	cfg := Default()
	if path != "" {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("config: %w", err)
		}
		if err := decode(data, cfg); err != nil {
			return nil, fmt.Errorf("config %s: %w", path, err)
		}
	}
	cfg.path = path
	err := cfg.validate()
	if err == nil {
		err = cfg.checkFiles()
	}
	if err != nil {
		if path != "" {
			return nil, fmt.Errorf("config %s: %w", path, err)
		}
		return nil, fmt.Errorf("config: %w", err)
	}
	return cfg, nil
}

// Parse decodes and validates YAML text over the defaults.
func Parse(data []byte) (*Config, error) {
	cfg := Default()
	if err := decode(data, cfg); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return cfg, nil
}

// decode unmarshals data into cfg, refusing unknown keys and naming the
// field of any error by its dotted path.
func decode(data []byte, cfg *Config) error {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return errors.New(strings.TrimPrefix(err.Error(), "yaml: "))
	}
	if root.Kind == 0 { // empty file
		return nil
	}
	lines := map[int]string{}
	cfg.lines = map[string]int{}
	if err := checkKnown(&root, cfg, "", lines, cfg.lines); err != nil {
		return err
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(cfg); err != nil {
		return nameFields(err, lines)
	}
	return nil
}

// Trusted reports whether ip is in the trusted networks.
func (c *Config) Trusted(ip netip.Addr) bool {
	ip = ip.Unmap()
	for _, p := range c.trusted {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// TrustedPrefixes returns the parsed trusted networks.
func (c *Config) TrustedPrefixes() []netip.Prefix { return c.trusted }

// FieldError is a validation failure of one field.
type FieldError struct {
	Field  string // dotted path, e.g. "smtp.max_message_size"
	Reason string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Reason }

// Line returns the line of the configuration file that set field (a
// dotted path such as "routes.example.com.hosts[0]"), or of the nearest
// enclosing section that the file set; 0 when the value is a default.
func (c *Config) Line(field string) int {
	for f := field; f != ""; {
		if n, ok := c.lines[f]; ok {
			return n
		}
		i := strings.LastIndexAny(f, ".[")
		if i < 0 {
			break
		}
		f = f[:i]
	}
	return 0
}

// IsSet reports whether the configuration file set field itself (a
// dotted path), not left it to its default.
func (c *Config) IsSet(field string) bool {
	_, ok := c.lines[field]
	return ok
}

// FieldErr returns err as the error of field, with its line in the file.
func (c *Config) FieldErr(field string, err error) error {
	reason := err.Error()
	var pe *fs.PathError
	if errors.As(err, &pe) {
		reason = pe.Path + ": " + pe.Err.Error()
	}
	if n := c.Line(field); n > 0 {
		reason += fmt.Sprintf(" (line %d)", n)
	}
	return &FieldError{field, reason}
}

// checkFiles checks that every file the configuration names can be read,
// so that a missing certificate or password file is reported with its
// field and line before anything starts.
func (c *Config) checkFiles() error {
	var errs []error
	readable := func(field, path string) {
		if path == "" {
			return
		}
		f, err := os.Open(path)
		if err != nil {
			errs = append(errs, c.FieldErr(field, err))
			return
		}
		f.Close()
	}
	readable("tls.cert_file", c.TLS.CertFile)
	readable("tls.key_file", c.TLS.KeyFile)
	readable("auth.users_file", c.Auth.UsersFile)
	readable("admin.token_file", c.Admin.TokenFile)
	for i, tn := range c.API.Tenants {
		readable(fmt.Sprintf("api.tenants[%d].token_file", i), tn.TokenFile)
	}
	for i, k := range c.DKIM.Keys {
		field := fmt.Sprintf("dkim.keys[%d].key_file", i)
		readable(field, k.KeyFile)
		if fi, err := os.Stat(k.KeyFile); err == nil && fi.Mode().Perm()&0o077 != 0 {
			// OpenDKIM refuses such a key; a warning is enough to fix it.
			c.warnings = append(c.warnings, fmt.Sprintf("%s: %s can be read by others (mode %04o): a private key should be chmod 600, owned by the user mta runs as",
				field, k.KeyFile, fi.Mode().Perm()))
		}
	}
	for i, w := range c.Webhooks {
		readable(fmt.Sprintf("webhooks[%d].secret_file", i), w.SecretFile)
	}
	readable("bounces.rules_file", c.Bounces.RulesFile)
	for dom, r := range c.Routes {
		if r.Auth != nil {
			readable("routes."+dom+".auth.password_file", r.Auth.PasswordFile)
		}
	}
	return errors.Join(errs...)
}

// Warnings returns what validation found questionable but not wrong.
func (c *Config) Warnings() []string { return c.warnings }

func (c *Config) validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, c.FieldErr(field, fmt.Errorf(format, args...)))
	}
	c.warnings = nil
	if c.Hostname == "" {
		h, err := os.Hostname()
		if err != nil || h == "" {
			h = "localhost"
		}
		c.Hostname = h
	} else if strings.ContainsAny(c.Hostname, " \t\r\n<>@") {
		bad("hostname", "not a host name: %q", c.Hostname)
	}
	if c.DataDir == "" {
		bad("data_dir", "must not be empty")
	} else {
		c.DataDir = filepath.Clean(c.DataDir)
	}
	for i, d := range c.LocalDomains {
		d = strings.ToLower(strings.TrimSuffix(strings.TrimSpace(d), "."))
		if d == "" || strings.ContainsAny(d, " @<>[]") {
			bad(fmt.Sprintf("local_domains[%d]", i), "not a domain: %q", c.LocalDomains[i])
		}
		c.LocalDomains[i] = d
	}
	c.trusted = c.trusted[:0]
	for i, n := range c.TrustedNetworks {
		p, err := netip.ParsePrefix(strings.TrimSpace(n))
		if err != nil {
			if a, aerr := netip.ParseAddr(strings.TrimSpace(n)); aerr == nil {
				p = netip.PrefixFrom(a, a.BitLen())
			} else {
				bad(fmt.Sprintf("trusted_networks[%d]", i), "not a CIDR network or IP address: %q", n)
				continue
			}
		}
		c.trusted = append(c.trusted, p.Masked())
	}
	c.validateListen(bad)
	s := &c.SMTP
	positive := func(field string, v int64) {
		if v <= 0 {
			bad(field, "must be greater than zero, got %d", v)
		}
	}
	positive("smtp.max_message_size", int64(s.MaxMessageSize))
	positive("smtp.max_recipients", int64(s.MaxRecipients))
	positive("smtp.max_hops", int64(s.MaxHops))
	if c.MemoryBudget < 2*c.SMTP.MaxMessageSize {
		bad("memory_budget", "must be at least twice smtp.max_message_size (%d bytes: a message and its copy while it is stored), got %d", 2*int64(c.SMTP.MaxMessageSize), int64(c.MemoryBudget))
	}
	positive("smtp.max_connections", int64(s.MaxConnections))
	positive("smtp.max_connections_per_ip", int64(s.MaxConnectionsPerIP))
	positive("smtp.command_timeout", int64(s.CommandTimeout))
	positive("smtp.data_timeout", int64(s.DataTimeout))
	positive("smtp.shutdown_timeout", int64(s.ShutdownTimeout))
	if s.MaxLineLength < 1000 {
		bad("smtp.max_line_length", "must be at least 1000 (RFC 5321 §4.5.3.1.6), got %d", s.MaxLineLength)
	}
	for _, f := range []struct{ field, value string }{
		{"smtp.bare_line_endings", s.BareLineEndings},
		{"smtp.bare_line_endings_trusted", s.BareLineEndingsTrusted},
	} {
		if f.value != "reject" && f.value != "normalize" {
			bad(f.field, "must be reject or normalize, got %q", f.value)
		}
	}
	positive("auth.max_failures", int64(c.Auth.MaxFailures))
	if c.Auth.ClientFailureLimit < 0 {
		bad("auth.client_failure_limit", "must not be negative (0 turns the limit off), got %d", c.Auth.ClientFailureLimit)
	}
	if c.Auth.ClientFailureLimit > 0 {
		positive("auth.client_failure_window", int64(c.Auth.ClientFailureWindow))
	}
	if c.Listen.POP3S != "" && c.TLS.CertFile == "" && !c.TLS.SelfSigned {
		bad("listen.pop3s", "POP3 over implicit TLS needs a certificate: set tls.cert_file and tls.key_file, or tls.self_signed")
	}
	if (c.TLS.CertFile == "") != (c.TLS.KeyFile == "") {
		bad("tls.cert_file", "cert_file and key_file must be set together")
	}
	if c.Spool.MinSyncInterval < 0 || c.Spool.MinSyncInterval.D() > time.Second/10 {
		bad("spool.min_sync_interval", "must be between 0 and 100ms, got %v", c.Spool.MinSyncInterval.D())
	}
	if c.Spool.MemTableSize != 0 && (c.Spool.MemTableSize < 4<<20 || c.Spool.MemTableSize > 1<<30) {
		bad("spool.memtable_size", "must be between 4MiB and 1GiB, got %d bytes", int64(c.Spool.MemTableSize))
	}
	if c.Spool.BodyFileThreshold != 0 && c.Spool.BodyFileThreshold < 1<<10 {
		bad("spool.body_file_threshold", "must be 0 (off) or at least 1KiB, got %d bytes", int64(c.Spool.BodyFileThreshold))
	}
	if c.Spool.MinFreeSpace < 0 {
		bad("spool.min_free_space", "must not be negative")
	}
	c.validateDelivery(bad)
	c.validateAPI(bad)
	c.validateDKIM(bad)
	for i, tn := range c.API.Tenants {
		if tn.SigningDomain == "" {
			continue
		}
		found := false
		for _, k := range c.DKIM.Keys {
			found = found || strings.EqualFold(strings.TrimSuffix(k.Domain, "."), tn.SigningDomain)
		}
		if !found {
			bad(fmt.Sprintf("api.tenants[%d].signing_domain", i), "%q has no key in dkim.keys", tn.SigningDomain)
		}
	}
	c.validateWebhooks(bad)
	if d := c.Bounces.Domain; d != "" {
		nd, ok := mta.NormalizeDomain(d)
		if !ok {
			bad("bounces.domain", "not a domain: %q", d)
		} else if !slices.Contains(c.LocalDomains, nd) {
			bad("bounces.domain", "%s must be one of local_domains: bounces come back to it over SMTP", nd)
		}
		c.Bounces.Domain = nd
	}
	if c.Bounces.Keep <= 0 {
		bad("bounces.keep", "must be greater than zero")
	}
	for i, code := range c.Suppression.BounceCodes {
		if !validCodePattern(code) {
			bad(fmt.Sprintf("suppression.bounce_codes[%d]", i), "want a permanent enhanced status code such as 5.1.1 or 5.1.*, got %q", code)
		}
	}
	if c.Mailboxes.Quota < 0 {
		bad("mailboxes.quota", "must not be negative (0: no limit)")
	}
	if c.DSN.MaxReturnedSize < 0 {
		bad("dsn.max_returned_size", "must not be negative")
	}
	if c.DSN.DelayWarning < 0 {
		bad("dsn.delay_warning", "must not be negative (0 disables delay notices)")
	}
	if p := c.DSN.Postmaster; p != "" && (strings.Count(p, "@") != 1 || strings.ContainsAny(p, " \t\r\n<>") || strings.HasPrefix(p, "@") || strings.HasSuffix(p, "@")) {
		bad("dsn.postmaster", "not a mail address: %q", p)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "must be debug, info, warn or error, got %q", c.Log.Level)
	}
	if c.Log.Accounting.MaxSize < 1<<20 {
		bad("log.accounting.max_size", "must be at least 1MiB")
	}
	if c.Log.Accounting.MaxFiles < 0 {
		bad("log.accounting.max_files", "must not be negative")
	}
	if c.Log.FlushInterval < 0 || c.Log.FlushInterval > Duration(time.Minute) {
		bad("log.flush_interval", "must be between 0 (write every line at once) and 1m")
	}
	if c.Log.Format != "json" && c.Log.Format != "console" {
		bad("log.format", "must be json or console, got %q", c.Log.Format)
	}
	return errors.Join(errs...)
}

func (c *Config) validateDelivery(bad func(field, format string, args ...any)) {
	d := &c.Delivery
	if d.HeloName == "" {
		d.HeloName = c.Hostname
	}
	if d.Port < 1 || d.Port > 65535 {
		bad("delivery.port", "must be a port number, got %d", d.Port)
	}
	tlsPolicy := func(field, v string) {
		if v != "none" && v != "opportunistic" && v != "required" {
			bad(field, "must be none, opportunistic or required, got %q", v)
		}
	}
	tlsPolicy("delivery.tls", d.TLS)
	for _, f := range []struct {
		field string
		v     int
	}{
		{"delivery.max_connections", d.MaxConnections},
		{"delivery.max_connections_per_destination", d.MaxConnectionsPerDestination},
		{"delivery.initial_connections_per_destination", d.InitialConnectionsPerDestination},
		{"delivery.max_messages_per_connection", d.MaxMessagesPerConnection},
		{"delivery.max_recipients_per_transaction", d.MaxRecipientsPerTransaction},
		{"delivery.max_mx_addresses", d.MaxMXAddresses},
		{"delivery.active_window", d.ActiveWindow},
	} {
		if f.v <= 0 {
			bad(f.field, "must be greater than zero, got %d", f.v)
		}
	}
	if c.IsSet("delivery.max_connections_per_destination") && d.MaxConnectionsPerDestination > d.MaxConnections && d.MaxConnections > 0 {
		bad("delivery.max_connections_per_destination", "%d is more than delivery.max_connections (%d), the limit of all connections",
			d.MaxConnectionsPerDestination, d.MaxConnections)
	}
	for _, f := range []struct {
		field string
		v     Duration
	}{
		{"delivery.idle_timeout", d.IdleTimeout}, {"delivery.min_backoff", d.MinBackoff}, {"delivery.lease", d.Lease},
		{"delivery.max_backoff", d.MaxBackoff}, {"delivery.max_lifetime", d.MaxLifetime},
		{"delivery.timeouts.connect", d.Timeouts.Connect}, {"delivery.timeouts.greeting", d.Timeouts.Greeting},
		{"delivery.timeouts.command", d.Timeouts.Command}, {"delivery.timeouts.data_init", d.Timeouts.DataInit},
		{"delivery.timeouts.data_block", d.Timeouts.DataBlock}, {"delivery.timeouts.data_done", d.Timeouts.DataDone},
		{"dns.timeout", c.DNS.Timeout},
	} {
		if f.v <= 0 {
			bad(f.field, "must be greater than zero, got %v", f.v.D())
		}
	}
	if d.MaxBackoff < d.MinBackoff {
		bad("delivery.max_backoff", "must not be less than delivery.min_backoff (%v)", d.MinBackoff.D())
	}
	c.validateDomainLimits(bad)
	for i, s := range c.DNS.Servers {
		if _, _, err := net.SplitHostPort(s); err != nil {
			bad(fmt.Sprintf("dns.servers[%d]", i), "not a host:port address: %q", s)
		}
	}
	routes := map[string]Route{}
	for dom, r := range c.Routes {
		key := strings.ToLower(strings.TrimSuffix(strings.TrimSpace(dom), "."))
		field := "routes." + dom
		if key == "" || strings.ContainsAny(key, " @<>[]") {
			bad(field, "not a domain or *: %q", dom)
		}
		if len(r.Hosts) == 0 {
			bad(field+".hosts", "needs at least one host")
		}
		for i, h := range r.Hosts {
			if err := checkRouteHost(h); err != nil {
				bad(fmt.Sprintf("%s.hosts[%d]", field, i), "%q: %v", h, err)
			}
		}
		if r.TLS != "" {
			tlsPolicy(field+".tls", r.TLS)
		}
		if r.Auth != nil && (r.Auth.Username == "" || r.Auth.PasswordFile == "") {
			bad(field+".auth", "needs username and password_file")
		}
		routes[key] = r
	}
	c.Routes = routes
}

// validateDomainLimits checks delivery.domains and keys it by the
// normalized domain, the form the scheduler sees.
func (c *Config) validateDomainLimits(bad func(field, format string, args ...any)) {
	d := &c.Delivery
	if len(d.Domains) == 0 {
		return
	}
	out := make(map[string]DomainLimits, len(d.Domains))
	for name, l := range d.Domains {
		field := "delivery.domains." + name
		domain, ok := mta.NormalizeDomain(strings.TrimSpace(name))
		if !ok {
			bad(field, "not a domain name: %q", name)
			continue
		}
		if _, dup := out[domain]; dup {
			bad(field, "%q is given twice (as %s)", domain, name)
		}
		if l.MaxConnections < 0 {
			bad(field+".max_connections", "must not be negative, got %d", l.MaxConnections)
		}
		if l.MaxConnections > d.MaxConnections {
			bad(field+".max_connections", "%d is more than delivery.max_connections (%d), the limit of all connections", l.MaxConnections, d.MaxConnections)
		}
		if l.MaxMessagesPerConnection < 0 {
			bad(field+".max_messages_per_connection", "must not be negative, got %d", l.MaxMessagesPerConnection)
		}
		if l.MaxRecipientsPerTransaction < 0 {
			bad(field+".max_recipients_per_transaction", "must not be negative, got %d", l.MaxRecipientsPerTransaction)
		}
		if l == (DomainLimits{}) {
			bad(field, "sets none of max_connections, max_messages_per_connection and max_recipients_per_transaction")
		}
		out[domain] = l
	}
	d.Domains = out
}

// validateAPI checks the injection API's settings.
func (c *Config) validateAPI(bad func(field, format string, args ...any)) {
	a := &c.API
	if a.MaxRequestSize <= 0 {
		bad("api.max_request_size", "must be greater than zero, got %d", int64(a.MaxRequestSize))
	}
	if a.MaxRecipients <= 0 {
		bad("api.max_recipients", "must be greater than zero, got %d", a.MaxRecipients)
	}
	if c.Listen.API != "" && c.MemoryBudget < 2*a.MaxRequestSize {
		bad("memory_budget", "must be at least twice api.max_request_size (%d bytes: a request and the messages made from it), got %d", 2*int64(a.MaxRequestSize), int64(c.MemoryBudget))
	}
	if c.Listen.API != "" && len(a.Tenants) == 0 {
		bad("api.tenants", "listen.api is set: name at least one tenant (name and token_file) that may inject")
	}
	seen := map[string]bool{}
	for i, tn := range a.Tenants {
		field := fmt.Sprintf("api.tenants[%d]", i)
		if !validTenantName(tn.Name) {
			bad(field+".name", "want 1 to 64 letters, digits, '-' or '_', got %q", tn.Name)
		} else if tn.Name == "default" {
			bad(field+".name", "default is the tenant of SMTP mail; choose another name")
		} else if seen[tn.Name] {
			bad(field+".name", "%q is named twice", tn.Name)
		}
		seen[tn.Name] = true
		if tn.TokenFile == "" {
			bad(field+".token_file", "must be set: the file with the tenant's bearer token")
		}
		for j, d := range tn.FromDomains {
			if _, ok := mta.NormalizeDomain(d); !ok {
				bad(fmt.Sprintf("%s.from_domains[%d]", field, j), "not a domain: %q", d)
			}
		}
	}
}

func validTenantName(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return false
		}
	}
	return true
}

// validateDKIM checks the signing keys' settings; the keys themselves are
// read at start (and on reload).
func (c *Config) validateDKIM(bad func(field, format string, args ...any)) {
	seen := map[string]bool{}
	for i, k := range c.DKIM.Keys {
		field := fmt.Sprintf("dkim.keys[%d]", i)
		d, ok := mta.NormalizeDomain(k.Domain)
		switch {
		case !ok:
			bad(field+".domain", "not a domain: %q", k.Domain)
		case seen[d]:
			bad(field+".domain", "%s has a key already: one key per signing domain", d)
		}
		seen[d] = true
		if _, ok := mta.NormalizeDomain(k.Selector); !ok || strings.Contains(k.Selector, "_") {
			bad(field+".selector", "want a DNS label such as s2026 (letters, digits, '-'), got %q", k.Selector)
		}
		if k.KeyFile == "" {
			bad(field+".key_file", "must be set: the PEM private key (mta dkim keygen writes one)")
		}
	}
	from := false
	for i, h := range c.DKIM.Headers {
		if h == "" || strings.ContainsAny(h, ": \t\r\n") {
			bad(fmt.Sprintf("dkim.headers[%d]", i), "not a header field name: %q", h)
		}
		from = from || strings.EqualFold(h, "From")
	}
	if len(c.DKIM.Headers) > 0 && !from {
		bad("dkim.headers", "must include From (RFC 6376 §5.4)")
	}
}

// validCodePattern reports whether p is "5.x.y" with x and y numbers or
// "*" (y only, or both).
func validCodePattern(p string) bool {
	parts := strings.Split(p, ".")
	if len(parts) != 3 || parts[0] != "5" {
		return false
	}
	for i, s := range parts[1:] {
		if s == "*" && (i == 1 || parts[2] == "*") {
			continue
		}
		if _, err := strconv.Atoi(s); err != nil || len(s) > 3 {
			return false
		}
	}
	return true
}

// validateWebhooks checks the webhooks; their secrets are read at start.
func (c *Config) validateWebhooks(bad func(field, format string, args ...any)) {
	tenants := map[string]bool{"default": true}
	for _, tn := range c.API.Tenants {
		tenants[tn.Name] = true
	}
	names := map[string]bool{}
	for i := range c.Webhooks {
		w := &c.Webhooks[i]
		field := fmt.Sprintf("webhooks[%d]", i)
		if !validTenantName(w.Name) {
			bad(field+".name", "want 1 to 64 letters, digits, '-' or '_', got %q", w.Name)
		} else if names[w.Name] {
			bad(field+".name", "%q is named twice", w.Name)
		}
		names[w.Name] = true
		if !tenants[w.Tenant] {
			bad(field+".tenant", "%q is neither default nor one of api.tenants", w.Tenant)
		}
		if u, err := url.Parse(w.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			bad(field+".url", "want an http:// or https:// URL, got %q", w.URL)
		}
		if w.SecretFile == "" {
			bad(field+".secret_file", "must be set: the file with the signing secret")
		}
		if w.MaxBuffer == 0 {
			w.MaxBuffer = 64 << 20
		}
		if w.MaxBuffer < 0 {
			bad(field+".max_buffer", "must be greater than zero")
		}
	}
}
