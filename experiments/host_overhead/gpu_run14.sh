# Fourteenth device call (2026-12-07): run 13's kernel part, which no device ran on 2026-12-05 (the plans of 8a2389b:
# GPU tests, host time and its parts, every timing from 8K to 1M against the FA2 floor), and where a small call's GPU
# time goes (kernel_profile.py: each kernel's duration, and the call replayed from a CUDA graph), against every branch
# in one launch (group_branches, forward and backward; the GPU tests check it against the torch path too).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a $OUT/gpu.txt
echo "== (a) tests (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 170 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m gpu tests/test_triton.py tests/test_host_work.py 2>&1 | tail -25 > $OUT/pytest.log
tail -8 $OUT/pytest.log
echo "== (e) kernel profile (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 100 python3 experiments/host_overhead/kernel_profile.py --sizes 8192,16384,32768,65536 --json $OUT/profile.json 2>&1 | grep -v -i warn > $OUT/profile.log
grep "^N=" $OUT/profile.log
echo "== (b) host time (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 100 python3 experiments/host_overhead/probe.py --sizes 8192,32768,131072 --breakdown --cprofile 50 --json $OUT/host.json 2>&1 | grep -v -i warn > $OUT/host.log
head -30 $OUT/host.log | cut -c1-300
echo "== (c) benchmark (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 180 python3 scripts/benchmark.py --n 8K,16K,32K,128K,1M --methods triton,floor-fa2 \
  --json $OUT/kernels.json --markdown $OUT/kernels.md 2>&1 | grep -v -i warn | tail -3
cat $OUT/kernels.md
echo "done (t=$SECONDS s)"
