#!/usr/bin/env bash
# Where the warps of one training step wait: Nsight Compute's stall reasons, per kernel and per
# SASS instruction, for the kernels of one bench.py case.
#
#   benchmarks/ncu_stalls.sh OUTDIR MASK SEQLEN [HEAD_DIM] [IMPLS]
#   e.g. benchmarks/ncu_stalls.sh $OUT document 4k 128 ours,torch-compile
#
# kernel_times.py --ncu warms up (compiles, autotunes) unprofiled, then runs one step between
# cudaProfilerStart and Stop; ncu (--profile-from-start off) profiles that step's kernels alone.
# --clock-control none: the lent H100s (Firecracker) read counters only so (device/KINDS.md),
# and the clocks stay what a timed run sees. Writes OUTDIR/MASK-SEQLEN-dHEAD_DIM.ncu-rep and a
# .txt beside it (every section's details, then the SASS of each kernel with its stall samples),
# and prints benchmarks/ncu_summary.py's account of it.
set -u
out=$1; mask=$2; seqlen=$3; hd=${4:-128}; impls=${5:-ours}
tag=$mask-$seqlen-d$hd
export TORCHINDUCTOR_COMPILE_THREADS=1 PYTHONPATH=${PYTHONPATH:-.}
ncu --clock-control none --profile-from-start off \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
    --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section InstructionStats --section SourceCounters \
    -f -o "$out/$tag" \
    python3 benchmarks/kernel_times.py --masks "$mask" --seqlen "$seqlen" --head-dims "$hd" \
        --impls "$impls" --ncu || exit
{
  ncu -i "$out/$tag.ncu-rep" --page details
  echo "==== SASS with stall samples"
  ncu -i "$out/$tag.ncu-rep" --page source --csv --print-source sass
} > "$out/$tag.txt" 2>&1
python3 "$(dirname "$0")/ncu_summary.py" "$out/$tag.txt" --top 12
