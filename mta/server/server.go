// Package server is the composition root of the appliance: it turns a
// config.Config into a logger, a metrics registry, the spool, the SMTP
// listeners and the HTTP endpoint, runs them, and stops them gracefully:
// stop accepting, let the transactions in flight finish, close the spool.
package server

import (
	"io/fs"

	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"golang.org/x/sys/unix"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/net/netutil"

	"github.com/mtaproject/mta/metrics"
	"github.com/mtaproject/mta/mta"
	"github.com/mtaproject/mta/mta/accounting"
	"github.com/mtaproject/mta/mta/admin"
	"github.com/mtaproject/mta/mta/auth"
	"github.com/mtaproject/mta/mta/bounceparse"
	"github.com/mtaproject/mta/mta/certs"
	"github.com/mtaproject/mta/mta/config"
	"github.com/mtaproject/mta/mta/dkim"
	"github.com/mtaproject/mta/mta/inject"
	"github.com/mtaproject/mta/mta/mailbox"
	"github.com/mtaproject/mta/mta/pop3d"
	"github.com/mtaproject/mta/mta/smtpd"
	"github.com/mtaproject/mta/mta/webhook"
	"github.com/mtaproject/mta/scheduler"
	"github.com/mtaproject/mta/spool"
)

// Server is the running appliance.
type Server struct {
	cfg      *config.Config
	log      *zap.Logger
	registry *prometheus.Registry
	spool    *spool.Spool
	sched    *scheduler.Scheduler
	smtp     []*smtpListener
	pop3     []*pop3Listener
	http     *http.Server
	httpLn   net.Listener
	api      *http.Server // the injection API; nil when listen.api is off
	apiLn    net.Listener
	ready    atomic.Bool

	events     *eventLog           // the accounting log and the webhooks
	tenants    tenantSet           // API tenant names
	hooks      *webhook.Dispatcher // nil without webhooks
	reload     *reloader           // applies a changed configuration file
	queueStats *queueCollector     // the queue by state and age, for /metrics
	activity   *activity           // totals and recent events, for the status page
	users      *userDirectory      // the users file, re-read when it changes
	mailboxes  *mailbox.Transport  // local delivery
	signing    *signing            // DKIM signing of accepted mail
	suppress   *suppressions       // the suppression list; nil when off
	returns    *returnPath         // return-path processing; nil without bounces.domain

	adminToken string // bearer token the admin API requires; "" for none
}

type pop3Listener struct {
	name string
	srv  *pop3d.Server
	ln   net.Listener
}

type smtpListener struct {
	name string
	srv  *smtpd.Server
	ln   net.Listener
}

// Version is the running build's version, for mta_build_info; cmd/mta
// sets it.
var Version = "dev"

// maxHTTPConnections caps the HTTP listener's connections; more wait to be
// accepted.
const maxHTTPConnections = 64

// maxAPIConnections caps the injection API's connections: each request may
// hold api.max_request_size in memory.
const maxAPIConnections = 64

// idleHTTPTimeout is how long listen.http keeps an idle keep-alive
// connection: short, because idle connections count against its cap, and
// 64 of them held open would lock out Prometheus, health probes and
// `mta queue` for as long as they are kept.
const idleHTTPTimeout = 5 * time.Second

// SetLogLevel gives the server its logger's level, so that a reload can
// change it.
func (s *Server) SetLogLevel(l zap.AtomicLevel) { s.reload.level = &l }

