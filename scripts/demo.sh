#!/usr/bin/env bash
# Install everything (scripts/install.sh) and run the main job: the bundled ChaosJob
# manifest, reconciled into local worker processes. Extra arguments go to `chaos run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/chaos run examples/chaosjob.yaml "$@"
