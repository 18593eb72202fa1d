# Fourteenth device call (2026-12-07), one call for what runs 13 and 14 were to measure, since device time is short:
# the GPU tests (the per-call plans of 8a2389b, every branch in one launch); where a small call's time goes
# (kernel_profile.py: single, back-to-back, graph replay and each kernel, for the default launches, every branch in one
# launch, and the FA2 floor, 8K-64K); host time and its parts; 128K and 1M against the floor; one decoding context.
export PYTHONUNBUFFERED=1
mkdir -p /tmp/tf524 && tar xzf experiments/host_overhead/carry/transformers-5.24.tar.gz -C /tmp/tf524
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a $OUT/gpu.txt
echo "== (a) tests (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 130 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m gpu tests/test_triton.py tests/test_host_work.py 2>&1 | tail -25 > $OUT/pytest.log
tail -6 $OUT/pytest.log
echo "== (e) kernel profile (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 110 python3 experiments/host_overhead/kernel_profile.py --sizes 8192,16384,32768,65536 --json $OUT/profile.json 2>&1 | grep -v -i warn > $OUT/profile.log
grep "^N=" $OUT/profile.log | cut -c1-200
echo "== (b) host time (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 70 python3 experiments/host_overhead/probe.py --sizes 8192,32768 --breakdown --cprofile 20 --json $OUT/host.json 2>&1 | grep -v -i warn > $OUT/host.log
head -10 $OUT/host.log | cut -c1-260
echo "== (c) benchmark (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 90 python3 scripts/benchmark.py --n 128K,1M --methods triton,floor-fa2 --min-time 0.2 \
  --json $OUT/kernels.json --markdown $OUT/kernels.md 2>&1 | grep -v -i warn | grep "^\[" | cut -c1-150
echo "== (d) decode (t=$SECONDS s)"
PYTHONPATH=/tmp/tf524:$PWD timeout $((590 - SECONDS)) python3 scripts/benchmark_decode.py --contexts 4K --new-tokens 32 --attn triton \
  --llama-max-context 64K --variants "LongNet, static bounded cache, compiled;Llama, StaticCache, compiled" \
  --json $OUT/decode.json --markdown $OUT/decode.md 2> $OUT/decode.log | tail -8
echo "done (t=$SECONDS s)"
