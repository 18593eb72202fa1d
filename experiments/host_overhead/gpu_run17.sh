# Seventeenth device call (2026-12-07): where the compiled decoding step's GPU time goes (compiled_step_profile.py).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
PYTHONPATH=$PWD timeout 400 python3 experiments/host_overhead/compiled_step_profile.py 2>&1 | grep -v -i warn > $OUT/compiled_step.log
grep -A24 "^== mode" $OUT/compiled_step.log | cut -c1-230
tail -5 $OUT/compiled_step.log | cut -c1-300
echo "done (t=$SECONDS s)"
