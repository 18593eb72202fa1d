# Tenth device call (2026-12-03, fourth session): is run 6's 5.20 ms/token at 4K (against 1.87 at 1M, the same
# ring and step) the step's cost or the process's first generate calls? The compiled ring alone at 4K, 1M, 4K
# again and 64K, in that order. Then where the host time of a forward call goes (probe.py with cProfile).
export PYTHONUNBUFFERED=1
mkdir -p /tmp/tf524 && tar xzf experiments/host_overhead/carry/transformers-5.24.tar.gz -C /tmp/tf524
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
echo "== decode (t=$SECONDS s)"
PYTHONPATH=/tmp/tf524:$PWD timeout 210 python3 scripts/benchmark_decode.py --contexts 4K,1M,4K,64K --new-tokens 32 --attn triton \
  --llama-max-context 0 --variants "LongNet, static bounded cache, compiled" --json $OUT/decode_order.json 2> $OUT/decode_order.log | tail -12
grep "ms_per_token" $OUT/decode_order.log | cut -c1-200
echo "== host time (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 90 python3 experiments/host_overhead/probe.py --sizes 8192,32768 --cprofile 50 --json $OUT/host.json 2>&1 | grep -v -i warn | tail -70 > $OUT/host.log
tail -70 $OUT/host.log
echo "done (t=$SECONDS s)"
