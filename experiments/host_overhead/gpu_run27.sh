# Twenty-seventh device call (seventh session of 2026-12-07; needs no carry). Run 26 measured the launches with
# addresses, but its bitwise check compared gradients that the atomic backward makes differ from call to call.
# (a) the check again: the output bitwise, the gradients bitwise in torch's deterministic mode, the default mode's
#     difference next to the code before's own spread;
# (a2) one launch's host cost with tensors or addresses, in bursts;
# (b) where the host time goes at 128K and 1M (run 26: 1.86 ms per 128K forward+backward, the floor 1.78; run 25:
#     0.95 ms per 1M forward);
# (c) benchmark at 1M with this code;
# (d) (added 2026-12-08) whether one launch or allocation costs the host more while the GPU is busy: the floor's own
#     host time grows with N at the same kernel count.
#     LIMIT=260 bash experiments/host_overhead/gpu_run27.sh
source experiments/host_overhead/run_support.sh
echo "== (a) launch_addresses check (t=$SECONDS s)"
timeout $(left 90) python3 experiments/host_overhead/launch_addresses.py --n 16K --rounds 2 2>&1 | grep -v -i warn | tee $OUT/launch_addresses.log
echo "== (a2) one launch's host cost, tensors or addresses (t=$SECONDS s)"
timeout $(left 30) python3 experiments/host_overhead/launch_cost.py --n 16K 2>&1 | grep -v -i warn | tee $OUT/launch_cost.log
echo "== (d) launches and allocations with the GPU idle or busy (t=$SECONDS s)"
timeout $(left 40) python3 experiments/host_overhead/busy_launch.py 2>&1 | grep -v -i warn | tee $OUT/busy_launch.log
echo "== (b) host timeline at 128K and 1M (t=$SECONDS s)"
timeout $(left 100) python3 experiments/host_overhead/host_timeline.py --n 128K,1M --repeats 7 2>&1 | grep -v -i warn > $OUT/host_timeline.log
cat $OUT/host_timeline.log
echo "== (c) benchmark at 1M (t=$SECONDS s)"
timeout $(left 140) python3 scripts/benchmark.py --n 1M --methods triton,floor-fa2 \
  --json $OUT/kernels.json --markdown $OUT/kernels.md 2>&1 | grep -v -i warn | grep "^\[" | cut -c1-190
echo "done (t=$SECONDS s)"
