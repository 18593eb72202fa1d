# Twenty-first device call (2026-12-07): the trimmed host path (the prologue zeroes the grouped backward's float32
# gradients, so no memset launch; one split of them; no device guard where the device is already current; the
# forward's LSE allocated after the branch launches; the pattern's arguments checked without the ABCs; calls
# without a gradient skip the autograd Function; autocast's context only where autocast is on). In order of need,
# each step within what is left of LIMIT seconds: the GPU tests, every timing of a call at 8K-32K and 1M against the
# FA2 floor, the same at 8K-32K with the code before (73da1a1, carried as a tarball), the host timeline of single
# calls.
export PYTHONUNBUFFERED=1
LIMIT=${LIMIT:-570}
left() { local t=$((LIMIT - SECONDS)); [ $t -lt $1 ] && echo $t || echo $1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/gpu.txt
echo "== (a) tests (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $(left 120) python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m gpu tests/test_triton.py tests/test_ring_decode.py 2>&1 | tail -25 > $OUT/pytest.log
tail -3 $OUT/pytest.log
echo "== (b) benchmark after (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $(left 170) python3 scripts/benchmark.py --n 8K,16K,32K,1M --methods triton,floor-fa2 \
  --json $OUT/kernels.json --markdown $OUT/kernels.md 2>&1 | grep -v -i warn | grep "^\[" | cut -c1-190
echo "== (c) benchmark before, 73da1a1 (t=$SECONDS s)"
mkdir -p /tmp/before && tar xzf experiments/host_overhead/carry/before_73da1a1.tar.gz -C /tmp/before
(cd /tmp/before && PYTHONPATH=/tmp/before timeout $(left 110) python3 scripts/benchmark.py --n 8K,16K,32K --methods triton,floor-fa2 \
  --json $OUT/kernels_before.json --markdown $OUT/kernels_before.md 2>&1 | grep -v -i warn | grep "^\[" | cut -c1-150)
echo "== (d) host timeline (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $(left 90) python3 experiments/host_overhead/host_timeline.py --n 16K,32K --variants default,grouped-32K 2>&1 | grep -v -i warn > $OUT/host_timeline.log
grep "^==" $OUT/host_timeline.log
echo "done (t=$SECONDS s)"
