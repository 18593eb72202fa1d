# Second call of run 4: decode_ring.py with the warm-up as long as the timed call (1 + T new tokens; run 4's warm-up
# of 4 tokens gave the static caches another shape, so compiled variants recompiled inside the timed call), recompiles
# logged; then tests/test_triton.py with a longer limit (it ran past 120 s in run 4).
export PYTHONUNBUFFERED=1
set -o pipefail
mkdir -p /tmp/tf524 && tar xzf experiments/host_overhead/carry/transformers-5.24.tar.gz -C /tmp/tf524
echo "== decode_ring.py, warm-up 1+T (t=$SECONDS s)"
TORCH_LOGS=recompiles PYTHONPATH=/tmp/tf524:$PWD timeout 230 python3 experiments/host_overhead/decode_ring.py --contexts 4096,65536 --new-tokens 32 --long-context 0 --json $OUT/decode_ring_warm.json 2>&1 | tee $OUT/decode_ring_warm.log | grep -v -i warn | cut -c1-400
echo "decode rc=$? (t=$SECONDS s)"
LEFT=$((405 - SECONDS))
echo "== tests/test_triton.py under timeout $LEFT (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $LEFT python3 -m pytest -q -p no:cacheprovider -rfE --tb=short --durations=15 tests/test_triton.py 2>&1 | tail -300 > $OUT/pytest_triton_long.log
echo "rc=$?" >> $OUT/pytest_triton_long.log
tail -40 $OUT/pytest_triton_long.log
