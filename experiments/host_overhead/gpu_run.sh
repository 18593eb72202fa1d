# One device call (issue 14 step 1 and the issue-11 delta fix): benchmark.py --check (every case, dropout, logits
# 1e1..1e9, fp16/bf16 up to 3e4), the A/B timing of the delta change, the host probe with a cProfile, the GPU tests.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
timeout 100 python3 experiments/host_overhead/probe.py --cprofile 20 --json $OUT/host.json 2>&1 | tee $OUT/host.log | grep -v "^ *$" | head -120
timeout 150 python3 experiments/triton_fma/ab.py --skip-logits --rounds 2 --baseline experiments/triton_fma/baseline/before_delta.py --json $OUT/ab.json 2>&1 | grep -v Warning | tee $OUT/ab.log
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_stability.py 2>&1 | tail -5 | tee $OUT/pytest_stability.log
timeout 240 python3 scripts/benchmark.py --check 2>&1 | tail -16 | tee $OUT/check.log
