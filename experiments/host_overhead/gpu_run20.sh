# Twentieth device call (2026-12-07): run 19's decoding measurement again, now with ms per token also taken as the
# median interval between consecutive decoding steps (robust to prefill noise); first the host timeline of single
# calls (host_timeline.py) on the code as it stands. Tests, timeline, then decoding 4K-1M and the Llama.
export PYTHONUNBUFFERED=1
mkdir -p /tmp/tf524 && tar xzf experiments/host_overhead/carry/transformers-5.24.tar.gz -C /tmp/tf524
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/gpu.txt
echo "== (a) tests (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 100 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m "" tests/test_ring_decode.py 2>&1 | tail -25 > $OUT/pytest.log
tail -3 $OUT/pytest.log
echo "== (b) host timeline (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 150 python3 experiments/host_overhead/host_timeline.py --n 8K,16K,32K --variants default,grouped-32K 2>&1 | grep -v -i warn > $OUT/host_timeline.log
head -c 6000 $OUT/host_timeline.log
echo "== (c) decode (t=$SECONDS s)"
PYTHONPATH=/tmp/tf524:$PWD timeout $((560 - SECONDS)) python3 scripts/benchmark_decode.py --contexts 4K,64K,256K,1M --new-tokens 32 --attn triton \
  --llama-max-context 64K --variants "LongNet, static bounded cache, compiled;Llama, StaticCache, compiled" \
  --json $OUT/decode.json --markdown $OUT/decode.md 2> $OUT/decode.log | tail -14
grep -v -i warn $OUT/decode.log | tail -3 | cut -c1-300
echo "done (t=$SECONDS s)"
