package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/mtaproject/mta/bench"
)

// sink runs the benchmark receiver on its own, printing every message it
// accepts: a loopback next hop for trying the relay by hand.
func sink(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("sink", flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:2526", "listen address (loopback only)")
	quiet := fs.Bool("quiet", false, "print nothing per message")
	if err := fs.Parse(args); err != nil {
		return err
	}
	s, err := bench.StartSink(bench.SinkConfig{Addr: *addr})
	if err != nil {
		return err
	}
	defer s.Close()
	if !*quiet {
		s.OnMessage(func(m bench.SinkMessage) {
			subject := ""
			for _, line := range strings.Split(string(m.Data), "\r\n") {
				if line == "" {
					break
				}
				if len(line) > 8 && strings.EqualFold(line[:8], "subject:") {
					subject = strings.TrimSpace(line[8:])
				}
			}
			fmt.Fprintf(os.Stdout, "received from <%s> for %s: %d bytes, Subject: %q\n", m.From, "<"+strings.Join(m.To, ">, <")+">", len(m.Data), subject)
		})
	}
	fmt.Fprintf(os.Stderr, "sink listening on %s; Ctrl-C stops it\n", s.Addr())
	<-ctx.Done()
	st := s.Stats()
	fmt.Fprintf(os.Stderr, "sink: %d messages, %d connections\n", st.Messages, st.Connections)
	return nil
}
