# Twenty-fourth device call (2026-12-07, fourth session). The forward's LSE stored by the last (r = 1) launch where
# every query is real, so no epilogue launch: (a) the GPU tests; (b) benchmark.py at 16K and 32K against the FA2
# floor (kernels per forward 7 -> 6); (c) host_parts.py at 32K with its new sections: the same forward+backward
# after one torch.profiler session (benchmark.py counts kernels with the profiler after timing each method; its
# forward+backward host times were 1.0-1.45 ms where host_parts.py measured 0.68), the standalone layer, and the
# paper's model's training step (each attention call's host time in it).
export PYTHONUNBUFFERED=1
LIMIT=${LIMIT:-400}
left() { local t=$((LIMIT - SECONDS)); [ $t -lt $1 ] && echo $t || echo $1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
echo "== (a) tests (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $(left 150) python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m gpu tests/test_triton.py 2>&1 | tail -25 > $OUT/pytest.log
tail -3 $OUT/pytest.log
echo "== (b) benchmark (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $(left 80) python3 scripts/benchmark.py --n 16K,32K --methods triton,floor-fa2 \
  --json $OUT/kernels.json --markdown $OUT/kernels.md 2>&1 | grep -v -i warn | grep "^\[" | cut -c1-190
echo "== (c) host parts (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $(left 150) python3 experiments/host_overhead/host_parts.py --n 32K 2>&1 | grep -v -i warn > $OUT/host_parts_32K.log
grep -A3 "whole call\|paper's model" $OUT/host_parts_32K.log | grep -v "^--" | head -60
echo "done (t=$SECONDS s)"
