# Twenty-fourth device call (2026-12-07, fourth session): host_parts.py at 16K and 32K on the code of run 23, with
# two new sections: the same forward+backward after one torch.profiler session (benchmark.py counts kernels with
# the profiler after timing each method; its forward+backward host times were 1.0-1.45 ms where host_parts.py
# measured 0.68), the standalone layer, and the paper's model's training step (each attention call's host time in it).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
for n in 16K 32K; do
  PYTHONPATH=$PWD timeout 150 python3 experiments/host_overhead/host_parts.py --n $n 2>&1 | grep -v -i warn > $OUT/host_parts_$n.log
  grep -A3 "whole call\|paper's model" $OUT/host_parts_$n.log | grep -v "^--" | head -60
done
echo "done (t=$SECONDS s)"
