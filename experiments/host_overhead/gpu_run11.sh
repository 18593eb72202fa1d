# Eleventh device call (2026-12-03, fourth session, the last of its device time): scripts/benchmark.py with its
# new columns (host time and CUDA kernels per call beside the single synced and back-to-back times).
export PYTHONUNBUFFERED=1
PYTHONPATH=$PWD timeout 140 python3 scripts/benchmark.py --n 32K,1M --methods triton,cudnn,floor-fa2 \
  --json $OUT/kernels.json --markdown $OUT/kernels.md 2>&1 | grep -v -i warn | tail -3
cat $OUT/kernels.md
