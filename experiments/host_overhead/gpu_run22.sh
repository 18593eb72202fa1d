# Twenty-second device call (2026-12-07), right after run 21 on the same machine: decoding, ms per token as the
# median interval between consecutive decoding steps (and, in brackets, the subtraction of two generate times),
# LongNet with the static bounded cache compiled at 4K-1M, the compiled Llama twin at 4K and 64K.
export PYTHONUNBUFFERED=1
mkdir -p /tmp/tf524 && tar xzf experiments/host_overhead/carry/transformers-5.24.tar.gz -C /tmp/tf524
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
PYTHONPATH=/tmp/tf524:$PWD timeout $((580 - SECONDS)) python3 scripts/benchmark_decode.py --contexts 4K,64K,256K,1M --new-tokens 32 --attn triton \
  --llama-max-context 64K --variants "LongNet, static bounded cache, compiled;Llama, StaticCache, compiled" \
  --json $OUT/decode.json --markdown $OUT/decode.md 2> $OUT/decode.log | tail -14
grep -v -i warn $OUT/decode.log | tail -3 | cut -c1-300
echo "done (t=$SECONDS s)"
