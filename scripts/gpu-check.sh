#!/usr/bin/env bash
# One-shot check of Chaos on a machine with an NVIDIA GPU (written for one H200, 16 cores,
# no internet). Everything it finds goes under the folder given as its argument (else $OUT,
# else ./gpu-check-out):
#   nvidia-smi.txt, env.json           the driver, Python, torch, CUDA and the device
#   run-*.json (+ .png)                 `chaos run` reports, float64, 4 workers: no churn and
#                                       the default churn on the device, the churn on cpu
#   unit-device.out                     the unit tests that need the device (pinned staging, per-bucket side-stream copies)
#   bench-*.json                        `chaos bench` results: throughput on the device against
#                                       torch DDP, scale-out, then the others as time allows
#   logs/<step>/<run dir>/              worker configs and stderr of every run
#   <step>.out, <step>.err              each step's stdout and stderr
#   summary.json                        per step: command, rc, wall seconds, key figures; the
#                                       float64 churn-vs-no-churn and device-vs-cpu max
#                                       relative loss differences
# Every step runs under `timeout` and the whole script keeps to a budget (GPU_CHECK_BUDGET_S,
# default 300 s), the steps the issue asks for first; a failing step is recorded and the
# next one runs. Exit 0 when every step passed, 1 otherwise, 2 when no Python could run
# Chaos at all.
#   bash scripts/gpu-check.sh [DIR]        on the GPU (device cuda, full sizes)
#   bash scripts/gpu-check.sh --cpu [DIR]  the same steps on cpu with small sizes (also:
#                                          GPU_CHECK_DEVICE=cpu); a dry run for a machine without one
# Python: .venv/bin/python if it runs Chaos, else a python3 that imports torch (with the
# sources on PYTHONPATH), else that python3 with the wheels in gpu-wheels/ (made elsewhere
# by scripts/gpu-wheels.sh, for a machine without registries), else `bash
# scripts/install.sh` (needs package registries).
set -u
CALLER_PWD=$PWD # a relative output folder is the caller's
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd -P)