// New opens the spool and binds every listener, so that a port in use or a
// bad certificate stops start-up with a clear error before anything runs.
func New(cfg *config.Config, log *zap.Logger) (_ *Server, err error) {
	s := &Server{cfg: cfg, log: log, registry: metrics.NewRegistry(), activity: &activity{reasons: map[string]int{}}}
	s.registry.MustRegister(metrics.BuildInfo(Version))
	defer func() {
		if err != nil {
			s.closeAll()
		}
	}()
	if err := Check(cfg); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o750); err != nil {
		return nil, fmt.Errorf("data_dir: %w", err)
	}
	a := cfg.Log.Accounting
	var acctErrors atomic.Int64
	acct, err := accounting.Open(accounting.Config{File: a.File, Stdout: a.Stdout, MaxSize: int64(a.MaxSize), MaxFiles: a.MaxFiles,
		OnError: func(err error) {
			if acctErrors.Add(1)%1000 == 1 { // the first, then one in a thousand
				log.Error("accounting log write failed", zap.Error(err), zap.Int64("failures", acctErrors.Load()))
			}
		}})
	if err != nil {
		return nil, cfg.FieldErr("log.accounting.file", err)
	}
	s.events = &eventLog{acct: acct}
	s.tenants = tenantSet{}
	for _, tn := range cfg.API.Tenants {
		s.tenants[tn.Name] = true
	}
	var notices *notifier // needs the spool's NewID: set once it is open, before delivery starts
	s.spool, err = spool.Open(filepath.Join(cfg.DataDir, "spool"), spool.Options{
		Sync:              cfg.Spool.Sync,
		MinFreeSpace:      int64(cfg.Spool.MinFreeSpace),
		MinSyncInterval:   cfg.Spool.MinSyncInterval.D(),
		MemTableSize:      uint64(cfg.Spool.MemTableSize),
		BodyFileThreshold: int64(cfg.Spool.BodyFileThreshold),
		// A new message becomes due on disk one lease after acceptance;
		// the scheduler gets it in memory at once. After a crash, mail
		// that was in flight is retried after at most this long.
		FreshLease: cfg.Delivery.Lease.D(),
		Logger:     log.Named("spool"),
		Registerer: s.registry,
		Notifier: func(t *spool.Transition, body func() ([]byte, error)) (*spool.Notice, error) {
			return notices.notice(t, body)
		},
		OnNotice: func(id string, domains []string) { s.sched.Submit(id, domains, mta.PriorityBulk) }, // notices wait behind transactional mail
	})
	if err != nil {
		return nil, err
	}
	notices = newNotifier(cfg.Hostname, int(cfg.DSN.MaxReturnedSize), cfg.DSN.DelayWarning.D(), cfg.Delivery.MaxLifetime.D(),
		cfg.DSN.Postmaster, s.spool.NewID, log.Named("dsn"), s.registry)
	notices.events, notices.tenants = s.events, s.tenants
	if !cfg.Spool.Sync {
		log.Warn("spool.sync is off: acknowledged messages can be lost in a crash")
	}
	memory := mta.NewBudget(int64(cfg.MemoryBudget))
	s.registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "mta_memory_budget_used_bytes", Help: "Bytes of message bodies held in memory now (memory_budget), received or being delivered.",
	}, func() float64 { return float64(memory.Used()) }), prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "mta_memory_budget_bytes", Help: "The memory budget for message bodies (memory_budget).",
	}, func() float64 { return float64(memory.Limit()) }))
	self := newSelf(cfg)
	transport, err := newTransport(cfg, s.registry, self)
	if err != nil {
		return nil, err
	}
	sec, err := loadSecrets(cfg, true)
	if err != nil {
		return nil, err
	}
	s.users = newUserDirectory(cfg.Auth.UsersFile, sec.users, log.Named("users"))
	s.mailboxes = &mailbox.Transport{
		Directory: func() mailbox.Directory { return s.users },
		Store:     mailboxStore{s.spool},
		Quota:     int64(cfg.Mailboxes.Quota),
		// Reports to the bounce domain are read however full its mailbox.
		TakeWhenFull: func(address string) bool { return s.returns != nil && mta.Domain(address) == s.returns.domain },
	}
	d := cfg.Delivery
	s.sched = scheduler.New(scheduler.Options{
		Store:      queueStore{s.spool},
		Transport:  newRouter(cfg.LocalDomains, s.mailboxes, transport),
		Limits:     schedulerLimits(cfg),
		Lease:      d.Lease.D(),
		WindowSize: d.ActiveWindow,
		StopGrace:  cfg.SMTP.ShutdownTimeout.D(),
		Memory:     memory,
		Logger:     log.Named("scheduler"),
		Registerer: s.registry,
		Observe:    s.accountOutcome,
	})
	s.queueStats = newQueueCollector(s.spool, s.sched)
	s.registry.MustRegister(s.queueStats)
	// Messages a version without bounces kept for the bounce they were
	// owed get it now, and leave the queue.
	if n, err := s.spool.SettleFinished(); err != nil {
		return nil, err
	} else if n > 0 {
		log.Info("finished messages bounced and removed", zap.Int("messages", n))
	}
	s.signing = newSigning(s.registry, sec.dkim, log.Named("dkim"))
	s.signing.tenant, s.signing.tenants, s.signing.limited = map[string]string{}, s.tenants, map[string]bool{}
	s.signing.maySend = s.users.MaySend
	for _, tn := range cfg.API.Tenants {
		s.signing.limited[tn.Name] = len(tn.FromDomains) > 0
		if tn.SigningDomain != "" {
			s.signing.tenant[tn.Name] = strings.ToLower(tn.SigningDomain)
		}
	}
	if len(sec.hooks) > 0 {
		if s.hooks, err = webhook.New(webhook.Options{Store: eventStore{s.spool}, Hooks: sec.hooks, UserAgent: "mta/" + Version,
			Logger: log.Named("webhook"), Registerer: s.registry}); err != nil {
			return nil, err
		}
		s.events.hooks = s.hooks
		s.events.byTenant = map[string][]string{}
		for _, w := range cfg.Webhooks {
			s.events.byTenant[w.Tenant] = append(s.events.byTenant[w.Tenant], w.Name)
		}
	}
	var returnPathFunc func(id, rcpt string) string
	if cfg.Bounces.Domain != "" {
		rules, err := bounceRules(cfg)
		if err != nil {
			return nil, err
		}
		secret, err := verpSecret(filepath.Join(cfg.DataDir, "verp.secret"))
		if err != nil {
			return nil, cfg.FieldErr("bounces.domain", err)
		}
		s.returns = newReturnPath(cfg.Bounces.Domain, cfg.Hostname, secret, s.spool, rules, s.registry, log.Named("return-path"))
		if _, ok := s.users.Mailbox("bounces+x-00000000=x@" + cfg.Bounces.Domain); !ok {
			log.Warn("bounces.domain has no catch-all mailbox in the users file: bounces coming back to it are refused with 550 5.1.1 and never read",
				zap.String("domain", cfg.Bounces.Domain), zap.String("fix", "add a line  bounces:HASH::@"+cfg.Bounces.Domain+"  to auth.users_file"))
		}
		s.returns.events = s.events
		returnPathFunc = s.returns.address
	}
	var suppressed func(authUser, rcpt string) *mta.Reply
	var refuse func(tenant, rcpt string) *mta.Reply
	if cfg.Suppression.Enabled {
		s.suppress = &suppressions{sp: s.spool, tenants: s.tenants, codes: cfg.Suppression.BounceCodes, log: log.Named("suppression")}
		suppressed = func(authUser, rcpt string) *mta.Reply { return s.suppress.refuse(s.suppress.tenant(authUser), rcpt) }
		refuse = s.suppress.refuse
	}
	if s.returns != nil {
		s.returns.suppress = s.suppress
	}
	tlsCfg, certHold := dynamicTLS(sec.tls)
	s.reload = &reloader{path: cfg.Path(), cfg: cfg, cert: certHold, users: s.users, transport: transport, sched: s.sched, signing: s.signing, adminToken: sec.adminToken, log: log.Named("reload"),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mta_config_reloads_total",
			Help: "Configuration reloads (SIGHUP, mta reload) by result (ok, failed)."}, []string{"result"})}
	s.reload.reloads.WithLabelValues("ok")
	s.reload.reloads.WithLabelValues("failed")
	s.registry.MustRegister(s.reload.reloads)
	var users smtpd.Authenticator
	if cfg.Auth.UsersFile != "" {
		users = s.users
	}
	var local smtpd.Mailboxes
	if len(cfg.LocalDomains) > 0 {
		local = s.mailboxes
	}
	s.adminToken = sec.adminToken
	limits := smtpd.NewConnLimits(cfg.SMTP.MaxConnections, cfg.SMTP.MaxConnectionsPerIP)
	authFailures := smtpd.NewAuthFailures(cfg.Auth.ClientFailureLimit, cfg.Auth.ClientFailureWindow.D())
	s.reload.connLimits, s.reload.authFails = limits, authFailures
	m := smtpd.NewMetrics(s.registry)
	for _, l := range []struct {
		name, addr string
		submission bool
	}{{"smtp", cfg.Listen.SMTP, false}, {"submission", cfg.Listen.Submission, true}} {
		if l.addr == "" {
			continue
		}
		ln, err := listen(cfg, "listen."+l.name, l.addr)
		if err != nil {
			return nil, err
		}
		addListener(self, ln)
		srv := smtpd.New(smtpd.Options{
			Name:         l.name,
			Hostname:     cfg.Hostname,
			Submission:   l.submission,
			LocalDomains: cfg.LocalDomains,
			Policy:       smtpPolicy(cfg),
			TLS:          tlsCfg,
			Spool:        s.acceptor(),
			Auth:         users,
			Mailboxes:    local,
			OnAccepted:   s.accountReception,
			Suppressed:   suppressed,
			AuthFailures: authFailures,
			Memory:       memory,
			Limits:       limits,
			Metrics:      m,
			Logger:       log.Named("smtpd"),
		})
		s.smtp = append(s.smtp, &smtpListener{name: l.name, srv: srv, ln: ln})
		s.reload.listeners = append(s.reload.listeners, srv)
	}
	pm := pop3d.NewMetrics(s.registry)
	mailboxLocks := pop3d.NewLocks() // one session per mailbox, whichever listener
	for _, l := range []struct {
		name, addr string
		implicit   bool
	}{{"pop3", cfg.Listen.POP3, false}, {"pop3s", cfg.Listen.POP3S, true}} {
		if l.addr == "" {
			continue
		}
		ln, err := listen(cfg, "listen."+l.name, l.addr)
		if err != nil {
			return nil, err
		}
		srv := pop3d.New(pop3d.Options{
			Name: l.name, Hostname: cfg.Hostname, Backend: pop3Backend{users: s.users, sp: s.spool, mailboxes: s.mailboxes},
			TLS: tlsCfg, ImplicitTLS: l.implicit, CleartextFromLoopback: cfg.Auth.CleartextFromLoopback,
			Failures: authFailures, Locks: mailboxLocks, Metrics: pm, Logger: log.Named("pop3d"),
		})
		s.pop3 = append(s.pop3, &pop3Listener{name: l.name, srv: srv, ln: ln})
	}
	if cfg.Listen.API != "" {
		if s.apiLn, err = listen(cfg, "listen.api", cfg.Listen.API); err != nil {
			return nil, err
		}
		s.apiLn = netutil.LimitListener(s.apiLn, maxAPIConnections)
		if cfg.API.TLS {
			s.apiLn = tls.NewListener(s.apiLn, tlsCfg)
		}
		apiMux := http.NewServeMux()
		if s.suppress != nil {
			// A tenant sees and edits its own list only.
			tenantList := s.suppress.handler(func(r *http.Request) (string, error) {
				return inject.Authenticate(sec.tenants, r).Name, nil
			}, "api")
			apiMux.Handle("/api/v1/suppressions", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if inject.Authenticate(sec.tenants, r) == nil {
					inject.Unauthorized(w)
					return
				}
				tenantList.ServeHTTP(w, r)
			}))
		}
		apiMux.Handle("/", inject.Handler(inject.Options{
			Hostname:       cfg.Hostname,
			Tenants:        sec.tenants,
			MaxRequestSize: int64(cfg.API.MaxRequestSize),
			MaxRecipients:  cfg.API.MaxRecipients,
			MaxMessageSize: int64(cfg.SMTP.MaxMessageSize),
			Store:          s.acceptor(),
			Memory:         memory,
			Refuse:         injectionRefusal(cfg.LocalDomains, local, refuse),
			ReturnPath:     returnPathFunc,
			OnAccepted:     func(id string, env *mta.Envelope, size int) { s.accountReception(id, env, size, "") },
			Registerer:     s.registry,
			Logger:         log.Named("inject"),
		}))
		s.api = &http.Server{
			Handler:           apiMux,
			ReadHeaderTimeout: 10 * time.Second,
			ReadTimeout:       5 * time.Minute, // a large request over a slow link
			WriteTimeout:      5 * time.Minute,
			IdleTimeout:       2 * time.Minute, // applications reuse connections; a short timeout races their next POST
			MaxHeaderBytes:    32 << 10,
			ErrorLog:          zap.NewStdLog(log.Named("inject")),
		}
	}
	if cfg.Listen.HTTP != "" {
		s.httpLn, err = listen(cfg, "listen.http", cfg.Listen.HTTP)
		if err != nil {
			return nil, err
		}
		// Operators' and Prometheus's requests are small and quick: bound
		// how long and how many, so that a slow or flooding client cannot
		// tie the process up.
		s.httpLn = netutil.LimitListener(s.httpLn, maxHTTPConnections)
		s.http = &http.Server{
			Handler:           s.routes(),
			ReadHeaderTimeout: 10 * time.Second,
			ReadTimeout:       30 * time.Second,
			WriteTimeout:      2 * time.Minute, // a CPU profile takes its seconds
			IdleTimeout:       idleHTTPTimeout,
			MaxHeaderBytes:    32 << 10,
			ErrorLog:          zap.NewStdLog(log.Named("http")),
		}
	}
	return s, nil
}

