# Sourced by the gpu_run*.sh scripts from run 27 on: the time budget and the card's line. LIMIT (seconds, default
# 500) is the whole script's; `left S` gives a step S seconds, or what is left of LIMIT if that is less.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
LIMIT=${LIMIT:-500}
# At least 1: `timeout 0` would disable the limit, and a negative one is an error.
left() { local t=$((LIMIT - SECONDS)); [ $t -lt 1 ] && t=1; [ $t -lt $1 ] && echo $t || echo $1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $OUT/gpu.txt
