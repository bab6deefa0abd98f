#!/usr/bin/env bash
# Download the wheels `chaos run` needs besides torch into gpu-wheels/, for a GPU machine
# that has Python and torch but no package registry; scripts/gpu-check.sh installs them
# there. Usage: bash scripts/gpu-wheels.sh [PYTHON_VERSION (default 3.12)]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
rm -rf gpu-wheels
.venv/bin/pip download -q --only-binary=:all: --implementation cp --python-version "$version" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 -d gpu-wheels \
  "pydantic>=2.6,<3" "prometheus-client>=0.20,<1" "rich>=13,<16" "pyyaml>=6,<7" \
  "pulp>=2.8,<4" "matplotlib>=3.7,<4" "numpy>=1.26,<3" "cryptography>=42,<51" "safetensors>=0.4,<1"
du -sh gpu-wheels
