# Twenty-third device call (2026-12-07, fourth session): the host trims after run 21 (launch configurations built
# once per argument, the device's capability asked once, the Triton backend's support checked once per call, not
# twice; the dispatcher's common-case checks in one expression; the backends' modules imported once) and 32K at
# H = 12 in the grouped backward. In order of need: the GPU tests; benchmark.py at 16K and 32K alternating with the
# code before (b205bda, carried as a tarball), after / before / after, to see the host's drift; host_timeline.py
# (events now created before the call); host_parts.py (each function's share of the host time).
export PYTHONUNBUFFERED=1
LIMIT=${LIMIT:-560}
left() { local t=$((LIMIT - SECONDS)); [ $t -lt $1 ] && echo $t || echo $1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/gpu.txt
echo "== (a) tests (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $(left 150) python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -m gpu tests/test_triton.py 2>&1 | tail -25 > $OUT/pytest.log
tail -3 $OUT/pytest.log
mkdir -p /tmp/before && tar xzf experiments/host_overhead/carry/before_b205bda.tar.gz -C /tmp/before
for round in after1 before after2; do
  echo "== (b) benchmark $round (t=$SECONDS s)"
  dir=$PWD; [ $round = before ] && dir=/tmp/before
  (cd $dir && PYTHONPATH=$dir timeout $(left 80) python3 scripts/benchmark.py --n 16K,32K --methods triton,floor-fa2 \
    --json $OUT/kernels_$round.json --markdown $OUT/kernels_$round.md 2>&1 | grep -v -i warn | grep "^\[" | cut -c1-190)
done
echo "== (c) host timeline (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $(left 90) python3 experiments/host_overhead/host_timeline.py --n 16K,32K --variants default,per-branch-32K 2>&1 | grep -v -i warn > $OUT/host_timeline.log
grep "^==" $OUT/host_timeline.log
echo "== (d) host parts (t=$SECONDS s)"
PYTHONPATH=$PWD timeout $(left 90) python3 experiments/host_overhead/host_parts.py --n 32K 2>&1 | grep -v -i warn > $OUT/host_parts_32K.log
grep "whole call" $OUT/host_parts_32K.log
echo "done (t=$SECONDS s)"
