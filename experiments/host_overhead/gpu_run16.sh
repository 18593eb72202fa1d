# Sixteenth device call (2026-12-07): the fused decoding kernel (dilated_attention_decode). Its tests on the GPU,
# where an eager step's GPU time goes now (against run 14's 6.67 ms of kernels, 1.48 of them the candidate gathers),
# and ms per token of generate against the Llama twin in the same run. Argument: the contexts (default 4K,64K).
export PYTHONUNBUFFERED=1
mkdir -p /tmp/tf524 && tar xzf experiments/host_overhead/carry/transformers-5.24.tar.gz -C /tmp/tf524
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a $OUT/gpu.txt
CONTEXTS=${1:-4K,64K}
VARIANTS=${2:-"LongNet, static bounded cache, compiled;LongNet, static bounded cache, eager;Llama, StaticCache, compiled"}
if [ "${SKIP_TESTS:-0}" = 0 ]; then
  echo "== (a) tests (t=$SECONDS s)"
  PYTHONPATH=$PWD timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m "" tests/test_ring_decode.py 2>&1 | tail -25 > $OUT/pytest.log
  tail -6 $OUT/pytest.log
  echo "== (b) eager step profile, 4K (t=$SECONDS s)"
  PYTHONPATH=$PWD timeout 120 python3 experiments/host_overhead/decode_step_profile.py 2>&1 | grep -v -i warn > $OUT/step_profile.log
  head -24 $OUT/step_profile.log | cut -c1-200
  echo "== (d) backward host parts, 8K (t=$SECONDS s)"
  PYTHONPATH=$PWD timeout 60 python3 experiments/host_overhead/backward_parts.py --n 8192 2>&1 | grep -v -i warn > $OUT/backward_parts.log
  head -1 $OUT/backward_parts.log; grep -A30 "cProfile of 200 _backward" $OUT/backward_parts.log | cut -c1-160 | head -34
fi
echo "== (c) decode $CONTEXTS (t=$SECONDS s)"
PYTHONPATH=/tmp/tf524:$PWD timeout $((590 - SECONDS)) python3 scripts/benchmark_decode.py --contexts $CONTEXTS --new-tokens 32 --attn triton \
  --llama-max-context 64K --variants "$VARIANTS" \
  --json $OUT/decode.json --markdown $OUT/decode.md 2> $OUT/decode.log | tail -14
grep -v -i warn $OUT/decode.log | tail -5 | cut -c1-300
echo "done (t=$SECONDS s)"
