# Thirteenth device call (2026-12-05): every launch of a Triton call planned once per call kind (_ForwardPlan,
# _BackwardPlan: the compiled kernel called directly with the call's own tensors first), the row statistics
# started by one copy kernel, dQ's buffer zeroed by the backward prologue, a kept TMA scratch per stream. Checks them
# on the GPU, then host time per call and its parts (probe.py --breakdown), every timing of a call from 8K to 1M
# against the FA2 floor (benchmark.py), and decoding with each step's own forward timed (benchmark_decode.py).
export PYTHONUNBUFFERED=1
mkdir -p /tmp/tf524 && tar xzf experiments/host_overhead/carry/transformers-5.24.tar.gz -C /tmp/tf524
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a $OUT/gpu.txt
PART=${1:-all}  # kernels: (a)-(c2); decode: (d); all: both
if [ "$PART" != decode ]; then
echo "== (a) tests (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m gpu tests/test_triton.py tests/test_host_work.py tests/test_dilated_attention.py 2>&1 | tail -25 > $OUT/pytest.log
tail -8 $OUT/pytest.log
echo "== (b) host time (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 100 python3 experiments/host_overhead/probe.py --sizes 8192,32768,131072 --breakdown --cprofile 50 --json $OUT/host.json 2>&1 | grep -v -i warn > $OUT/host.log
head -40 $OUT/host.log | cut -c1-400
echo "== (c) benchmark (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 170 python3 scripts/benchmark.py --n 8K,16K,32K,128K,1M --methods triton,floor-fa2 \
  --json $OUT/kernels.json --markdown $OUT/kernels.md 2>&1 | grep -v -i warn | tail -4
cat $OUT/kernels.md
echo "== (c2) small N variants (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 90 python3 experiments/host_overhead/small_n.py --json $OUT/small_n.json 2>&1 | grep -v -i warn | tail -30 | cut -c1-300
fi
if [ "$PART" != kernels ]; then
echo "== (d) decode (t=$SECONDS s)"
PYTHONPATH=/tmp/tf524:$PWD timeout $((585 - SECONDS)) python3 scripts/benchmark_decode.py --contexts 4K,64K,1M --new-tokens 32 --attn triton \
  --llama-max-context 64K --variants "LongNet, static bounded cache, compiled;Llama, StaticCache, compiled" \
  --json $OUT/decode.json --markdown $OUT/decode.md 2> $OUT/decode.log | tail -14
grep -v -i warn $OUT/decode.log | tail -5 | cut -c1-300
fi
echo "done (t=$SECONDS s)"