// secrets are what start-up reads from the files the configuration names.
type secrets struct {
	tls        *tls.Config
	users      *auth.Users // nil without a users file
	adminToken string
	tenants    []inject.Tenant // the injection API's, with their tokens
	dkim       *dkim.Signer    // nil without keys
	hooks      []webhook.Hook  // with their secrets
}

// loadSecrets reads and checks the certificate, the users file and the
// admin token. generate allows making the self-signed certificate (serve);
// config check does not write.
func loadSecrets(cfg *config.Config, generate bool) (*secrets, error) {
	var sec secrets
	var err error
	switch {
	case cfg.TLS.CertFile != "":
		if sec.tls, err = certs.Load(cfg.TLS.CertFile, cfg.TLS.KeyFile); err != nil {
			return nil, cfg.FieldErr("tls.cert_file", err)
		}
	case cfg.TLS.SelfSigned && generate:
		if sec.tls, err = certs.SelfSigned(filepath.Join(cfg.DataDir, "tls"), cfg.Hostname); err != nil {
			return nil, cfg.FieldErr("tls.self_signed", err)
		}
	}
	if cfg.Auth.UsersFile != "" {
		u, err := auth.LoadUsers(cfg.Auth.UsersFile)
		if err != nil {
			return nil, cfg.FieldErr("auth.users_file", errors.New(strings.TrimPrefix(err.Error(), "auth.users_file ")))
		}
		sec.users = u
	}
	if cfg.Admin.TokenFile != "" {
		if sec.adminToken, err = readSecret(cfg.Admin.TokenFile, "token"); err != nil {
			return nil, cfg.FieldErr("admin.token_file", err)
		}
	}
	var keys []dkim.Key
	for i, k := range cfg.DKIM.Keys {
		if _, err := dkim.LoadKey(k.KeyFile); err != nil {
			return nil, cfg.FieldErr(fmt.Sprintf("dkim.keys[%d].key_file", i), err)
		}
		keys = append(keys, dkim.Key{Domain: k.Domain, Selector: k.Selector, KeyFile: k.KeyFile})
	}
	if len(keys) > 0 {
		if sec.dkim, err = dkim.New(keys, cfg.DKIM.Headers); err != nil {
			return nil, cfg.FieldErr("dkim.keys", err)
		}
	}
	for i, w := range cfg.Webhooks {
		field := fmt.Sprintf("webhooks[%d].secret_file", i)
		secret, err := readSecret(w.SecretFile, "secret")
		if err != nil {
			return nil, cfg.FieldErr(field, err)
		}
		sec.hooks = append(sec.hooks, webhook.Hook{Name: w.Name, URL: w.URL, Secret: secret, MaxBuffer: int64(w.MaxBuffer)})
	}
	seen := map[string]string{}
	for i, tn := range cfg.API.Tenants {
		field := fmt.Sprintf("api.tenants[%d].token_file", i)
		token, err := readSecret(tn.TokenFile, "token")
		if err != nil {
			return nil, cfg.FieldErr(field, err)
		}
		if other, ok := seen[token]; ok {
			return nil, cfg.FieldErr(field, fmt.Errorf("the same token as tenant %s: a token must name one tenant", other))
		}
		seen[token] = tn.Name
		sec.tenants = append(sec.tenants, inject.Tenant{Name: tn.Name, Token: token, FromDomains: tn.FromDomains})
	}
	return &sec, nil
}

