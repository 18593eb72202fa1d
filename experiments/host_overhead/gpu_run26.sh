# Twenty-sixth device call (first of the sixth session of 2026-12-07; needs no carry): (0) the GPU tests (the direct
# launches now pass addresses, 1e7c61d's backward form); (a) tensors or addresses in the launches, and the LSE with
# the row statistics, A/B in one process (launch_addresses.py); (b) what torch's autograd itself costs on the host
# per forward+backward (autograd_floor.py); (c) benchmark.py at 8K-128K (NS=... to choose); (d) the 16K timeline
# (autograd's device thread only: the calling thread's was run 25's). Kept short: four starts failed first.
#     LIMIT=420 bash experiments/host_overhead/gpu_run26.sh
export PYTHONUNBUFFERED=1
LIMIT=${LIMIT:-500}
left() { local t=$((LIMIT - SECONDS)); [ $t -lt $1 ] && echo $t || echo $1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a $OUT/gpu.txt
echo "== (0) GPU tests (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $(left 170) python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m gpu tests/test_triton.py 2>&1 | tail -25 > $OUT/pytest.log
tail -3 $OUT/pytest.log
echo "== (a) tensors or addresses in the launches (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $(left 100) python3 experiments/host_overhead/launch_addresses.py --n 16K,32K 2>&1 | grep -v -i warn | tee $OUT/launch_addresses.log
echo "== (b) autograd's own host cost (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $(left 80) python3 experiments/host_overhead/autograd_floor.py --n 16K,32K 2>&1 | grep -v -i warn | tee $OUT/autograd_floor.log
echo "== (c) benchmark (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $(left 150) python3 scripts/benchmark.py --n ${NS:-8K,16K,32K,128K} --methods triton,floor-fa2 \
  --json $OUT/kernels.json --markdown $OUT/kernels.md 2>&1 | grep -v -i warn | grep "^\[" | cut -c1-190
echo "== (d) host timeline (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $(left 50) python3 experiments/host_overhead/host_timeline.py --n 16K 2>&1 | grep -v -i warn > $OUT/host_timeline.log
cat $OUT/host_timeline.log
echo "done (t=$SECONDS s)"
