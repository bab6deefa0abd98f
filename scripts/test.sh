#!/usr/bin/env bash
# Install everything (scripts/install.sh --test), lint, and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m unit
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
.venv/bin/ruff check .
.venv/bin/ruff format --check planner worker operator cli tests
bash scripts/build-k8s.sh  # kube-apiserver, kubectl, ... for tests/controlplane (cached)
bash scripts/build-helm.sh  # helm for the chart tests (cached)
exec .venv/bin/python -m pytest "$@"
