# Mailkube — `make run` starts the local stack, `make test` runs lint and the whole suite.
# Both set up what they need first: uv, the locked Python environment, redis-server,
# redis-sentinel (its system service disabled: the tests start their own sentinels),
# swaks with TLS (Net::SSLeay is only a Recommends of the swaks package), and Postfix's
# smtp-sink, a fake MX host for the worker's tests (Postfix itself unconfigured and stopped),
# OpenDKIM's opendkim-testmsg, an independent DKIM verifier for the signing tests, ss
# (iproute2), which shows a listening socket's backlog, and rspamd, the spam scanner the
# gateway asks (its system service disabled: `make run` and the tests start their own),
# unbound (a validating resolver, service disabled) with ldnsutils' ldns-signzone, for the
# DANE tests' DNSSEC-signed test zone.
# For the operator's tests against a real API server: etcd (its service disabled too), and
# kube-apiserver + kube-controller-manager 1.20.2, built once from Debian's source package by
# tools/build-kube-apiserver.sh (~4 min on 2 cores) and cached in ~/.cache/mailkube.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# pip may put uv in ~/.local/bin; postfix's smtp-source lives in /usr/sbin.
export PATH := $(HOME)/.local/bin:$(PATH):/usr/sbin:/sbin
export DEBIAN_FRONTEND := noninteractive
# Never re-lock behind the developer's back: every `uv run` uses uv.lock as it is.
export UV_FROZEN := 1

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo DEBIAN_FRONTEND=noninteractive)
APT_INSTALL := $(SUDO) apt-get install -y -qq --no-install-recommends -o Dpkg::Use-Pty=0

.PHONY: help setup run test lint format docs bench clean

help:
	@echo "make run | test | lint | format | docs | bench | setup | clean"

setup:
	@pkgs=""; \
	command -v uv >/dev/null || python3 -m pip --version >/dev/null 2>&1 || pkgs="python3-pip"; \
	command -v redis-server >/dev/null && command -v redis-cli >/dev/null || pkgs="$$pkgs redis-server"; \
	command -v redis-sentinel >/dev/null || pkgs="$$pkgs redis-sentinel"; \
	swaks --support 2>&1 | grep '^=== TLS supported' >/dev/null || pkgs="$$pkgs swaks libnet-ssleay-perl"; \
	command -v smtp-sink >/dev/null || pkgs="$$pkgs postfix"; \
	command -v opendkim-testmsg >/dev/null || pkgs="$$pkgs opendkim-tools"; \
	command -v ss >/dev/null || pkgs="$$pkgs iproute2"; \
	[ -x /usr/bin/rspamd ] && [ -f /etc/rspamd/rspamd.conf ] || pkgs="$$pkgs rspamd"; \
	command -v unbound >/dev/null && command -v unbound-anchor >/dev/null || pkgs="$$pkgs unbound"; \
	command -v ldns-signzone >/dev/null || pkgs="$$pkgs ldnsutils"; \
	command -v etcd >/dev/null || pkgs="$$pkgs etcd-server"; \
	command -v dpkg-source >/dev/null || pkgs="$$pkgs dpkg-dev"; \
	command -v rsync >/dev/null || pkgs="$$pkgs rsync"; \
	command -v jq >/dev/null || pkgs="$$pkgs jq"; \
	if [ -n "$$pkgs" ]; then \
		echo "Installing Debian packages:$$pkgs"; \
		echo "postfix postfix/main_mailer_type select No configuration" | $(SUDO) debconf-set-selections; \
		$(SUDO) apt-get update -qq; \
		$(APT_INSTALL) $$pkgs >/dev/null; \
		case "$$pkgs" in *postfix*) \
			$(SUDO) systemctl disable --now postfix >/dev/null 2>&1 || true; \
			$(SUDO) postfix stop >/dev/null 2>&1 || true;; \
		esac; \
		case "$$pkgs" in *unbound*) \
			$(SUDO) systemctl disable --now unbound >/dev/null 2>&1 || true; \
			$(SUDO) /etc/init.d/unbound stop >/dev/null 2>&1 || true; \
			$(SUDO) update-rc.d unbound disable >/dev/null 2>&1 || true;; \
		esac; \
		case "$$pkgs" in *redis-sentinel*) \
			$(SUDO) systemctl disable --now redis-sentinel >/dev/null 2>&1 || true; \
			$(SUDO) /etc/init.d/redis-sentinel stop >/dev/null 2>&1 || true; \
			$(SUDO) update-rc.d redis-sentinel disable >/dev/null 2>&1 || true;; \
		esac; \
		case "$$pkgs" in *rspamd*) \
			$(SUDO) systemctl disable --now rspamd >/dev/null 2>&1 || true; \
			$(SUDO) /etc/init.d/rspamd stop >/dev/null 2>&1 || true; \
			$(SUDO) update-rc.d rspamd disable >/dev/null 2>&1 || true;; \
		esac; \
		case "$$pkgs" in *etcd-server*) \
			$(SUDO) systemctl disable --now etcd >/dev/null 2>&1 || true; \
			$(SUDO) /etc/init.d/etcd stop >/dev/null 2>&1 || true; \
			$(SUDO) update-rc.d etcd disable >/dev/null 2>&1 || true;; \
		esac; \
	fi; \
	if ! command -v uv >/dev/null; then \
		echo "Installing uv with pip"; \
		python3 -m pip install -q uv 2>/dev/null || python3 -m pip install -q --break-system-packages uv; \
		command -v uv >/dev/null || { echo "uv was installed but is not on PATH" >&2; exit 1; }; \
	fi
	@uv sync --frozen --quiet
	@tools/build-kube-apiserver.sh >/dev/null

