package server

import (
	"crypto/tls"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/mtaproject/mta/mta/config"
	"github.com/mtaproject/mta/mta/resolve"
)

// reloader applies a changed configuration file to the running server
// (SIGHUP, `mta reload`): the routes, the log level, the TLS certificate
// and the users file take effect at once (routes for domains routed from
// then on: within the scheduler's 30 s route cache), without dropping any
// connection or message; every other changed setting is named in the log as needing
// a restart. A file that does not load is refused and the running
// configuration stays.
type reloader struct {
	mu         sync.Mutex
	path       string // "" when the server runs on the embedded defaults
	cfg        *config.Config
	level      *zap.AtomicLevel // nil: the level is fixed
	cert       *certHolder      // nil: no TLS
	users      *userDirectory
	resolver   *resolve.Resolver // its static routes are replaced on reload
	adminToken string            // the token in force
	log        *zap.Logger
	reloads    *prometheus.CounterVec
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
		r.log.Error("configuration reload refused; the running configuration stays", zap.Error(err))
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
	routesChanged := !reflect.DeepEqual(r.cfg.Routes, cfg.Routes)
	var routes map[string]resolve.Route
	if routesChanged {
		if routes, err = buildRoutes(cfg); err != nil {
			return err
		}
	}
	applied := []string{}
	if routesChanged && r.resolver != nil {
		// First: the one change that can still fail.
		if err := r.resolver.SetRoutes(routes); err != nil {
			return fmt.Errorf("routes: %w", err)
		}
		r.cfg.Routes = cfg.Routes
		applied = append(applied, "routes")
	}
	if cfg.Log.Level != r.cfg.Log.Level && r.level != nil {
		lvl, _ := zapcore.ParseLevel(cfg.Log.Level)
		r.level.SetLevel(lvl)
		applied = append(applied, "log.level")
	}
	if r.cert != nil && sec.tls != nil && len(sec.tls.Certificates) > 0 {
		r.cert.set(&sec.tls.Certificates[0])
		applied = append(applied, "tls certificate")
	}
	r.users.reloadIfChanged()
	// Whatever else differs from what runs is named, not ignored: every
	// field of the configuration is compared, but for those just applied.
	restart := changedFields(r.cfg, cfg, map[string]bool{"log.level": true, "tls.cert_file": true, "tls.key_file": true, "routes": true})
	if sec.adminToken != r.adminToken {
		restart = append(restart, "admin.token_file (its content)")
	}
	r.log.Info("configuration reloaded", zap.String("file", r.path), zap.Strings("applied", append(applied, "users file")),
		zap.Strings("changed_needing_restart", restart))
	if len(restart) > 0 {
		r.log.Warn("these settings changed in the file but take effect only after a restart", zap.Strings("settings", restart))
	}
	r.cfg.Log.Level = cfg.Log.Level // the rest still describes what runs
	return nil
}

// changedFields lists the dotted names of the fields (down to the second
// level) whose values differ between a and b, except those in skip.
func changedFields(a, b *config.Config, skip map[string]bool) []string {
	var out []string
	va, vb := reflect.ValueOf(a).Elem(), reflect.ValueOf(b).Elem()
	t := va.Type()
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name := strings.Split(f.Tag.Get("yaml"), ",")[0]
		fa, fb := va.Field(i), vb.Field(i)
		if f.Type.Kind() == reflect.Struct {
			for j := 0; j < f.Type.NumField(); j++ {
				sub := f.Type.Field(j)
				full := name + "." + strings.Split(sub.Tag.Get("yaml"), ",")[0]
				if sub.IsExported() && !skip[full] && !reflect.DeepEqual(fa.Field(j).Interface(), fb.Field(j).Interface()) {
					out = append(out, full)
				}
			}
			continue
		}
		if !skip[name] && !reflect.DeepEqual(fa.Interface(), fb.Interface()) {
			out = append(out, name)
		}
	}
	return out
}
