package server

import (
	"crypto/tls"
	"errors"
	"fmt"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/mtaproject/mta/mta/config"
	"github.com/mtaproject/mta/mta/outbound"
	"github.com/mtaproject/mta/mta/resolve"
	"github.com/mtaproject/mta/mta/smtpd"
	"github.com/mtaproject/mta/scheduler"
)

// reloader applies a changed configuration file to the running server
// (SIGHUP, `mta reload`): the settings in liveFields take effect at once,
// without dropping any connection or message; every other changed setting
// is named in the log as needing a restart. A file that does not load is
// refused and the running configuration stays. docs/operations.md says
// what applies when.
type reloader struct {
	mu         sync.Mutex
	path       string // "" when the server runs on the embedded defaults
	cfg        *config.Config
	level      *zap.AtomicLevel // nil: the level is fixed
	cert       *certHolder      // nil: no TLS
	users      *userDirectory
	transport  *outbound.Transport // its client settings and the resolver's routes are replaced
	sched      *scheduler.Scheduler
	signing    *signing        // its keys are replaced
	listeners  []*smtpd.Server // each takes the new smtpd.Policy
	connLimits *smtpd.ConnLimits
	authFails  *smtpd.AuthFailures
	adminToken string // the token in force
	log        *zap.Logger
	reloads    *prometheus.CounterVec
}

// liveFields are the settings a reload applies (by their dotted names in
// the file); changedFields compares down to the second level, so a group
// such as routes or delivery.timeouts is one name.
var liveFields = map[string]bool{
	"log.level": true, "tls.cert_file": true, "tls.key_file": true, "routes": true,
	"trusted_networks":      true,
	"smtp.max_message_size": true, "smtp.max_recipients": true, "smtp.max_line_length": true, "smtp.max_hops": true,
	"smtp.max_connections": true, "smtp.max_connections_per_ip": true,
	"smtp.command_timeout": true, "smtp.data_timeout": true,
	"smtp.bare_line_endings": true, "smtp.bare_line_endings_trusted": true,
	"smtp.reject_early_data": true, "smtp.add_missing_headers": true,
	"auth.max_failures":         true,
	"auth.client_failure_limit": true, "auth.client_failure_window": true,
	"delivery.helo_name": true, "delivery.tls": true, "delivery.chunking": true, "delivery.timeouts": true,
	"delivery.max_connections": true, "delivery.max_connections_per_destination": true,
	"delivery.initial_connections_per_destination": true, "delivery.max_messages_per_connection": true,
	"delivery.max_mx_addresses": true, "delivery.idle_timeout": true, "delivery.domains": true,
	"delivery.min_backoff": true, "delivery.max_backoff": true, "delivery.max_lifetime": true,
	"dkim.keys": true, "dkim.headers": true,
}

// certHolder serves the current certificate to every TLS listener.
type certHolder struct {
	mu   sync.RWMutex
	cert *tls.Certificate
}

func (h *certHolder) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.cert, nil
}

func (h *certHolder) set(c *tls.Certificate) {
	h.mu.Lock()
	h.cert = c
	h.mu.Unlock()
}

// dynamicTLS returns a configuration like base whose certificate can be
// replaced while listeners use it.
func dynamicTLS(base *tls.Config) (*tls.Config, *certHolder) {
	if base == nil || len(base.Certificates) == 0 {
		return base, nil
	}
	h := &certHolder{cert: &base.Certificates[0]}
	cfg := base.Clone()
	cfg.Certificates = nil
	cfg.GetCertificate = h.get
	return cfg, h
}

// Reload reads the configuration file again and applies what can change
// while the server runs. The returned error says why it was refused.
func (s *Server) Reload() error {
	r := s.reload
	r.mu.Lock()
	defer r.mu.Unlock()
	err := r.apply()
	result := "ok"
	if err != nil {
		result = "failed"
		// A warning, not an error: an operator's mistake, not ours, and
		// without the stack trace zap gives errors.
		r.log.Warn("configuration reload refused; the running configuration stays", zap.Error(err))
	}
	r.reloads.WithLabelValues(result).Inc()
	return err
}

