# Run 14c (2026-12-07): the final defaults (every branch's backward in one launch up to 2^18 query rows, the forward
# per branch): GPU tests, then every timing of a call from 8K to 32K against the FA2 floor (benchmark.py).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
PYTHONPATH=$PWD timeout 120 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m gpu tests/test_triton.py -k "gpu_matches or kept_compiled" 2>&1 | tail -3
PYTHONPATH=$PWD timeout 150 python3 scripts/benchmark.py --n 8K,16K,32K --methods triton,floor-fa2 \
  --json $OUT/kernels.json --markdown $OUT/kernels.md 2>&1 | grep -v -i warn | grep "^\[" | cut -c1-150
cat $OUT/kernels.md | grep -A8 "Host ms"
echo "done (t=$SECONDS s)"
