# Twenty-first device call (2026-12-07): the trimmed host path (the prologue zeroes the grouped backward's float32
# gradients, so no memset launch; one split of them; no device guard where the device is already current; the
# forward's LSE allocated after the branch launches; the pattern's arguments checked without the ABCs). GPU tests,
# the host timeline of single calls, then every timing of a call from 8K to 1M against the FA2 floor.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/gpu.txt
echo "== (a) tests (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 200 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m gpu tests/test_triton.py tests/test_host_work.py tests/test_ring_decode.py 2>&1 | tail -25 > $OUT/pytest.log
tail -3 $OUT/pytest.log
echo "== (b) host timeline (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 150 python3 experiments/host_overhead/host_timeline.py --n 8K,16K,32K --variants default,grouped-32K 2>&1 | grep -v -i warn > $OUT/host_timeline.log
grep "^==" $OUT/host_timeline.log
echo "== (c) benchmark (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $((570 - SECONDS)) python3 scripts/benchmark.py --n 8K,16K,32K,64K,128K,1M --methods triton,floor-fa2 \
  --json $OUT/kernels.json --markdown $OUT/kernels.md 2>&1 | grep -v -i warn | grep "^\[" | cut -c1-150
grep -A12 "Host ms" $OUT/kernels.md
echo "done (t=$SECONDS s)"
