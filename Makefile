# drover: the two commands that matter are `make demo` and `make test` (as root, fresh Debian 12).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_STAMP := .cache/apt.installed

# Debian packages: the lab's hypervisors (libvirtd + QEMU in TCG), Redis, the toolchain that
# builds libvirt-python and the dirty guest's kernel. npm (if missing) fetches the Compose schema.
# chromium (headless) loads the Flower dashboard in its test. redis-sentinel runs the lab's
# Sentinel set (`drover lab up --sentinel`); its package enables a system service on
# 127.0.0.1:26379, which the lab leaves alone: its sentinels listen on ports of their own.
# prometheus: promtool checks and unit-tests deploy/prometheus/, and the lab's metrics test
# runs the server itself (lab/prometheus.py); its package enables a system service on :9090,
# which the lab leaves alone too (it listens on a port of its own).
# e2fsprogs: the Linux guest's disk (mkfs.ext4) and e2fsck in its initramfs. Its kernel and
# busybox-static are fetched with `apt-get download` (never installed) by lab/linux_guest.py.
# glusterfs-server/-client: the lab's shared storage (lab/shared_storage.py says why); the
# package starts no daemon of its own.
APT_PACKAGES := libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 \
	qemu-utils iproute2 util-linux binutils libvirt-dev pkg-config gcc redis-server \
	redis-sentinel python3-venv python3-dev chromium prometheus e2fsprogs \
	glusterfs-server glusterfs-client

.PHONY: help deps venv demo test test-unit test-lab test-faults lint check-rules fmt lab-up lab-down bench clean

help:
	@echo "make demo   - bring up the local lab, migrate real VMs, show events, tear down"
	@echo "make test   - install what is needed and run the whole suite (lint + pytest)"
	@echo "make lint   - ruff + mypy + lint-imports (layers);  make bench - benchmarks (print figures)"
	@echo "make check-rules - promtool: deploy/prometheus's config, alert rules and their unit tests"

# Made again when this file changes, so a package added to the list is installed on a
# machine whose stamp is older (the check of what is missing costs a few dpkg calls).
$(APT_STAMP): Makefile
	@if [ "$$(id -u)" != 0 ]; then echo "make deps: run as root (apt-get)"; exit 1; fi
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@mkdir -p .cache && touch $@

deps: $(APT_STAMP)

# The project is installed as a plain path entry (editable_mode=compat), not through
# setuptools' import hook, which every `drover` command paid for at start (about 10 ms).
# Its packages are byte-compiled as pip compiles an installed package's (and the Docker image
# has them): with PYTHONDONTWRITEBYTECODE=1 set, each `drover` would otherwise compile every
# module it imports from source, every run (a fifth of a `drover migrate`'s start-up). A module
# edited since is compiled again in memory until the next `make venv`; nothing goes stale.
PACKAGES := config jobs schedules worker producer lab cli
$(STAMP): requirements.lock pyproject.toml | $(APT_STAMP)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e . --config-settings editable_mode=compat
	$(BIN)/python -m compileall -q $(PACKAGES)
	touch $@

venv: $(STAMP)

demo: venv
	$(BIN)/drover demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The Prometheus config and alert rules (deploy/prometheus/): valid, and their unit tests
# (every alert firing where it must, quiet where it must not) pass.
PROMETHEUS_DIR := deploy/prometheus
check-rules: $(APT_STAMP)
	promtool check rules $(PROMETHEUS_DIR)/alerts.yml
	promtool check config $(PROMETHEUS_DIR)/prometheus.yml
	promtool test rules $(PROMETHEUS_DIR)/alerts_test.yml

# Unit tests first, spread over processes (`-m "not lab"`: tests/conftest.py); then the unit
# tests that boot QEMU or need npm, the lab's lifecycle test and the lab, over LAB_PROCESSES
# processes, each with labs of its own (tests/support/lab_fixtures.py), a module whole in one
# of them; then the fault suite in a process (and lab) of its own, alone on the machine, as
# its timing-sensitive cases need. The two markers together select every test; pytest runs a
# path named twice once.
LAB_PROCESSES ?= 2
test: venv lint check-rules
	$(BIN)/pytest -q --durations=10 -m "not lab" tests/unit
	$(BIN)/pytest -q --durations=10 -m lab -n $(LAB_PROCESSES) --dist loadfile \
		tests/unit tests/lab/test_lab_lifecycle.py tests/lab
	$(BIN)/pytest -q --durations=10 tests/faults

test-unit: venv
	$(BIN)/pytest -q tests/unit

test-lab: venv
	$(BIN)/pytest -q tests/lab

test-faults: venv
	$(BIN)/pytest -q tests/faults

fmt: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: venv
	$(BIN)/python bench/overhead.py

clean:
	-$(BIN)/drover lab down
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache .mypy_cache
