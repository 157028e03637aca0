# d2s_nerf_ros developer entry points. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= $(CURDIR)/.venv
PYTHON ?= python3.11
export VENV PYTHON

# DDS traffic stays on loopback and on a domain of this run's own (ROS_LOCALHOST_ONLY is
# ignored by the Kilted wheels). A ROS_DOMAIN_ID set by the caller is kept.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
ifndef ROS_DOMAIN_ID
ROS_DOMAIN_ID := $(shell echo $$(( $$$$ % 80 + 20 )))
endif
export ROS_DOMAIN_ID

PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: help setup test test-fast demo tf2-msgs lock

help:
	@echo "make setup     create/refresh $(VENV) with the pinned stack (idempotent; a no-op when up to date)"
	@echo "make test      setup, then the test suite (PYTEST_ARGS='-k dds' to select)"
	@echo "make test-fast setup, then the tests that build no map, run no colcon and no DDS (the edit loop)"
	@echo "make demo      setup, then d2s-nerf demo (DEMO_ARGS='...' passes options)"
	@echo "make tf2-msgs  (re)generate tf2_msgs into the venv with rosidl"
	@echo "make lock      freeze the working venv into requirements/lock.txt"
	@echo "variables: VENV=$(VENV) PYTHON=$(PYTHON) ROS_DOMAIN_ID=$(ROS_DOMAIN_ID)"

setup:
	@bash scripts/setup_env.sh

test: setup
	@echo "[test] ROS_AUTOMATIC_DISCOVERY_RANGE=$$ROS_AUTOMATIC_DISCOVERY_RANGE ROS_DOMAIN_ID=$$ROS_DOMAIN_ID"
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The edit loop: no map builds or model training, no colcon, no node processes over DDS, nothing
# marked slow (pytest.ini's markers). `make test` and CI still run everything.
FAST_MARKERS := not slow and not builds and not dds
test-fast: setup
	@echo "[test-fast] ROS_AUTOMATIC_DISCOVERY_RANGE=$$ROS_AUTOMATIC_DISCOVERY_RANGE ROS_DOMAIN_ID=$$ROS_DOMAIN_ID"
	$(VENV)/bin/python -m pytest -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/d2s-nerf demo $(DEMO_ARGS)

tf2-msgs:
	@bash scripts/build_tf2_msgs.sh "$(VENV)"

# Pins every pip-installed distribution of the working venv (not the project itself, not
# local-path installs): a fresh machine then gets the same versions.
lock:
	@bash scripts/setup_env.sh --lock
