# One device call: the stability test on the real kernels, the A/B of the exponent change (errors at logits
# 1e1..1e9 and timing), and benchmark.py --check. Logs and JSON go to $OUT. HOST=1 adds the host-work probe.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_stability.py 2>&1 | tail -15 | tee $OUT/pytest_stability.log
timeout 300 python3 experiments/triton_fma/ab.py --baseline experiments/triton_fma/baseline/dilated_attention_triton_before.py --json $OUT/ab.json 2>&1 | grep -v Warning | tee $OUT/ab.log
if [ -n "$HOST" ]; then
  timeout 100 python3 experiments/host_overhead/probe.py --json $OUT/host.json 2>&1 | tee $OUT/host.log
fi
timeout 300 python3 scripts/benchmark.py --check 2>&1 | tail -25 | tee $OUT/check.log