// Check runs every start-up check that needs no listener and no spool:
// the certificate and what needs one, the users file, tokens, keys and
// secrets, route passwords and hosts, the bounce rules, and that data_dir
// and the accounting log's folder can be written. New runs it first, and
// `mta config check` uses it, so that the check finds what `mta serve`
// would.
func Check(cfg *config.Config) error {
	if _, err := loadSecrets(cfg, false); err != nil {
		return err
	}
	if cfg.TLS.CertFile == "" && !cfg.TLS.SelfSigned {
		switch {
		case cfg.Listen.POP3S != "":
			return cfg.FieldErr("listen.pop3s", errors.New("needs TLS: set tls.cert_file and tls.key_file, or tls.self_signed"))
		case cfg.Listen.API != "" && cfg.API.TLS:
			return cfg.FieldErr("api.tls", errors.New("needs a certificate: set tls.cert_file and tls.key_file, or tls.self_signed"))
		}
	}
	if err := writableDir(cfg.DataDir, true); err != nil {
		return fmt.Errorf("data_dir: %w", err)
	}
	if f := cfg.Log.Accounting.File; f != "" {
		if err := writableDir(filepath.Dir(f), false); err != nil {
			return cfg.FieldErr("log.accounting.file", err)
		}
	}
	if cfg.Bounces.Domain != "" {
		if _, err := bounceRules(cfg); err != nil {
			return err
		}
	}
	_, err := newTransport(cfg, prometheus.NewRegistry(), nil)
	return err
}

