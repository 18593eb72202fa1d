"""Runs experiment configs (one JSON list of argument lists) concurrently on the GPU; results to $OUT."""
import json, os, subprocess, sys, time
configs = json.load(open(sys.argv[1]))
parallel = int(sys.argv[2]) if len(sys.argv) > 2 else 12
limit = float(sys.argv[3]) if len(sys.argv) > 3 else 500
out = os.environ.get("OUT", "/tmp")
start = time.time()
running = []
queue = list(configs)
log = open(os.path.join(out, "log.txt"), "w")
while queue or running:
    while queue and len(running) < parallel:
        cfg = queue.pop(0)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        left = max(10, limit - (time.time() - start) - 15)
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "mqar.py"), "--device", "cuda", "--out", os.path.join(out, "results.jsonl"), "--time-limit", str(left), *cfg]
        running.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    running = [p for p in running if p.poll() is None]
    if time.time() - start > limit:
        for p in running: p.kill()
        break
    time.sleep(1)
print("done", time.time() - start)
