# Twenty-eighth device call (2026-12-08; needs no carry). Run 27's stamps showed the host time that grows with N in
# the gaps between launches, not in the launches, and busy_launch.py showed the host slower after a long wait in
# torch.cuda.synchronize. (a) host time per call after three kinds of wait (synchronize, poll, idle) at 32K and 1M,
# ours and the floor (16K and 128K dropped for device time); (b) launch_cost.py again, its scratch allocator lent
# (run 27's stopped without it).
#     LIMIT=100 bash experiments/host_overhead/gpu_run28.sh
source experiments/host_overhead/run_support.sh
echo "== (a) host time after each kind of wait (t=$SECONDS s)"
timeout $(left 130) python3 experiments/host_overhead/host_after_wait.py --n 32K,1M --repeats 11 2>&1 | grep -v -i warn | tee $OUT/host_after_wait.log
echo "== (b) one launch's host cost, tensors or addresses (t=$SECONDS s)"
timeout $(left 30) python3 experiments/host_overhead/launch_cost.py --n 16K 2>&1 | grep -v -i warn | tee $OUT/launch_cost.log
echo "done (t=$SECONDS s)"
