package server

import (
	"fmt"
	"os"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/mtaproject/mta/mta/config"
)

// logBufferSize is how many bytes of log lines wait before they are
// written even when log.flush_interval has not passed: at a few thousand
// messages a second (two lines each) that is a write every 50 ms or so.
const logBufferSize = 256 << 10

// NewLogger builds the zap logger the configuration asks for, writing to
// standard error.
func NewLogger(c config.Log) (*zap.Logger, error) {
	l, _, err := NewLoggerLevel(c)
	return l, err
}

// NewLoggerLevel is NewLogger, and also returns the logger's level, which
// Server.SetLogLevel lets a reload change.
func NewLoggerLevel(c config.Log) (*zap.Logger, zap.AtomicLevel, error) {
	return newLogger(c, zapcore.Lock(os.Stderr))
}

// newLogger builds the logger on out. With log.flush_interval set, lines
// are gathered in memory and written together (one write call for many
// lines instead of one each: two per message were 5 % of the CPU of a
// relayed message), at the latest after the interval, when the buffer is
// full, at once for a warning or worse, and when the logger is synced
// (at shutdown).
func newLogger(c config.Log, out zapcore.WriteSyncer) (*zap.Logger, zap.AtomicLevel, error) {
	level, err := zapcore.ParseLevel(c.Level)
	if err != nil {
		return nil, zap.AtomicLevel{}, fmt.Errorf("log.level: %w", err)
	}
	zc := zap.NewProductionConfig()
	if c.Format == "console" {
		zc = zap.NewDevelopmentConfig()
	}
	zc.Level = zap.NewAtomicLevelAt(level)
	zc.EncoderConfig.TimeKey = "ts"
	zc.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	enc := zapcore.NewJSONEncoder(zc.EncoderConfig)
	if c.Format == "console" {
		enc = zapcore.NewConsoleEncoder(zc.EncoderConfig)
	}
	var core zapcore.Core = zapcore.NewCore(enc, out, zc.Level)
	if c.FlushInterval > 0 {
		buffered := &zapcore.BufferedWriteSyncer{WS: out, Size: logBufferSize, FlushInterval: time.Duration(c.FlushInterval)}
		core = urgentCore{zapcore.NewCore(enc, buffered, zc.Level)}
	}
	// Every accepted message is logged: no sampling. No "caller" field:
	// operators read these lines, and finding the caller costs a stack
	// walk per line.
	opts := []zap.Option{zap.ErrorOutput(zapcore.Lock(os.Stderr)), zap.AddStacktrace(zapcore.ErrorLevel)}
	if zc.Development {
		opts = append(opts, zap.Development(), zap.AddStacktrace(zapcore.WarnLevel))
	}
	return zap.New(core, opts...), zc.Level, nil
}

// urgentCore writes out a buffered core's warnings and errors as soon as
// they are logged, and what was buffered before them: an operator
// watching the log sees a problem when it happens, in order.
type urgentCore struct{ zapcore.Core }

// With keeps the wrapping for loggers derived with fields.
func (c urgentCore) With(fields []zapcore.Field) zapcore.Core {
	return urgentCore{c.Core.With(fields)}
}

// Check adds this core, not the wrapped one, so that Write below runs.
func (c urgentCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

// Write writes the entry, and syncs for a warning or worse.
func (c urgentCore) Write(e zapcore.Entry, fields []zapcore.Field) error {
	err := c.Core.Write(e, fields)
	if e.Level >= zapcore.WarnLevel {
		// The flush is what matters; syncing standard error itself fails
		// on a pipe or a terminal, as zap's own cores ignore.
		_ = c.Core.Sync()
	}
	return err
}
