# Run 14b (2026-12-07): run 14's two parts that failed on a script error (kernel_profile.py's dtype, probe.py's
# breakdown launching outside a descriptor allocator).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
echo "== (e) kernel profile (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 150 python3 experiments/host_overhead/kernel_profile.py --sizes 8192,16384,32768,65536 --json $OUT/profile.json 2>&1 | grep -v -i warn > $OUT/profile.log
grep "^N=" $OUT/profile.log | cut -c1-220
tail -3 $OUT/profile.log | cut -c1-300
echo "== (b) host breakdown (t=$SECONDS s)"
PYTHONPATH=$PWD timeout 60 python3 -c "
import sys, json; sys.argv=['p']; sys.path.insert(0, 'experiments/host_overhead')
import probe; [probe.host_breakdown(n) for n in (8192, 32768)]" 2>&1 | grep -v -i warn | tail -4 | cut -c1-900
echo "done (t=$SECONDS s)"
