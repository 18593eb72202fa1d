# Fourth device call: the Triton tests on the GPU (transformers 5.17 as installed there), the generation and
# compile tests with transformers 5.24 (carried), then decoding speed of the paper-size model with the caches:
# LongNetBoundedCache, LongNetStaticCache (ring) eager/compiled, transformers' StaticCache at 4K, and a Llama of the
# same size with the HF StaticCache (decode_ring.py). Run 4's call used a warm-up of 4 new tokens (before
# --warmup-tokens, now 1 + T by default): the static caches then changed shape in the timed call. See gpu_run4b.sh.
export PYTHONUNBUFFERED=1
set -o pipefail
mkdir -p /tmp/tf524 && tar xzf experiments/host_overhead/carry/transformers-5.24.tar.gz -C /tmp/tf524
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('installed:', torch.__version__, triton.__version__, transformers.__version__)"
PYTHONPATH=/tmp/tf524:$PWD python3 -c "import transformers; print('carried:', transformers.__version__, transformers.__file__)"

echo "== (a) tests/test_triton.py (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 120 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_triton.py 2>&1 | tail -300 > $OUT/pytest_triton.log
echo "rc=$?" >> $OUT/pytest_triton.log
tail -12 $OUT/pytest_triton.log

echo "== (b) tests/test_generation.py tests/test_compile.py, transformers 5.24 (t=$SECONDS s)"
PYTHONPATH=/tmp/tf524:$PWD timeout 180 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_generation.py tests/test_compile.py -x 2>&1 | tail -30 > $OUT/pytest_cache.log
echo "rc=$?" >> $OUT/pytest_cache.log
tail -12 $OUT/pytest_cache.log

# (c) the rest of the 10 minutes (at least 285 s, 330 or more when the tests are quick)
LEFT=$((585 - SECONDS))
echo "== (c) decode_ring.py under timeout $LEFT (t=$SECONDS s)"
PYTHONPATH=/tmp/tf524:$PWD timeout $LEFT python3 experiments/host_overhead/decode_ring.py --contexts 4096,65536 --new-tokens 32 --json $OUT/decode_ring.json 2>&1 | tee $OUT/decode_ring.log | grep -v -i warn | cut -c1-700
echo "decode rc=$? (t=$SECONDS s)"
