export PYTHONUNBUFFERED=1
mkdir -p /tmp/tf524 && tar xzf experiments/host_overhead/carry/transformers-5.24.tar.gz -C /tmp/tf524
PYTHONPATH=/tmp/tf524:$PWD timeout 380 python3 experiments/host_overhead/decode.py --json $OUT/decode.json 2>&1 | grep -v -i warn | tail -14
