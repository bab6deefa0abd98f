#!/usr/bin/env bash
# Install everything Chaos needs into ./.venv: Debian packages when missing, then the
# Python package with its pinned dependency ranges. Idempotent; fails loudly.
#   scripts/install.sh          runtime dependencies
#   scripts/install.sh --test   runtime and test dependencies (ruff, pytest, hypothesis, ...)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

die() { echo "install: $*" >&2; exit 1; }

# Debian packages the project uses (one per line in scripts/apt-packages.txt).
missing=()
while read -r pkg; do
  [[ -z "$pkg" || "$pkg" == \#* ]] && continue
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done < scripts/apt-packages.txt
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || die "need Debian packages ${missing[*]} but apt-get is missing"
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  echo "install: apt-get install ${missing[*]}" >&2
  $sudo apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || die "apt-get install ${missing[*]} failed"
fi

# A Python >= 3.11 for the virtualenv.
py=""
for cand in python3.12 python3.11 python3; do
  if command -v "$cand" >/dev/null && "$cand" 2>/dev/null -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    py=$cand; break
  fi
done
[[ -n "$py" ]] || die "Python >= 3.11 not found"

if [[ ! -x .venv/bin/python ]]; then
  "$py" -m venv .venv || die "could not create .venv (apt-get install python3-venv?)"
fi

# Reinstall only when the dependency declaration changed (pip caches wheels outside the repo).
stamp=".venv/.chaos-installed${extras:+-test}"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null || die "pip upgrade failed"
  .venv/bin/python -m pip install -q -e ".${extras}" || die "pip install -e .${extras} failed"
  echo "$want" > "$stamp"
fi
.venv/bin/chaos --version >/dev/null || die "the chaos command does not start"
