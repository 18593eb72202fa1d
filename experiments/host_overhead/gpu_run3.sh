# Third device call: the one-launch forward epilogue (kernels and host time per call, A/B against the kernels
# before it, the Triton tests on the GPU) and decoding with the attention op kept out of CUDA graphs.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
timeout 60 python3 experiments/host_overhead/probe.py --sizes 8192,32768 --json $OUT/host.json 2>&1 | grep '^{' | tee $OUT/host.log
timeout 120 python3 experiments/triton_fma/ab.py --skip-logits --rounds 2 --baseline experiments/triton_fma/baseline/before_epilogue.py --json $OUT/ab.json 2>&1 | grep -v Warning | tee $OUT/ab.log
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_stability.py 2>&1 | tail -3 | tee $OUT/pytest_gpu.log
mkdir -p /tmp/tf524 && tar xzf experiments/host_overhead/carry/transformers-5.24.tar.gz -C /tmp/tf524
PYTHONPATH=/tmp/tf524:$PWD timeout 240 python3 experiments/host_overhead/decode.py --contexts 4096 --new-tokens 32 --json $OUT/decode.json 2>&1 | grep -v -i warn | tail -6 | tee $OUT/decode.log