run: setup
	uv run mailkube dev

test: setup lint
	uv run pytest

lint: setup
	uv run ruff check .
	uv run ruff format --check .
	uv run mypy

format: setup
	uv run ruff check --fix .
	uv run ruff format .

docs: setup
	uv run python -m mailkube_core.settings.reference > docs/configuration.md

bench: setup
	@command -v smtp-source >/dev/null || { \
		echo "Installing postfix (for smtp-source), unconfigured and stopped"; \
		echo "postfix postfix/main_mailer_type select No configuration" | $(SUDO) debconf-set-selections; \
		$(SUDO) apt-get update -qq; \
		$(APT_INSTALL) postfix >/dev/null; \
		$(SUDO) systemctl disable --now postfix >/dev/null 2>&1 || true; \
		$(SUDO) postfix stop >/dev/null 2>&1 || true; \
	}
	uv run python bench/queue_bench.py
	uv run python bench/worker_bench.py
	uv run python bench/e2e_bench.py

clean:
	rm -rf .run

.PHONY: crds
# crds/ from the operator's models, and the chart's copy of them (a test checks they are equal)
crds: setup
	uv run python -m mailkube_operator.crdgen
	rm -f charts/mailkube/files/crds/*.yaml
	cp crds/*.yaml charts/mailkube/files/crds/

# Container images, one per component, built from the repository root with the committed
# uv.lock: `make images`, or e.g. `make images IMAGE_REGISTRY=registry.example.net/mail`.
# The tag defaults to the chart's appVersion, the tag the chart's images default to.
IMAGE_REGISTRY ?= ghcr.io/mailkube
IMAGE_TAG ?= $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$$/\1/p' charts/mailkube/Chart.yaml)

.PHONY: images
images:
	docker build -f smtp-gateway/Dockerfile -t $(IMAGE_REGISTRY)/mailkube-gateway:$(IMAGE_TAG) .
	docker build -f delivery-worker/Dockerfile -t $(IMAGE_REGISTRY)/mailkube-worker:$(IMAGE_TAG) .
	docker build -f operator/Dockerfile -t $(IMAGE_REGISTRY)/mailkube-operator:$(IMAGE_TAG) .
