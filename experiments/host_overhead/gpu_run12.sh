# Twelfth device call (2026-12-04): the Triton kernels launched through the compiled kernels Triton keeps (instead
# of its JIT entry point) and the backward's nine elementwise ops fused into one prologue kernel. Checks them on the
# GPU, then host time per call (probe.py), every timing of a call from 8K to 1M against the FA2 floor
# (benchmark.py), and decoding (benchmark_decode.py; part (d) ran with a replay of one decoding step that was
# withdrawn after it: the caches advance their own counters, so a replayed step is not the same step).
export PYTHONUNBUFFERED=1
mkdir -p /tmp/tf524 && tar xzf experiments/host_overhead/carry/transformers-5.24.tar.gz -C /tmp/tf524
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a $OUT/gpu.txt
python3 - <<'PY' | tee -a $OUT/gpu.txt
import inspect, triton.runtime.jit as jit
print([line.strip() for line in inspect.getsource(jit.JITFunction.run).splitlines() if "kernel.run(" in line or "bound_args.values()" in line])
PY
echo "== (a) tests (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m gpu tests/test_triton.py tests/test_host_work.py tests/test_dilated_attention.py 2>&1 | tail -25 > $OUT/pytest.log
tail -8 $OUT/pytest.log
echo "== (b) host time (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 90 python3 experiments/host_overhead/probe.py --sizes 8192,32768 --cprofile 50 --json $OUT/host.json 2>&1 | grep -v -i warn | tail -70 > $OUT/host.log
head -40 $OUT/host.log
echo "== (c) benchmark (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 170 python3 scripts/benchmark.py --n 8K,16K,32K,128K,1M --methods triton,floor-fa2 \
  --json $OUT/kernels.json --markdown $OUT/kernels.md 2>&1 | grep -v -i warn | tail -4
cat $OUT/kernels.md
echo "== (d) decode (t=$SECONDS s)"
PYTHONPATH=/tmp/tf524:$PWD timeout $((585 - SECONDS)) python3 scripts/benchmark_decode.py --contexts 4K,64K,1M --new-tokens 32 --attn triton \
  --llama-max-context 64K --variants "LongNet, static bounded cache, compiled;Llama, StaticCache, compiled" \
  --json $OUT/decode.json --markdown $OUT/decode.md 2> $OUT/decode.log | tail -12
grep -v -i warn $OUT/decode.log | tail -5 | cut -c1-300
echo "done (t=$SECONDS s)"