func (r *reloader) apply() error {
	if r.path == "" {
		return errors.New("the server runs on the embedded defaults (no --config file): nothing to reload")
	}
	cfg, err := config.Load(r.path)
	if err != nil {
		return err
	}
	sec, err := loadSecrets(cfg, true)
	if err != nil {
		return err
	}
	// Every check before any change: a refused file changes nothing.
	if cfg.Auth.UsersFile != r.cfg.Auth.UsersFile {
		return fmt.Errorf("auth.users_file: a different users file needs a restart (edit %s in place instead)", r.cfg.Auth.UsersFile)
	}
	if cfg.Hostname != r.cfg.Hostname && !cfg.IsSet("delivery.helo_name") {
		// The EHLO name follows hostname when not set: it changes with it,
		// at the restart, not now while the banner and Received: keep the
		// old name.
		cfg.Delivery.HeloName = r.cfg.Delivery.HeloName
	}
	routes, err := buildRoutes(cfg)
	if err != nil {
		return err
	}
	var applied, restart []string
	for _, f := range config.Diff(r.cfg, cfg) {
		if liveFields[f] {
			applied = append(applied, f)
		} else {
			restart = append(restart, f)
		}
	}
	// What runs from now on: the live settings of the new file, the rest
	// as started.
	next := r.cfg.Merge(cfg, liveFields)
	if r.transport != nil {
		// First: the one change that can still fail. Route password files
		// are read again, so a changed password applies too.
		if err := r.transport.Resolver.SetRoutes(routes, resolve.TLSPolicy(next.Delivery.TLS)); err != nil {
			return fmt.Errorf("routes: %w", err)
		}
		r.transport.SetSettings(clientSettings(next))
	}
	if r.level != nil {
		lvl, _ := zapcore.ParseLevel(next.Log.Level)
		r.level.SetLevel(lvl)
	}
	if r.cert != nil && sec.tls != nil && len(sec.tls.Certificates) > 0 {
		r.cert.set(&sec.tls.Certificates[0])
		applied = append(applied, "tls certificate")
	}
	pol := smtpPolicy(next)
	for _, l := range r.listeners {
		l.SetPolicy(pol)
	}
	if r.connLimits != nil {
		r.connLimits.SetMax(next.SMTP.MaxConnections, next.SMTP.MaxConnectionsPerIP)
	}
	if r.authFails != nil {
		r.authFails.SetLimit(next.Auth.ClientFailureLimit, next.Auth.ClientFailureWindow.D())
	}
	if r.sched != nil {
		r.sched.SetLimits(schedulerLimits(next))
	}
	if r.signing != nil {
		r.signing.signer.Store(sec.dkim) // read again, so that a rotated key file applies
	}
	r.users.reloadIfChanged()
	applied = append(applied, "users file")
	if sec.adminToken != r.adminToken {
		restart = append(restart, "admin.token_file (its content)")
	}
	r.log.Info("configuration reloaded", zap.String("file", r.path), zap.Strings("applied", applied),
		zap.Strings("changed_needing_restart", restart))
	_ = r.log.Sync() // an operator who sent SIGHUP reads the outcome now
	if len(restart) > 0 {
		r.log.Warn("these settings changed in the file but take effect only after a restart", zap.Strings("settings", restart))
	}
	r.cfg = next
	return nil
}

// smtpPolicy is the part of the SMTP listeners' options that cfg sets and
// a reload may change.
func smtpPolicy(cfg *config.Config) smtpd.Policy {
	return smtpd.Policy{
		Trusted:                   cfg.Trusted,
		MaxMessageSize:            int64(cfg.SMTP.MaxMessageSize),
		MaxRecipients:             cfg.SMTP.MaxRecipients,
		MaxLineLength:             cfg.SMTP.MaxLineLength,
		MaxHops:                   cfg.SMTP.MaxHops,
		CommandTimeout:            cfg.SMTP.CommandTimeout.D(),
		DataTimeout:               cfg.SMTP.DataTimeout.D(),
		BareLineEndings:           smtpd.LineEndings(cfg.SMTP.BareLineEndings),
		BareLineEndingsTrusted:    smtpd.LineEndings(cfg.SMTP.BareLineEndingsTrusted),
		RejectEarlyData:           cfg.SMTP.RejectEarlyData,
		AddMissingHeaders:         cfg.SMTP.AddMissingHeaders,
		CleartextAuthFromLoopback: cfg.Auth.CleartextFromLoopback,
		MaxAuthFailures:           cfg.Auth.MaxFailures,
	}
}

// schedulerLimits is the part of the scheduler's options that cfg sets
// and a reload may change.
func schedulerLimits(cfg *config.Config) scheduler.Limits {
	d := cfg.Delivery
	var domains map[string]scheduler.DestinationLimits
	for name, l := range d.Domains {
		if domains == nil {
			domains = map[string]scheduler.DestinationLimits{}
		}
		domains[name] = scheduler.DestinationLimits{MaxConnections: l.MaxConnections, MaxMessagesPerConnection: l.MaxMessagesPerConnection,
			MaxRecipientsPerTransaction: l.MaxRecipientsPerTransaction}
	}
	return scheduler.Limits{
		Domains:                     domains,
		MaxConnections:              d.MaxConnections,
		MaxPerDestination:           d.MaxConnectionsPerDestination,
		InitialPerDestination:       d.InitialConnectionsPerDestination,
		MaxMessagesPerConnection:    d.MaxMessagesPerConnection,
		MaxRecipientsPerTransaction: d.MaxRecipientsPerTransaction,
		IdleTimeout:                 d.IdleTimeout.D(),
		MinBackoff:                  d.MinBackoff.D(),
		MaxBackoff:                  d.MaxBackoff.D(),
		MaxLifetime:                 d.MaxLifetime.D(),
	}
}
