# Seventh device call (2026-12-03, fourth session): the cuDNN backend (new) on the GPU: its test against the
# float64 reference with the real kernels, then its speed against the Triton kernels and both floors (single synced
# call and back to back), where its time goes at 1M, and the model-level training step against Llama.
export PYTHONUNBUFFERED=1
mkdir -p /tmp/tf524 && tar xzf experiments/host_overhead/carry/transformers-5.24.tar.gz -C /tmp/tf524
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.backends.cudnn.version())" | tee -a $OUT/gpu.txt
echo "== (a) tests/test_cudnn.py (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_cudnn.py 2>&1 | tail -40 > $OUT/pytest_cudnn.log
tail -25 $OUT/pytest_cudnn.log
echo "== (b) benchmark (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 240 python3 scripts/benchmark.py --n 16K,32K,128K,1M --methods triton,cudnn,floor-fa2,floor-cudnn \
  --json $OUT/kernels.json --markdown $OUT/kernels.md 2>&1 | grep -v -i warn | tail -40
cat $OUT/kernels.md
echo "== (c) profile at 1M (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 90 python3 experiments/cudnn/profile.py --n 1M --json $OUT/cudnn_profile.json 2>&1 | grep -v -i warn | tail -40
echo "== (d) training step (t=$SECONDS s)"
PYTHONPATH=/tmp/tf524:$PWD timeout $((575 - SECONDS)) python3 scripts/benchmark_training.py --n 32K,128K,1M --attn triton \
  --json $OUT/training.json --markdown $OUT/training.md 2>&1 | grep -v -i warn | tail -20
cat $OUT/training.md
echo "done (t=$SECONDS s)"
