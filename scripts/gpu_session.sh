#!/usr/bin/env bash
# One device call, several parts: bash scripts/gpu_session.sh PART[:SECONDS] ...
# Parts: env, mamba1, ssd, conv, generate, decode-ops, tp, train, bench, pytest, scan-tests, decode-tests, fwd-time,
# bwd-time, bwd-time-b1, profile. Each part runs under its own time limit, its full log and JSON go under $OUT/<part>/, and the last
# lines of every part are printed at the end
# (the device reply carries only the tail). Everything is also packed into $OUT/all.tar.gz.
set -u
OUT=${OUT:-/tmp/mambakit_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" MAMBAKIT_TEST_DEVICE=cuda
summary=()
run_part() {
  local part=$1 limit=$2; shift 2
  mkdir -p "$OUT/$part"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$part/log.txt" 2>&1
  local rc=$?
  summary+=("== $part (rc=$rc, $((SECONDS - t0)) s) ==")
  echo "== $part rc=$rc $((SECONDS - t0))s"
}
for spec in "$@"; do
  part=${spec%%:*}; limit=${spec#*:}; [ "$limit" = "$spec" ] && limit=300
  case $part in
    env) run_part env "$limit" bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; python3 -c "import mambakit, mambakit.ops; print(\"import ok\")"' ;;
    mamba1) run_part mamba1 "$limit" python3 scripts/gpu_check_mamba1.py --out "$OUT/mamba1" --budget $((limit - 50)) ${M1_ARGS:-} ;;
    ssd) run_part ssd "$limit" python3 scripts/gpu_check_ssd.py --out "$OUT/ssd" ${SSD_ARGS:-} ;;
    conv) run_part conv "$limit" python3 scripts/gpu_check_conv_norm.py --out "$OUT/conv" ;;
    generate) run_part generate "$limit" python3 scripts/gpu_check_generate.py --out "$OUT/generate" --budget $((limit - 40)) ${GEN_ARGS:-} ;;
    tp) run_part tp "$limit" python3 -m torch.distributed.run --nproc-per-node 2 scripts/gpu_check_tp.py --out "$OUT/tp" ;;
    train) run_part train "$limit" env STEPS="${STEPS:-800}" bash scripts/train_default_model.sh "$OUT/train/run" ;;
    bench) run_part bench "$limit" bash scripts/gpu_bench_all.sh "$OUT/bench" ;;
    pytest) run_part pytest "$limit" python3 -m pytest -q -rf tests/ops tests/inference/test_cuda_graph.py -p no:cacheprovider ;;
    decode-ops) run_part decode-ops "$limit" python3 scripts/gpu_bench_decode_ops.py --out "$OUT/decode-ops" --budget $((limit - 30)) ${DOPS_ARGS:-} ;;
    decode-tests) run_part decode-tests "$limit" python3 -m pytest -q -rf --tb=short tests/ops/test_decode.py tests/ops/test_state_update.py tests/inference -p no:cacheprovider ;;
    scan-tests) run_part scan-tests "$limit" python3 -m pytest -q -rf --tb=short tests/ops/test_selective_scan.py -p no:cacheprovider ;;
    # Mamba-1 scan config overrides against the defaults in one process (space-separated specs, each KEY=VALUE[,...]);
    # by default the untimed candidates (forward ahead2, backward a_ahead 2)
    fwd-time) run_part fwd-time "$limit" python3 scripts/gpu_time_scan_fwd.py ${FWDT_ARGS:---fb ahead2=True maxnreg=80} ;;
    bwd-time) run_part bwd-time "$limit" python3 scripts/gpu_time_scan_bwd.py ${BWDT_ARGS:-a_ahead=2} ;;
    bwd-time-b1) run_part bwd-time-b1 "$limit" python3 scripts/gpu_time_scan_bwd.py --shape 1,3072,65536 ${BWDT1_ARGS:-ahead=0} ;;
    # Nsight Compute of the scan kernels (PROF_ARGS: any of fwd fwd_saving bwd; all three by default)
    profile) run_part profile "$limit" bash scripts/gpu_profile.sh ${PROF_ARGS:-} ;;
    *) echo "unknown part $part" ;;
  esac
done
echo
echo "################ tails ################"
for spec in "$@"; do
  part=${spec%%:*}
  echo "==== $part ===="
  tail -n 25 "$OUT/$part/log.txt" 2>/dev/null | cut -c1-220
done
printf '%s\n' "${summary[@]}"
# only 8 files come back from a device call, 16 MB each: one archive of logs/JSON/plots, and the trained default
# model (12.8 MB of bf16 weights, which do not compress) in its own tar. Training checkpoints and token files stay.
if [ -d "$OUT/train/run/default" ]; then
  tar cf /tmp/default_model.tar -C "$OUT/train/run" default
fi
(cd "$OUT" && tar czf /tmp/all.tar.gz --exclude=checkpoints --exclude='tokens*' --exclude='*.safetensors' . \
  && find . -mindepth 1 -delete && mv /tmp/all.tar.gz "$OUT/all.tar.gz")
[ -f /tmp/default_model.tar ] && mv /tmp/default_model.tar "$OUT/"
ls -l "$OUT"
