# Nineteenth device call (2026-12-07): the decoding kernel's pattern as compile-time constants (no device table: run
# 18's table, first built inside a CUDA graph's warm-up, belonged to its pool and failed the 4K row), steps timed
# apart from prefill chunks, medians of 3 generate calls. Tests, the compiled step, ms per token 4K-1M and the Llama.
export PYTHONUNBUFFERED=1
mkdir -p /tmp/tf524 && tar xzf experiments/host_overhead/carry/transformers-5.24.tar.gz -C /tmp/tf524
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
echo "== (a) tests (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 100 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m "" tests/test_ring_decode.py 2>&1 | tail -25 > $OUT/pytest.log
tail -3 $OUT/pytest.log
echo "== (b) compiled step (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 100 python3 experiments/host_overhead/compiled_step_profile.py 2>&1 | grep -v -i warn > $OUT/compiled_step.log
grep -A10 "^== mode" $OUT/compiled_step.log | cut -c1-200
echo "== (c) decode (t=$SECONDS s)"
PYTHONPATH=/tmp/tf524:$PWD timeout $((455 - SECONDS)) python3 scripts/benchmark_decode.py --contexts 4K,64K,256K,1M --new-tokens 32 --attn triton \
  --llama-max-context 64K --variants "LongNet, static bounded cache, compiled;Llama, StaticCache, compiled" \
  --json $OUT/decode.json --markdown $OUT/decode.md 2> $OUT/decode.log | tail -14
grep -v -i warn $OUT/decode.log | tail -3 | cut -c1-300
echo "done (t=$SECONDS s)"
