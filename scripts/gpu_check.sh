#!/usr/bin/env bash
# The GPU checks a session with a GPU machine runs (sized for < 8 minutes on one H100/H200); paste the output
# into the closing note. Needs nanochat_rs installed (a wheel built elsewhere works: no Rust needed here).
#   1. the CUDA tests  2. d12 training, ~50 steps, bf16 then fp8: tok/s and MFU
#   3. attention backends: SDPA vs FlexAttention vs FA3  4. d12 decode tokens/s and bandwidth use
#   5. CORE scoring, batched vs nanochat's one-item loop
# PEAK_GBS (default 4800, the H200's HBM3e) is the memory bandwidth bench_inference compares against.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PEAK_GBS=${PEAK_GBS:-4800}
STEPS=${STEPS:-50}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export NANOCHAT_BASE_DIR="$WORK/base" PYTHONUNBUFFERED=1
status=0
section() { printf '\n==== %s ====\n' "$*"; }

section "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, nanochat_rs; from nanochat_rs import attention; from nanochat_rs.common import COMPUTE_DTYPE
print('torch', torch.__version__, '| nanochat_rs', nanochat_rs.__version__, '| compute dtype', COMPUTE_DTYPE,
      '| attention', attention.backend_name('cuda', COMPUTE_DTYPE), '| FA3 importable', attention.HAS_FA3)"

section "CUDA tests"
$PY -m pytest -q -rs -k "cuda or fp8 or flex or pinned" tests/ || status=1

for mode in bf16 fp8; do
    section "d12 training, $STEPS steps, $mode"
    flag=""; [ "$mode" = fp8 ] && flag="--fp8"
    # the embedded corpus (and a tokenizer trained on it) keeps this offline; eval once at the end
    $PY -m nanochat_rs.train --depth 12 --num-iterations "$STEPS" --eval-every 0 --eval-tokens 524288 \
        --sample-every 0 --save-every 0 --run-dir "$WORK/run_$mode" $flag >"$WORK/train_$mode.log" 2>&1 || status=1
    grep -E "^(preset|batch|Note|error|Done)|validation|Traceback|Error" "$WORK/train_$mode.log"
    grep -E "^step [0-9]+/" "$WORK/train_$mode.log" | tail -n 10  # steady state, after compilation
done

section "attention backends (d12 shapes, fwd+bwd)"
$PY scripts/bench_attention.py || status=1

section "d12 decode (batch-1 bandwidth utilisation against ${PEAK_GBS} GB/s)"
$PY scripts/bench_inference.py --depth 12 --device-type cuda --peak-gbs "$PEAK_GBS" || status=1

section "CORE scoring: batched vs one item per forward (CORE-shaped synthetic bundle, context 2048)"
timeout 180 $PY scripts/bench_eval.py --device-type cuda --depth 12 --items-per-task 11 | tail -n 3 || status=1

exit $status
