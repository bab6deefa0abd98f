# Sourced by scripts/build-k8s.sh and scripts/build-helm.sh: the command line, the messages
# and the one-build-at-a-time lock of a cached build from Go modules.
#   build_args NAME BIN "$@"  --print-bin-dir prints BIN and exits 0; other arguments exit 2
#   log MSG, die MSG          messages on stderr, prefixed with NAME (die exits 1)
#   build_lock OUT WHAT       create OUT and hold OUT/.lock, waiting while another build of WHAT runs

build_args() {
  BUILD_NAME=$1
  local bin=$2
  shift 2
  if [[ "${1:-}" == "--print-bin-dir" ]]; then
    echo "$bin"
    exit 0
  elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--print-bin-dir]" >&2
    exit 2
  fi
}

log() { echo "$BUILD_NAME: $*" >&2; }
die() { log "$*"; exit 1; }

build_lock() {
  mkdir -p "$1"
  exec 9>"$1/.lock"
  if ! flock -n 9; then
    log "another build of $2 is running; waiting for it"
    flock 9
  fi
}
