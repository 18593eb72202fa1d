# Twenty-fifth device call (for the next session): (a) does a torch.profiler session slow later host work (run 24's
# open question)? four fresh processes, control and profiler arms alternating; (b) benchmark.py at 8K-32K and 1M with
# the kernels counted after every timing (23a311e), for issue 14's table; (c) the 16K forward+backward's timeline with
# the backward on autograd's device thread and on the calling thread (the wait before the backward's first launch).
export PYTHONUNBUFFERED=1
LIMIT=${LIMIT:-500}
left() { local t=$((LIMIT - SECONDS)); [ $t -lt $1 ] && echo $t || echo $1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
echo "== (0) GPU tests: 8040fde put the LSE formula in a jit helper, compiled only by the interpreter so far (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $(left 150) python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m gpu tests/test_triton.py 2>&1 | tail -25 > $OUT/pytest.log
tail -3 $OUT/pytest.log
echo "== (a) profiler after-effect (t=$SECONDS s)"
for arm in control profiler control profiler; do
  PYTHONPATH=$PWD timeout $(left 60) python3 experiments/host_overhead/profiler_after_effect.py --arm $arm 2>&1 | grep -v -i warn | grep "^=="
done | tee $OUT/profiler_after_effect.log
echo "== (b) benchmark (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $(left 200) python3 scripts/benchmark.py --n 8K,16K,32K,1M --methods triton,floor-fa2 \
  --json $OUT/kernels.json --markdown $OUT/kernels.md 2>&1 | grep -v -i warn | grep "^\[" | cut -c1-190
echo "== (c) host timeline, backward on autograd's device thread and on the calling thread (t=$SECONDS s)"
for flag in "" --calling-thread; do
  PYTHONPATH=$PWD timeout $(left 60) python3 experiments/host_overhead/host_timeline.py --n 16K $flag 2>&1 | grep -v -i warn > $OUT/host_timeline${flag}.log
  grep -A 14 "fwd+bwd" $OUT/host_timeline${flag}.log
done
echo "done (t=$SECONDS s)"
