# gatehouse: two commands set everything up.
#   make run    build and start the daemon on the demo site (no hardware needed)
#   make test   install what the tests need, then fmt, clippy and every test
SHELL := /bin/bash
CARGO ?= cargo
VENV := .venv
PY := $(VENV)/bin/python
# Cases per fuzz target (tests/fuzz_*.rs: sync documents, commands, RS-485 wire data and
# LibOSDP replies, BLE adverts/notifications/BTHome) in `make test`; more by hand, e.g.
# `FUZZ_CASES=200000 cargo test --release --test fuzz_rs485 --test fuzz_ble`.
FUZZ_CASES ?= 20000

.PHONY: run test faults deps venv fmt-check clippy cargo-test schema-check bench-access bench-outbox bench-idle clean cargo-deb deb deb-check

run:
	$(CARGO) build --release --bin gatehouse
	./target/release/gatehouse run --config config/demo.toml

## System packages the tests need, installed only when missing (needs root for apt-get):
## mosquitto (cloud-link tests), libdbus/glib headers and dbus-daemon (the mock BlueZ's
## dbus-python and private bus; bluer links libdbus), faketime (libfaketime: the daemon's wall
## clock stepped in tests/faults_clock.rs).
deps:
	@missing=""; \
	command -v python3 >/dev/null || missing="$$missing python3"; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	python3 -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v pkg-config >/dev/null || missing="$$missing pkg-config"; \
	pkg-config --exists dbus-1 2>/dev/null || missing="$$missing libdbus-1-dev"; \
	pkg-config --exists glib-2.0 2>/dev/null || missing="$$missing libglib2.0-dev"; \
	command -v dbus-daemon >/dev/null || missing="$$missing dbus-daemon"; \
	ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || missing="$$missing faketime"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing system packages:$$missing (install them, or run make test as root)"; exit 1; fi; \
	fi

## Python venv for test peers and schema checks; pinned in tests/requirements.txt.
$(VENV)/.installed: tests/requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r tests/requirements.txt
	touch $@

venv: deps $(VENV)/.installed

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

cargo-test: venv
	FUZZ_CASES=$(FUZZ_CASES) $(CARGO) test --all-targets

schema-check: venv
	$(PY) tests/schemas/check_examples.py

test: deps venv fmt-check clippy cargo-test schema-check deb-check
	@echo "make test: all checks passed"

## The Debian package (docs/install.md): cargo-deb, pinned, installed when missing.
CARGO_DEB_VERSION := 3.8.0
cargo-deb:
	@command -v cargo-deb >/dev/null || $(CARGO) install cargo-deb --version $(CARGO_DEB_VERSION) --locked

## target/debian/gatehouse_<version>-1_<arch>.deb: the release binary, the unit, the example
## config as the conffile /etc/gatehouse/gatehouse.toml, maintainer scripts in debian/.
deb: cargo-deb
	$(CARGO) build --release --bin gatehouse
	$(CARGO) deb --no-build --output target/debian/

## The package checked (tests/deb_check.sh): contents, conffiles, maintainer scripts; as root also
## installed with dpkg -i on this machine, check-config run from the installed files, purged.
## For speed it packages the debug binary that cargo-test built (the packaging is what is tested;
## cargo-deb 3.8 warns that it prefers release profiles, which is why its version is pinned).
## `build --all-targets` is a no-op after cargo-test: `build --bin` alone would resolve other
## dependency features than the tests did and rebuild a share of the dependencies.
deb-check: cargo-deb
	$(CARGO) build --all-targets
	$(CARGO) deb --no-build --profile dev --fast --output target/debian-check/gatehouse-check.deb
	tests/deb_check.sh target/debian-check/gatehouse-check.deb

## The fault campaign, long version: every tests/faults_*.rs case (kills at named crash points
## and at random moments with a slowed disk, disk full, clock steps, poison messages) with
## GATEHOUSE_FAULT_SCALE times the rounds of `make test`. Each case prints what it checked.
## Takes tens of minutes.
FAULT_SCALE ?= 20
faults: deps venv
	GATEHOUSE_FAULT_SCALE=$(FAULT_SCALE) $(CARGO) test --release $(patsubst tests/%.rs,--test %,$(wildcard tests/faults_*.rs)) -- --nocapture --test-threads=1

bench-outbox:
	$(CARGO) run --release --bin gatehouse-bench -- outbox

bench-access:
	$(CARGO) run --release --bin gatehouse-bench -- access

## The daemon at rest (docs/operations.md, README): CPU, memory, wakeups, metrics scrape.
bench-idle: deps venv
	$(CARGO) build --release --bins
	./target/release/gatehouse-bench idle

clean:
	$(CARGO) clean
	rm -rf $(VENV) var