// writableDir checks that dir is a folder we may write in or, with
// create, that the closest folder that exists above it is (so that it can
// be made).
func writableDir(dir string, create bool) error {
	for d := dir; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		switch {
		case err == nil && !fi.IsDir():
			return fmt.Errorf("%s: not a directory", d)
		case err == nil:
			if unix.Access(d, unix.W_OK|unix.X_OK) != nil {
				return fmt.Errorf("%s: not writable", d)
			}
			return nil
		case !errors.Is(err, fs.ErrNotExist):
			return err
		case !create:
			return fmt.Errorf("%s: no such directory", d)
		case filepath.Dir(d) == d:
			return err
		}
	}
}

// bounceRules are the rules that read non-standard bounces: bounces.rules_file's
// first, then the built-in ones.
func bounceRules(cfg *config.Config) ([]bounceparse.Rule, error) {
	rules := bounceparse.DefaultRules
	if cfg.Bounces.RulesFile == "" {
		return rules, nil
	}
	f, err := os.Open(cfg.Bounces.RulesFile)
	if err != nil {
		return nil, cfg.FieldErr("bounces.rules_file", err)
	}
	defer f.Close()
	extra, err := bounceparse.ParseRules(f)
	if err != nil {
		return nil, cfg.FieldErr("bounces.rules_file", fmt.Errorf("%s: %w", cfg.Bounces.RulesFile, err))
	}
	return append(extra, rules...), nil
}

