#!/usr/bin/env bash
# Nsight Compute profiles of the Mamba-1 scan kernels (one launch each, after a warm-up launch): the details page
# (throughputs, warp stall reasons, occupancy, source counters) as text and the per-SASS-instruction counters as
# CSV, under $OUT/profile/. Usage on the device: bash scripts/gpu_profile.sh [fwd] [fwd_saving] [bwd] (all by default)
set -u
OUT=${OUT:-/tmp/mambakit_out}
P="$OUT/profile"
command -v ncu >/dev/null || export PATH="$PATH:$(ls -d /opt/nvidia/nsight-compute/*/ 2>/dev/null | tail -1)"
mkdir -p "$P"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
prof() {  # name kernel-regex mode
  local name=$1 kern=$2 mode=$3
  local t0=$SECONDS
  timeout 240 ncu --clock-control none --set full --import-source yes -k "regex:$kern" --launch-skip 1 \
    --launch-count 1 -f -o "$P/$name" python3 scripts/gpu_profile_mamba1.py --mode "$mode" >"$P/$name.log" 2>&1
  echo "== $name rc=$? $((SECONDS - t0)) s"
  ncu -i "$P/$name.ncu-rep" --page details >"$P/${name}_details.txt" 2>&1
  ncu -i "$P/$name.ncu-rep" --page source --csv --print-source sass >"$P/${name}_sass.csv" 2>&1
  gzip -f "$P/${name}_sass.csv"
  rm -f "$P/$name.ncu-rep"
  grep -E "Duration|Issue Slots Busy|Executed Ipc A|Achieved Occupancy|Registers Per|Memory Throughput|L1/TEX Hit|L2 Hit|DRAM Throughput|Compute \(SM\)|Warp Cycles Per Issued|No Eligible" \
    "$P/${name}_details.txt" | head -20
}
want=" ${*:-fwd fwd_saving bwd} "
[[ $want == *" fwd "* ]] && prof fwd '_scan_time_fwd_kt' fwd
[[ $want == *" fwd_saving "* ]] && prof fwd_saving '_scan_time_fwd_kt' fb
[[ $want == *" bwd "* ]] && prof bwd '_scan_bwd_time_kt' fb
ls -la "$P"
