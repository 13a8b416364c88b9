# The two commands: `make run` and `make test`. Both create or reuse .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
SYSTEM_STAMP := $(VENV)/.system-packages
# Real clients and peers the tests drive, from Debian's packages (installed when missing).
SYSTEM_PACKAGES := swaks php-cli php-symfony-mailer libphp-phpmailer msmtp \
  golang-go golang-github-hashicorp-go-plugin-dev golang-goprotobuf-dev protobuf-compiler \
  golang-google-grpc-dev chromium fetchmail spamassassin spamd spamc

.PHONY: run test lint bench bench-ingest bench-packages bench-plugins clean system-packages

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP) $@

# `make run SPAMD=127.0.0.1:7830` also runs spamd there, for the spam score (docs/spam.md):
# the same as spamassassin.addr plus spamassassin.start: true in mailpipe.yaml.
run: $(STAMP)
	$(if $(SPAMD),MAILPIPE_SPAMASSASSIN__ADDR=$(SPAMD) MAILPIPE_SPAMASSASSIN__START=true )$(BIN)/mailpipe serve

system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system packages:$$missing"; \
	    (apt-get install -y -qq $$missing >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null)) \
	     || echo "warning: could not install$$missing; tests that need them will skip (or fail under CI)"; \
	  else echo "note: missing system packages:$$missing (tests that need them skip)"; fi; \
	fi

test: $(TEST_STAMP) system-packages
	$(BIN)/ruff check src tests $(wildcard benchmarks examples)
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The fuzz suite (tests/fuzz/, a few seconds a test inside `make test`) for longer: a minute
# of socket fuzz and the `fuzz-long` hypothesis profile (50 times the examples).
.PHONY: fuzz
fuzz: $(TEST_STAMP)
	MAILPIPE_FUZZ_SECONDS=60 MAILPIPE_FUZZ_PROFILE=fuzz-long \
	  $(BIN)/pytest -q -p no:cacheprovider --timeout=3600 tests/fuzz $(PYTEST_ARGS)

# The fault suite with a longer load (MAILPIPE_FAULT_SECONDS), then its table (docs/reliability.md).
MAILPIPE_FAULT_SECONDS ?= 30
FAULT_REPORT := build/faults.jsonl
.PHONY: faults
faults: $(TEST_STAMP)
	@mkdir -p build && rm -f $(FAULT_REPORT)
	MAILPIPE_FAULT_SECONDS=$(MAILPIPE_FAULT_SECONDS) MAILPIPE_FAULT_REPORT=$(CURDIR)/$(FAULT_REPORT) \
	  $(BIN)/pytest -q -p no:cacheprovider tests/test_faults.py $(PYTEST_ARGS); status=$$?; \
	  $(BIN)/python tests/test_faults.py $(FAULT_REPORT); exit $$status

# The README's screenshots of the web inbox, taken by its browser test.
.PHONY: screenshots
screenshots: $(TEST_STAMP) system-packages
	MAILPIPE_SCREENSHOTS=$(CURDIR)/docs/screenshots $(BIN)/pytest -q -p no:cacheprovider \
	  tests/test_web_ui.py tests/test_checks_ui.py -k screenshots

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests $(wildcard benchmarks examples)
	$(BIN)/ruff format --check src tests $(wildcard benchmarks examples)

# mailpipe next to smtp-sink, aiosmtpd, maildump, MailDev and Haraka under Postfix's smtp-source;
# writes docs/benchmarks.md. BENCH_ARGS=--quick for a few thousand emails a load.
bench: $(TEST_STAMP) bench-packages
	$(BIN)/python benchmarks/peers.py $(BENCH_ARGS)

bench-ingest: $(TEST_STAMP)
	$(BIN)/python benchmarks/ingest.py $(BENCH_ARGS)

# Postfix for smtp-source and smtp-sink, installed as system-packages installs (root, apt-get),
# its mailer type preset to "No configuration"; no Postfix daemon is left running afterwards.
bench-packages:
	@if ! dpkg-query -W -f='$${Status}' postfix 2>/dev/null | grep -q "ok installed"; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system packages: postfix"; \
	    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null)) \
	     || echo "warning: could not install postfix; make bench needs its smtp-source"; \
	    if command -v postfix >/dev/null && postfix status >/dev/null 2>&1; then postfix stop; fi; \
	  else echo "note: missing system package postfix (make bench needs its smtp-source)"; fi; \
	fi

# No plugins vs 5 in-process no-op plugins vs 1 out-of-process (Go) no-op plugin; about 5 minutes.
bench-plugins: $(TEST_STAMP)
	$(BIN)/python benchmarks/plugins.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mailpipe .pytest_cache

# The plugin protocol's Python modules (committed) from proto/, and the example Go plugin
# (GOPATH mode, offline, Debian's go-plugin 1.0.1): build/go-plugin/mailpipe-go-plugin.
.PHONY: protos plugins-go
protos: $(TEST_STAMP)
	PYTHON=$(BIN)/python scripts/gen_protos.sh

plugins-go:
	examples/plugins/go/build.sh $(CURDIR)/build/go-plugin/mailpipe-go-plugin