// listen binds one listener, saying plainly when the port is taken.
func listen(cfg *config.Config, field, addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return nil, cfg.FieldErr(field, fmt.Errorf("%s is already in use by another process", addr))
	case errors.Is(err, syscall.EACCES):
		return nil, cfg.FieldErr(field, fmt.Errorf("%s: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)", addr))
	case err != nil:
		return nil, cfg.FieldErr(field, err)
	}
	return ln, nil
}

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", metrics.Handler(s.registry))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if !s.ready.Load() {
			http.Error(w, "not ready: starting or stopping", http.StatusServiceUnavailable)
			return
		}
		if err := s.spool.Room(0); err != nil {
			// Broken, or below spool.min_free_space: new mail gets 452
			// 4.3.1, so a load balancer should send it elsewhere.
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	if s.cfg.Admin.Enabled {
		// The page holds no data (the Host check only); its data comes
		// from /api/v1/status, behind the token like the rest of the API.
		mux.Handle("GET /status", admin.Guard("", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			w.Header().Set("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'")
			w.Write(statusPage)
		})))
		mux.Handle("GET /api/v1/status", admin.Guard(s.adminToken, http.HandlerFunc(s.statusJSON)))
		if s.suppress != nil {
			// Operators: any tenant's list (?tenant=, "default" for SMTP
			// mail; every tenant when listing without one).
			mux.Handle("/api/v1/suppressions", admin.Guard(s.adminToken, s.suppress.handler(func(r *http.Request) (string, error) {
				return r.URL.Query().Get("tenant"), nil
			}, "operator")))
		}
		mux.Handle("/api/", admin.Handler(adminStore{Spool: s.spool, sched: s.sched, log: s.log.Named("admin"), events: s.events, tenants: s.tenants, reload: s.Reload}, s.adminToken))
	}
	if s.cfg.Debug.Pprof {
		// Profiles show memory contents: the same guard as the admin API.
		guard := func(h http.HandlerFunc) http.Handler { return admin.Guard(s.adminToken, h) }
		mux.Handle("/debug/pprof/", guard(pprof.Index))
		mux.Handle("/debug/pprof/profile", guard(pprof.Profile))
		mux.Handle("/debug/pprof/symbol", guard(pprof.Symbol))
		mux.Handle("/debug/pprof/trace", guard(pprof.Trace))
	}
	return mux
}