device=${GPU_CHECK_DEVICE:-cuda}
budget=${GPU_CHECK_BUDGET_S:-300}
while (($#)); do
  case "$1" in
    --cpu) device=cpu ;;
    --budget) budget=${2:?--budget needs seconds}; shift ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) echo "gpu-check: unknown option $1 (--cpu, --budget S, then the output folder)" >&2; exit 2 ;;
    *)
      [[ -z "${out_arg:-}" ]] || { echo "gpu-check: one output folder, not $out_arg and $1" >&2; exit 2; }
      out_arg=$1
      [[ "$out_arg" == /* ]] || out_arg="$CALLER_PWD/$out_arg"
      ;;
  esac
  shift
done
[[ "$device" == cpu || "$device" == cuda ]] || { echo "gpu-check: device must be cpu or cuda" >&2; exit 2; }

OUT=${out_arg:-${OUT:-./gpu-check-out}}
mkdir -p "$OUT/logs" || exit 2
OUT=$(cd "$OUT" && pwd -P)
# Run directories hold the launcher's Unix socket: keep their path short (108-byte limit).
WORK=$(mktemp -d /tmp/gck.XXXXXX) || exit 2
trap 'rm -rf "$WORK"' EXIT
STEPS="$OUT/steps.tsv"
: >"$STEPS"
: >"$OUT/gpu-check.log"
started=$SECONDS
reserve=20 # seconds kept for the summary
export PYTHONPATH="$ROOT/planner:$ROOT/worker:$ROOT/operator:$ROOT/cli${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
[[ -n "${GPU_CHECK_LOG_LEVEL:-}" ]] && export CHAOS_LOG_LEVEL="$GPU_CHECK_LOG_LEVEL"

# Sizes: the GPU check proper, or a quick dry run on a small cpu machine.
if [[ "$device" == cuda ]]; then
  churn_workers=4 churn_steps=120 # the run the issue found hanging with churn on an H200
  t_churn=120 t_churn_cpu=120 t_throughput=150
  b_throughput=(throughput --device cuda --sizes 50M --examples chartransformer --steps 30 --warmup 5)
  b_events=(events --repeats 1)
  b_transport=(transport --sizes "1,16,64" --repeats 3)
  b_pull=(pull --sizes 64 --neighbours "3,4")
  b_scaleout=(scaleout --sizes 64 --neighbours 2 --strategies "chaos,checkpoint" --profiles equal)
  b_planner=(planner --sources "10,100,1000" --repeats 3 --milp-max-sources 10)
else
  churn_workers=4 churn_steps=60
  t_churn=120 t_churn_cpu=120 t_throughput=90
  b_throughput=(throughput --device cpu --sizes 1M --examples '' --steps 20 --warmup 5)
  b_events=(events --repeats 1 --steps 110)
  b_transport=(transport --sizes "1,16" --repeats 2)
  b_pull=(pull --sizes 16 --neighbours 3 --profiles equal)
  b_scaleout=(scaleout --sizes 8 --neighbours 2 --strategies "chaos,checkpoint" --profiles equal)
  b_planner=(planner --sources "10,100" --repeats 2 --milp-max-sources 10)
fi

log() { printf '[gpu-check %4ds] %s\n' $((SECONDS - started)) "$*" | tee -a "$OUT/gpu-check.log" >&2; }

# record NAME KIND RC T0 T1 LIMIT ARTEFACT CMD...: one tab-separated line per step.
record() {
  local name=$1 kind=$2 rc=$3 t0=$4 t1=$5 limit=$6 artefact=$7
  shift 7
  local cmd="" arg
  for arg in "$@"; do # shell-quoted only where it needs to be
    if [[ "$arg" =~ ^[A-Za-z0-9_./,:=@+-]+$ ]]; then cmd+=" $arg"; else cmd+=" $(printf '%q' "$arg")"; fi
  done
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$kind" "$rc" "$t0" "$t1" "$limit" \
    "$artefact" "${cmd# }" >>"$STEPS"
}

# Copy what the runs of a step left in its TMPDIR (worker configs, *.stderr, *.log).
keep_logs() {
  local name=$1 dir f dest
  for dir in "$WORK/$name"/chaos-run-*; do
    [[ -d "$dir" ]] || continue
    dest="$OUT/logs/$name/$(basename "$dir")"
    mkdir -p "$dest"
    for f in "$dir"/*.stderr "$dir"/*.log "$dir"/*.json; do
      [[ -f "$f" ]] || continue
      tail -c 5000000 "$f" >"$dest/$(basename "$f")" # cap a runaway log at its last 5 MB
    done
  done
}

# step NAME KIND LIMIT ARTEFACT CMD...: run CMD under timeout (cut to what the budget has
# left), stdout to $OUT/NAME.out, stderr to $OUT/NAME.err, in a TMPDIR of its own.
step() {
  local name=$1 kind=$2 limit=$3 artefact=$4
  shift 4
  local left=$((budget - (SECONDS - started) - reserve)) t0 t1 rc
  if ((left < 15)); then
    log "$name: skipped, budget spent"
    record "$name" "$kind" skipped 0 0 0 "$artefact" "$@"
    return
  fi
  ((limit > left)) && limit=$left
  mkdir -p "$WORK/$name"
  log "$name (timeout ${limit}s): $*"
  t0=$(date +%s.%N)
  TMPDIR="$WORK/$name" CHAOS_KEEP_RUN_DIR=1 timeout -k 15 "$limit" "$@" \
    >"$OUT/$name.out" 2>"$OUT/$name.err" </dev/null
  rc=$?
  t1=$(date +%s.%N)
  keep_logs "$name"
  rm -rf "${WORK:?}/$name"
  log "$name: rc=$rc"
  ((rc == 0)) || tail -n 5 "$OUT/$name.err" | sed 's/^/    /' | tee -a "$OUT/gpu-check.log" >&2
  record "$name" "$kind" "$rc" "$t0" "$t1" "$limit" "$artefact" "$@"
}

# --- a Python that runs Chaos ---------------------------------------------------------------
probe() { # probe PY: prints whether its torch sees CUDA; fails if it cannot run Chaos
  timeout 120 "$1" -c 'import torch, chaos_cli.main, chaos_worker.process
print(int(torch.cuda.is_available()))' 2>>"$OUT/python-probe.txt"
}
PY="" PY_CUDA=0
pick_python() {
  local cand path cuda
  for cand in "$ROOT/.venv/bin/python" python3.12 python3.11 python3; do
    path=$(command -v "$cand" 2>/dev/null) || continue
    echo "== $path" >>"$OUT/python-probe.txt"
    cuda=$(probe "$path") || continue
    if [[ -z "$PY" ]]; then PY=$path PY_CUDA=$cuda; fi
    # On the GPU, a later candidate whose torch sees CUDA beats a cpu-only first one.
    if [[ "$device" == cuda && "$cuda" == 1 && "$PY_CUDA" != 1 ]]; then PY=$path PY_CUDA=1; fi
  done
  [[ -n "$PY" ]]
}
: >"$OUT/python-probe.txt"
if ! pick_python && compgen -G "gpu-wheels/*.whl" >/dev/null; then
  # a machine without registries: the wheels scripts/gpu-wheels.sh downloaded elsewhere
  log "no Python runs Chaos here; installing gpu-wheels/ into $WORK/site"
  step wheels setup 120 "" python3 -m pip install -q --no-deps --no-index \
    --target "$WORK/site" gpu-wheels/*.whl
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
if [[ -z "$PY" ]] && ! pick_python; then
  log "no Python runs Chaos here; trying scripts/install.sh (needs package registries)"
  step install setup 240 "" bash scripts/install.sh
  pick_python || true
fi
if [[ -z "$PY" ]]; then
  log "FAILED: no Python can import torch and chaos_cli (see python-probe.txt, install.err)"
  SUMMARY_PY=$(command -v python3 || command -v python || true)
else
  SUMMARY_PY=$PY
  log "python: $PY (torch sees CUDA: $PY_CUDA)"
  [[ "$device" == cuda && "$PY_CUDA" != 1 ]] && log "WARNING: no Python here has a torch that sees CUDA; the cuda runs will fail"
fi
chaos=("$PY" -m chaos_cli.main)

# --- 1. the machine -------------------------------------------------------------------------
smi_kind=probe
[[ "$device" == cpu ]] && smi_kind=info # a cpu dry run may have no driver: not a failure
step nvidia-smi "$smi_kind" 30 nvidia-smi.txt nvidia-smi
cp "$OUT/nvidia-smi.out" "$OUT/nvidia-smi.txt"
if [[ -n "$PY" ]]; then
  cat >"$WORK/env.py" <<'PYEOF'
import json, os, platform, sys, time
out = {"python": sys.version.split()[0], "executable": sys.executable,
       "platform": platform.platform(), "cpus": os.cpu_count(), "check_device": sys.argv[2]}
try:
    import torch
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
               cuda_available=torch.cuda.is_available(),
               cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
               torch_threads=torch.get_num_threads())
    if torch.cuda.is_available():
        out["device_count"] = torch.cuda.device_count()
        p = torch.cuda.get_device_properties(0)
        out.update(device_name=p.name, capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / 2**30, 1))
        for dtype in (torch.float32, torch.float64):  # a sanity matmul, timed
            a = torch.randn(2048, 2048, device="cuda", dtype=dtype)
            (a @ a).sum().item()
            torch.cuda.synchronize(); t = time.perf_counter()
            for _ in range(10):
                b = a @ a
            torch.cuda.synchronize()
            out[f"matmul_2048_{str(dtype)[6:]}_tflops"] = round(
                10 * 2 * 2048**3 / (time.perf_counter() - t) / 1e12, 2)
            out[f"matmul_{str(dtype)[6:]}_finite"] = bool(torch.isfinite(b).all())
except Exception as exc:  # recorded, not fatal
    out["error"] = f"{type(exc).__name__}: {exc}"
missing = []
for mod in ("numpy", "pydantic", "rich", "matplotlib", "yaml", "pulp", "sklearn", "aiohttp"):
    try:
        __import__(mod)
    except Exception:
        missing.append(mod)
out["missing_modules"] = missing
json.dump(out, open(sys.argv[1], "w"), indent=2)
print(json.dumps(out))
PYEOF
  step env probe 90 env.json "$PY" "$WORK/env.py" "$OUT/env.json" "$device"
  step bench-list probe 60 bench-list.out "${chaos[@]}" bench --help
  # the device's own unit tests (pinned staging), where this Python has pytest
  if "$PY" -c "import pytest" 2>/dev/null; then
    step unit-device probe 60 unit-device.out "$PY" -m pytest -q -p no:cacheprovider \
      tests/unit/test_staging.py
  fi

  # --- 2. float64 on the device, no churn and the default churn: the losses must agree ---------
  common=(--example chartransformer --quiet --seed 0 --dtype float64 --workers "$churn_workers")
  common+=(--steps "$churn_steps")
  step run-nochurn-f64-device run "$t_churn" run-nochurn-f64-device.json "${chaos[@]}" run \
    --device "$device" --churn none "${common[@]}" --report "$OUT/run-nochurn-f64-device.json"
  step run-churn-f64-device run "$t_churn" run-churn-f64-device.json "${chaos[@]}" run \
    --device "$device" --churn default "${common[@]}" --report "$OUT/run-churn-f64-device.json"

  # --- 3. Chaos against torch DDP on the device, and a scale-out ---------------------------------
  step bench-throughput bench "$t_throughput" bench-throughput.json "${chaos[@]}" bench \
    "${b_throughput[@]}"
  step bench-scaleout bench 90 bench-scaleout.json "${chaos[@]}" bench "${b_scaleout[@]}"

  # --- 4. as the budget allows: the churn on cpu (device vs cpu), the other benches ------------
  step run-churn-f64-cpu run "$t_churn_cpu" run-churn-f64-cpu.json "${chaos[@]}" run \
    --device cpu --churn default "${common[@]}" --report "$OUT/run-churn-f64-cpu.json"
  step bench-events bench 100 bench-events.json "${chaos[@]}" bench "${b_events[@]}"
  step bench-transport bench 60 bench-transport.json "${chaos[@]}" bench "${b_transport[@]}"
  step bench-pull bench 60 bench-pull.json "${chaos[@]}" bench "${b_pull[@]}"
  step bench-planner bench 45 bench-planner.json "${chaos[@]}" bench "${b_planner[@]}"
  for b in throughput events transport pull scaleout planner; do
    cp "$OUT/bench-$b.out" "$OUT/bench-$b.json" 2>/dev/null
  done
fi

# --- 6. summary -------------------------------------------------------------------------------
if [[ -z "$SUMMARY_PY" ]]; then
  printf '{"error": "no python found", "device": "%s"}\n' "$device" >"$OUT/summary.json"
  exit 2
fi
"$SUMMARY_PY" - "$OUT" "$device" "$budget" "$((SECONDS - started))" "$PY" <<'PYEOF'
import json, math, os, sys
out, device, budget, elapsed, py = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except Exception:
        return None

def tail(name, n=5):
    try:
        with open(os.path.join(out, name), errors="replace") as f:
            return f.read().splitlines()[-n:]
    except Exception:
        return []

def curve(report):
    return {int(s): float(v) for s, v in (report or {}).get("loss_curve", [])}

def run_figures(r):
    c = curve(r)
    finite = all(math.isfinite(v) for v in c.values())
    return {
        "steps": r.get("steps"), "steps_completed": len(c), "final_loss": r.get("final_loss"),
        "losses_finite": finite, "samples_per_s": r.get("samples_per_s"),
        "step_time_s": r.get("step_time_s"), "dtype": r.get("dtype"), "workers": r.get("workers"),
        "events": [f'{e.get("type")}:{e.get("worker")}@{e.get("step")}' for e in r.get("events", [])],
        "joins": len(r.get("joins", [])),
        "exit_codes": {p.get("name"): p.get("exit_code") for p in r.get("processes", [])},
    }

def bench_figures(name, b):
    runs = b.get("runs", [])
    if name == "bench-transport":
        return {f'{x["size_mb"]}MiB': {"ratio": x.get("ratio"), "transport_mb_per_s": x.get("transport_mb_per_s"),
                                       "raw_mb_per_s": x.get("raw_mb_per_s")} for x in runs}
    if name == "bench-pull":
        return [{k: x.get(k) for k in ("state_mb", "neighbours", "profile", "pull_s", "limit_s", "ratio")} for x in runs]
    if name == "bench-scaleout":
        return [{k: x.get(k) for k in ("state_mb", "neighbours", "strategy", "scale_out_delay_s",
                                       "incumbent_stall_s", "step_time_s", "startup_s")} for x in runs]
    if name == "bench-throughput":
        return [{"model": m.get("model"), "ddp_step_s": m.get("ddp", {}).get("step_s"),
                 "chaos_step_s": m.get("chaos", {}).get("step_s"), "ratio": m.get("ratio"),
                 "cpu_ratio": m.get("cpu_ratio")} for m in b.get("models", [])]
    if name == "bench-planner":
        return [{k: x.get(k) for k in ("sources", "greedy_ms", "milp_ms", "speedup")} for x in runs]
    if name == "bench-events":
        return {"step_time_s": b.get("step_time_s"), "targets": b.get("targets"),
                "events": {k: {f: v.get(f) for f in ("handling_ms", "incumbent_stall_s", "resume_s") if f in v}
                           for k, v in b.get("events", {}).items()}}
    return None

steps = []
with open(os.path.join(out, "steps.tsv")) as f:
    for line in f:
        name, kind, rc, t0, t1, limit, artefact, cmd = line.rstrip("\n").split("\t", 7)
        entry = {"name": name, "kind": kind, "command": cmd}
        if rc == "skipped":
            entry.update(rc=None, status="skipped (budget spent)")
        else:
            rc = int(rc)
            entry.update(rc=rc, wall_s=round(float(t1) - float(t0), 2), timeout_s=int(limit),
                         status="ok" if rc == 0 else ("timeout" if rc in (124, 137) else "failed"))
            if rc != 0:
                entry["stderr_tail"] = tail(name + ".err")
        data = load(artefact) if artefact.endswith(".json") else None
        if artefact:
            entry["output"] = artefact
        if kind == "run" and data:
            entry["figures"] = run_figures(data)
        elif kind == "bench" and data:
            entry["figures"] = bench_figures(name, data)
        steps.append(entry)

def compare(name_a, name_b, tolerance=None):
    """The loss curves of two run reports, step by step: the largest relative difference."""
    ra, rb = load(name_a), load(name_b)
    result = {"reports": [name_a, name_b]}
    if not (ra and rb):
        return result | {"error": "a report is missing (see its step)"}
    a, b = curve(ra), curve(rb)
    common = sorted(set(a) & set(b))
    rel = [(abs(a[s] - b[s]) / max(abs(b[s]), 1e-30), s) for s in common]
    worst = max(rel) if rel else (None, None)
    result.update(
        common_steps=len(common), steps_only_in_one=sorted(set(a) ^ set(b))[:20],
        max_rel_diff=worst[0], at_step=worst[1],
        max_abs_diff=max((abs(a[s] - b[s]) for s in common), default=None),
        final_losses=[ra.get("final_loss"), rb.get("final_loss")],
        events=[[e.get("type") + "@" + str(e.get("step")) for e in r.get("events", [])] for r in (ra, rb)],
    )
    if tolerance is not None:
        result.update(tolerance=tolerance, within=worst[0] is not None and worst[0] <= tolerance
                      and not result["steps_only_in_one"])
    return result

churn_vs_nochurn = compare("run-churn-f64-device.json", "run-nochurn-f64-device.json", 1e-9)
device_vs_cpu = compare("run-churn-f64-device.json", "run-churn-f64-cpu.json")

benches = []
try:
    with open(os.path.join(out, "bench-list.out")) as f:
        benches = [l.split()[0] for l in f if l.startswith("    ") and not l.startswith("     ")]
except Exception:
    pass
summary = {
    "device": device, "python": py or None, "env": load("env.json"),
    "budget_s": budget, "wall_s": elapsed,
    "ok": all(s["status"] == "ok" for s in steps if s["kind"] != "info")
    and churn_vs_nochurn.get("within", False),
    "failed_steps": [s["name"] for s in steps if s["status"] != "ok" and s["kind"] != "info"],
    "float64_churn_vs_nochurn": churn_vs_nochurn,
    "float64_device_vs_cpu": device_vs_cpu,
    "benches_available": benches,
    "steps": steps,
}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(json.dumps({k: summary[k] for k in ("device", "ok", "failed_steps", "wall_s")}))
print("float64 churn vs no churn: max_rel_diff", churn_vs_nochurn.get("max_rel_diff"))
print("float64 device vs cpu: max_rel_diff", device_vs_cpu.get("max_rel_diff"))
sys.exit(0 if summary["ok"] else 1)
PYEOF
rc=$?
log "done: $OUT/summary.json (rc $rc)"
exit "$rc"
