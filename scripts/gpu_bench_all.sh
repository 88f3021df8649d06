#!/usr/bin/env bash
# Every GPU benchmark of `mambakit bench` in one call on one H100, in under 8 minutes of wall time.
#
#   OUT=/some/dir bash scripts/gpu_bench_all.sh        (run from the repository root)
#
# Parts, most important first, each in its own process under its own time limit (a part that crashes or
# runs over loses only itself; an interrupted part still saves what it measured):
#   1. kernels          every op at ANCHORS.md's shapes, fwd and fwd+bwd, vs the official figures
#   2. generate 130m    Mamba-1, Mamba-2 and Pythia-160m: batch 1/64, prompts 100/2048, decode/prefill/memory
#   3. scaling          130m forward 1K..1M tokens (Mamba, chunked prefill above 128K), Pythia until OOM or 64K
#   4. train            130m, b8x2048 and b2x8192, tokens/s vs the official figures
#   5. generate 2.8b    batch 1, Mamba-1, Mamba-2 and Pythia-2.8b
# What comes back under $OUT (3 files): bench_results.tar.gz (every JSON + PNG), bench_log.txt (all output),
# summary.txt (the tables, also printed last). BENCH_SMALL=1 adds --small to every part: a quick check of this
# script on a CPU machine.
set -u
OUT=${OUT:-./gpu_bench_out}
RES="$OUT/bench_results"
LOG="$OUT/bench_log.txt"
BUDGET=${BENCH_BUDGET_S:-420}  # seconds for all parts; each part also has its own limit below
mkdir -p "$RES"
: >"$LOG"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

{
  echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1
  "${PYTHON:-python3}" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
  "${PYTHON:-python3}" -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1
  "${PYTHON:-python3}" -c "import matplotlib; print('matplotlib', matplotlib.__version__)" 2>&1 | tail -1
} >>"$LOG"

part() {  # part NAME LIMIT_S ARGS...: one `mambakit bench` run, its output appended to the log
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if ((left < 30)); then
    echo "== $name: skipped (time budget spent)" | tee -a "$LOG"
    return
  fi
  ((limit > left)) && limit=$left
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s): mambakit bench $*" | tee -a "$LOG"
  timeout --signal=INT --kill-after=10 "$limit" "${PYTHON:-python3}" -m mambakit bench "$@" --out "$RES" \
    ${BENCH_SMALL:+--small --threads 1} >>"$LOG" 2>&1
  echo "== $name: exit $? after $(($(date +%s) - t0))s" | tee -a "$LOG"
}

part kernels 90 kernels
part generate-130m 105 generate --sizes 130m --batches 1,64 --prompts 100,2048 --name generate_130m
part scaling 85 scaling --size 130m --max-len 1048576 --transformer-max-len 65536 --prefill-chunk 131072
part train 55 train --size 130m --shapes 8x2048,2x8192 --steps 8 --warmup 3
part generate-2.8b 85 generate --sizes 2.8b --batches 1 --prompts 100,2048 --forward-shape 8x2048 \
  --name generate_2.8b

"${PYTHON:-python3}" -m mambakit bench summary "$RES" >"$OUT/summary.txt" 2>&1
tar -czf "$OUT/bench_results.tar.gz" -C "$OUT" bench_results && rm -rf "$RES"
echo "== total $(($(date +%s) - START))s; files: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
cat "$OUT/summary.txt"