// Addr returns the bound address of a listener ("smtp", "submission",
// "http"), or "" if it is disabled.
func (s *Server) Addr(name string) string {
	if name == "http" && s.httpLn != nil {
		return s.httpLn.Addr().String()
	}
	if name == "api" && s.apiLn != nil {
		return s.apiLn.Addr().String()
	}
	for _, l := range s.smtp {
		if l.name == name {
			return l.ln.Addr().String()
		}
	}
	for _, l := range s.pop3 {
		if l.name == name {
			return l.ln.Addr().String()
		}
	}
	return ""
}

// Spool returns the server's spool.
func (s *Server) Spool() *spool.Spool { return s.spool }

// Run serves until ctx is cancelled, then stops gracefully within
// smtp.shutdown_timeout. It returns the first listener error, if any.
func (s *Server) Run(ctx context.Context) error {
	errc := make(chan error, len(s.smtp)+len(s.pop3)+2)
	var wg sync.WaitGroup
	for _, l := range s.pop3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := l.srv.Serve(l.ln); err != nil {
				errc <- fmt.Errorf("listen.%s: %w", l.name, err)
			}
		}()
	}
	for _, l := range s.smtp {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := l.srv.Serve(l.ln); err != nil {
				errc <- fmt.Errorf("listen.%s: %w", l.name, err)
			}
		}()
	}
	if s.http != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.http.Serve(s.httpLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("listen.http: %w", err)
			}
		}()
	}
	if s.api != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.api.Serve(s.apiLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("listen.api: %w", err)
			}
		}()
	}
	schedCtx, stopSched := context.WithCancel(context.Background())
	schedDone := make(chan struct{})
	if s.cfg.Delivery.Enabled {
		go func() { defer close(schedDone); s.sched.Run(schedCtx) }()
	} else {
		close(schedDone)
		s.log.Warn("delivery.enabled is false: messages are accepted and queued, not delivered")
	}
	hooksCtx, stopHooks := context.WithCancel(context.Background())
	hooksDone := make(chan struct{})
	if s.hooks != nil {
		go func() { defer close(hooksDone); s.hooks.Run(hooksCtx) }()
	} else {
		close(hooksDone)
	}
	defer stopHooks()
	watchCtx, stopWatch := context.WithCancel(context.Background())
	var watchers sync.WaitGroup
	watchers.Add(2)
	go func() { defer watchers.Done(); s.users.watch(watchCtx, 2*time.Second) }()
	go func() { defer watchers.Done(); s.queueStats.run(watchCtx, 30*time.Second) }()
	if s.returns != nil {
		watchers.Add(1)
		go func() {
			defer watchers.Done()
			every(watchCtx, time.Hour, func() { s.returns.expire(s.cfg.Bounces.Keep.D()) })
		}()
	}
	defer stopWatch()
	s.ready.Store(true)
	fields := []zap.Field{zap.String("data_dir", s.cfg.DataDir), zap.Int64("queued", s.spool.Count())}
	for _, name := range []string{"smtp", "submission", "pop3", "pop3s", "http", "api"} {
		if a := s.Addr(name); a != "" {
			fields = append(fields, zap.String(name, a))
		}
	}
	s.log.Info("mta started", fields...)
	_ = s.log.Sync() // whoever waits for the start sees it now, buffered or not

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
		s.log.Error("listener failed, stopping", zap.Error(runErr))
	}
	s.ready.Store(false)
	s.log.Info("stopping: no new connections, finishing transactions in flight")
	_ = s.log.Sync()
	// One deadline for the whole stop: the SMTP drain, the delivery grace
	// and the goodbyes to cached connections run together.
	deadline := time.Now().Add(s.cfg.SMTP.ShutdownTimeout.D())
	sctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	stopSched()
	var swg sync.WaitGroup
	for _, l := range s.smtp {
		swg.Add(1)
		go func() {
			defer swg.Done()
			if err := l.srv.Shutdown(sctx); err != nil {
				s.log.Warn("shutdown timeout: closed sessions still open", zap.String("listener", l.name), zap.Error(err))
			}
		}()
	}
	for _, l := range s.pop3 {
		swg.Add(1)
		go func() { defer swg.Done(); l.srv.Shutdown(deadline) }()
	}
	if s.api != nil {
		// Injections in flight are stored and answered before the spool
		// closes.
		swg.Add(1)
		go func() { defer swg.Done(); _ = s.api.Shutdown(sctx) }()
	}
	swg.Wait()
	// Deliveries in flight finish (within the same deadline) before the
	// spool closes.
	<-schedDone
	if s.http != nil {
		// Admin requests in flight (a flush) finish before the spool
		// closes, within the deadline (at least a moment past it).
		hdeadline := deadline
		if soon := time.Now().Add(time.Second); hdeadline.Before(soon) {
			hdeadline = soon
		}
		hctx, hcancel := context.WithDeadline(context.Background(), hdeadline)
		_ = s.http.Shutdown(hctx)
		hcancel()
	}
	wg.Wait()
	// The events of the last deliveries are on disk for the next run
	// before the spool closes.
	stopHooks()
	<-hooksDone
	stopWatch()
	watchers.Wait() // the background readers are done before the spool closes
	if err := s.spool.Close(); err != nil {
		s.log.Error("closing the spool", zap.Error(err))
		runErr = errors.Join(runErr, err)
	}
	s.events.Close()
	s.log.Info("mta stopped")
	return runErr
}

