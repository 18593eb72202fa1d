# Fifteenth device call (2026-12-07): decoding, each compiled step's own forward timed by CUDA events beside the
# generate-level ms per token (run 13's decode part, which no device ran on 2026-12-05), the Llama twin in the same run.
export PYTHONUNBUFFERED=1
mkdir -p /tmp/tf524 && tar xzf experiments/host_overhead/carry/transformers-5.24.tar.gz -C /tmp/tf524
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
CONTEXTS=${1:-4K,64K,256K,1M}
echo "== (d) decode (t=$SECONDS s)"
PYTHONPATH=/tmp/tf524:$PWD timeout $((585 - SECONDS)) python3 scripts/benchmark_decode.py --contexts $CONTEXTS --new-tokens 32 --attn triton \
  --llama-max-context 64K --variants "LongNet, static bounded cache, compiled;Llama, StaticCache, compiled" \
  --json $OUT/decode.json --markdown $OUT/decode.md 2> $OUT/decode.log | tail -14
grep -v -i warn $OUT/decode.log | tail -5 | cut -c1-300
echo "done (t=$SECONDS s)"
