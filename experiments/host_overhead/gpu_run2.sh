# Second device call: compiled training (the custom op) and decoding ms/token (bounded, static, static compiled).
# The GPU machines carry transformers 5.17, whose StaticCache LongNet cannot read: decoding runs under the 5.24 the
# tests use, carried as experiments/host_overhead/carry/transformers-5.24.tar.gz (git-ignored; make it with
# tar czf ... -C .venv/lib/python3.11/site-packages transformers transformers-5.24.0.dist-info).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
timeout 200 python3 experiments/compile_op/gpu_check.py --json $OUT/compile.json 2>&1 | grep -v Warning | tail -8 | tee $OUT/compile.log
mkdir -p /tmp/tf524 && tar xzf experiments/host_overhead/carry/transformers-5.24.tar.gz -C /tmp/tf524
PYTHONPATH=/tmp/tf524:$PWD python3 -c "import transformers; from transformers import StaticCache; print('decode under transformers', transformers.__version__)" 2>&1 | tail -2
PYTHONPATH=/tmp/tf524:$PWD timeout 330 python3 experiments/host_overhead/decode.py --json $OUT/decode.json 2>&1 | grep -v -i warn | tail -14 | tee $OUT/decode.log