// closeAll releases what New opened when New fails.
func (s *Server) closeAll() {
	for _, l := range s.smtp {
		l.ln.Close()
	}
	if s.httpLn != nil {
		s.httpLn.Close()
	}
	if s.apiLn != nil {
		s.apiLn.Close()
	}
	if s.spool != nil {
		s.spool.Close()
	}
}

// minSecretLength is the shortest token or secret a file may hold: one a
// client could not guess.
const minSecretLength = 16

// ReadAdminToken reads the admin token as the server does from
// admin.token_file, for the CLI.
func ReadAdminToken(path string) (string, error) { return readSecret(path, "token") }

// readSecret reads the first line of file, a token or secret (what), and
// refuses one too short to be unguessable.
func readSecret(file, what string) (string, error) {
	v, err := readFirstLine(file)
	if err != nil {
		return "", err
	}
	if len(v) < minSecretLength {
		return "", fmt.Errorf("%s: the %s is %d characters, want at least %d (e.g. openssl rand -hex 32)", file, what, len(v), minSecretLength)
	}
	return v, nil
}

// readFirstLine returns the first line of a file, without its line break.
func readFirstLine(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	first, _, _ := strings.Cut(string(b), "\n")
	return strings.TrimRight(first, "\r"), nil
}

// accountReception writes a reception to the accounting log.
func (s *Server) accountReception(id string, env *mta.Envelope, size int, tlsVersion string) {
	s.activity.reception()
	if !s.events.on() {
		return
	}
	s.events.Write(&accounting.Event{Event: accounting.Reception, ID: id, MessageID: env.MessageID, Sender: env.From,
		Recipients: len(env.Recipients), Size: int64(size), ClientIP: env.ClientIP, HELO: env.HELO, AuthUser: env.AuthUser, TLS: tlsVersion,
		Tenant: s.tenants.of(env.AuthUser), Metadata: env.Metadata})
}

// outcomeEvents names the accounting event of each delivery outcome.
var outcomeEvents = map[string]string{"delivered": accounting.Delivery, "deferred": accounting.TransientFailure,
	"failed": accounting.PermanentFailure, "expired": accounting.Expiry}

// accountOutcome writes a recipient's delivery outcome to the accounting log.
func (s *Server) accountOutcome(e scheduler.OutcomeEvent) {
	s.activity.outcome(e)
	s.suppress.outcome(e)
	if !s.events.on() {
		return
	}
	ev := &accounting.Event{Event: outcomeEvents[e.Outcome], Recipient: e.Recipient, Destination: e.Destination,
		MX: e.MX, IP: e.IP, TLS: e.TLS, Attempt: e.Attempt, QueuedFor: e.QueuedFor, Reply: e.Reason}
	if m := e.Message; m != nil {
		ev.ID, ev.MessageID, ev.Sender, ev.Size = m.ID, m.MessageID, m.From, m.Size
		ev.Tenant, ev.Metadata = s.tenants.of(m.AuthUser), m.Metadata
	} else {
		ev.Tenant = defaultTenant
	}
	if r := e.Reply; r != nil {
		ev.Code, ev.Enhanced, ev.Reply = r.Code, r.Enhanced.String(), r.Text
	}
	s.events.Write(ev)
}

// acceptor is how the SMTP listeners and the injection API store mail.
func (s *Server) acceptor() acceptor {
	return acceptor{sp: s.spool, sched: s.sched, dkim: s.signing, returns: s.returns, tenants: s.tenants}
}
