# Sixth device call (2026-12-03, fourth session): run 5 again now that the decode benchmark early-initializes the
# ring (run 5 crashed at 64K after its chunked prefill allocated the ring inside the compiled graph), and with the
# one-token steps gathering each head's candidate keys (sum ceil(w/r) = 11606 of 32769 slots). bf16 at 4K..1M,
# then float32 past the ring (40000 tokens) to tell rounding from a real difference.
export PYTHONUNBUFFERED=1 TORCH_LOGS=recompiles
mkdir -p /tmp/tf524 && tar xzf experiments/host_overhead/carry/transformers-5.24.tar.gz -C /tmp/tf524
export PYTHONPATH=/tmp/tf524:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a $OUT/gpu.txt
echo "== bf16 (t=$SECONDS s)"
timeout 360 python3 scripts/benchmark_decode.py --contexts 4K,64K,256K,1M --new-tokens 32 --attn triton \
  --variants "LongNet, bounded cache, eager;LongNet, static bounded cache, compiled;Llama, StaticCache, compiled" \
  --json $OUT/decode_bf16.json --markdown $OUT/decode_bf16.md 2> $OUT/decode_bf16.log
echo "rc=$? (t=$SECONDS s)"; cat $OUT/decode_bf16.md; grep -v -i warn $OUT/decode_bf16.log | tail -12 | cut -c1-300
grep -c -i "recompil" $OUT/decode_bf16.log; grep -i "cudagraph" $OUT/decode_bf16.log | head -3 | cut -c1-300
echo "== float32 past the ring (t=$SECONDS s)"
timeout $((570 - SECONDS)) python3 scripts/benchmark_decode.py --contexts 40000 --new-tokens 16 --attn triton --dtype float32 \
  --llama-max-context 0 --json $OUT/decode_fp32.json --markdown $OUT/decode_fp32.md 2> $OUT/decode_fp32.log
echo "rc=$? (t=$SECONDS s)"; cat $OUT/decode_fp32.md; grep -v -i warn $OUT/decode_fp32.log | tail -6 | cut -c1-300
