# Eighth device call (2026-12-03, fourth session): the cuDNN backend after run 7, with its mixing in one pass
# (every part first, then the weights from the parts' LSEs; run 7 mixed into a float32 running output) and the
# r = 1 branch's outputs and gradients taken as the buffers the other branches add into (run 7 copied them);
# where its time goes at 1M; the training step with rope positions (xPos cannot span 128K in one call).
export PYTHONUNBUFFERED=1
mkdir -p /tmp/tf524 && tar xzf experiments/host_overhead/carry/transformers-5.24.tar.gz -C /tmp/tf524
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.backends.cudnn.version())" | tee -a $OUT/gpu.txt
echo "== (a) tests (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 100 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_cudnn.py tests/test_stability.py -k "cudnn" 2>&1 | tail -30 > $OUT/pytest_cudnn.log
tail -12 $OUT/pytest_cudnn.log
echo "== (b) benchmark (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 150 python3 scripts/benchmark.py --n 32K,128K,1M --methods triton,cudnn,floor-fa2,floor-cudnn \
  --json $OUT/kernels.json --markdown $OUT/kernels.md 2>&1 | grep -v -i warn | tail -4
cat $OUT/kernels.md
echo "== (c) where the time goes at 1M (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 60 python3 experiments/cudnn/where_time_goes.py --n 1M --json $OUT/cudnn_profile.json 2>&1 | grep -v -i warn | tail -36
echo "== (d) training step, rope (t=$SECONDS s)"
PYTHONPATH=/tmp/tf524:$PWD timeout $((470 - SECONDS)) python3 scripts/benchmark_training.py --n 32K,128K,1M --attn triton --steps 2 \
  --json $OUT/training.json --markdown $OUT/training.md 2>&1 | grep -v -i warn | tail -8
cat $OUT/training.md
echo "done (t=$SECONDS s)"
