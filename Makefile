# The two commands of the README:
#   make run    run the appliance on embedded defaults (loopback, ./data)
#   make test   install what the tests need, then run the whole suite
GO ?= go

.PHONY: run test deps build bench-accept check

run:
	$(GO) run ./cmd/mta serve

# deps installs the outside tools some tests use (python3 for the smtplib
# interoperability test and the email-package checks, python3-flufl.bounce
# for the bounce tests, swaks with Perl's TLS for the swaks one, fetchmail
# and mpop for the POP3 ones, systemd-analyze and promtool for the deploy
# checks, chromium for the status page, postfix for its smtp-sink as an
# independent next hop, installed with "No configuration" so that no
# Postfix daemon starts, and not at all where another mail server is
# installed, which the package would remove). Without them those tests skip and
# say what to install; with them nothing is skipped. The large tools are
# installed one by one after the others, so that a package that cannot be
# installed on some machine skips its tests instead of stopping the run.
DEPS_APT = python3 python3-flufl.bounce python3-dkim swaks libnet-ssleay-perl libio-socket-ssl-perl fetchmail mpop
DEPS_APT_LARGE = systemd prometheus chromium postfix
SUDO = $$( [ "$$(id -u)" = 0 ] || echo sudo )
deps:
	@if ! command -v python3 >/dev/null 2>&1 || ! /usr/bin/python3 -c "import flufl.bounce" 2>/dev/null || ! command -v swaks >/dev/null 2>&1 || ! command -v fetchmail >/dev/null 2>&1 || ! command -v mpop >/dev/null 2>&1 || ! perl -MNet::SSLeay -e1 2>/dev/null; then \
		echo "installing $(DEPS_APT) (apt)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends $(DEPS_APT); \
	fi
	@updated=; for p in $(DEPS_APT_LARGE); do \
		case $$p in systemd) c=systemd-analyze;; prometheus) c=promtool;; postfix) c=/usr/sbin/smtp-sink;; *) c=$$p;; esac; \
		if ! command -v $$c >/dev/null 2>&1; then \
			if [ $$p = postfix ] && [ -e /usr/sbin/sendmail ]; then \
				echo "not installing postfix: another mail server provides /usr/sbin/sendmail and postfix would replace it; the smtp-sink test will skip"; continue; \
			fi; \
			echo "installing $$p (apt)"; \
			[ -n "$$updated" ] || { $(SUDO) apt-get update -qq; updated=1; }; \
			[ $$p != postfix ] || echo "postfix postfix/main_mailer_type select No configuration" | $(SUDO) debconf-set-selections || continue; \
			$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$p || echo "warning: $$p could not be installed; its tests will skip"; \
		fi; \
	done

test: deps
	@unformatted=$$(gofmt -l .); if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) test -race -count=1 ./...

build:
	mkdir -p bin
	$(GO) build -o bin/mta ./cmd/mta
	$(GO) build -o bin/mtabench ./cmd/mtabench

# Acceptance benchmark (see BENCHMARKS.md).
bench-accept: build
	./bin/mtabench accept --mta bin/mta --sessions 50 --messages 100000 --size 1024 --runs 3 --json bench-accept.json
