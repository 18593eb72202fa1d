"""GPU check of the compiled path (the custom op): the paper-size model, bf16 autocast, Triton backend, one row of N
tokens. Eager and torch.compile(fullgraph=True) training steps: losses of 3 steps, and the median step time of
the next ones (each step synced). The compiled backward recomputes the attention's forward (see
dilated_attention._attention_backward_op), so the attention costs about fwd + (fwd + bwd) there."""

import argparse
import copy
import json
import time

import torch

from modeling_longnet import LongNetConfig, LongNetForCausalLM


def steps(model, optimizer, ids, count):
    losses, times = [], []
    for _ in range(count):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return losses, times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--timed", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LongNetConfig.from_preset("longnet-paper", attn_implementation="triton")
    eager = LongNetForCausalLM(config).cuda().train()
    compiled_model = copy.deepcopy(eager)
    result = {"n": args.n}
    ids = torch.randint(3, config.vocab_size, (1, args.n), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for name, model in (("eager", eager), ("compiled", torch.compile(compiled_model, fullgraph=True))):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        start = time.perf_counter()
        losses, _ = steps(model, optimizer, ids, 3)
        first = time.perf_counter() - start
        _, times = steps(model, optimizer, ids, args.timed)
        times.sort()
        result[name] = {"losses": losses, "first_3_steps_s": first, "median_step_ms": 1e3 * times[len(times) // 2]}
        print(name, result[name], flush=True)
    result["loss_rel_diff"] = max(abs(a - b) / abs(a) for a, b in zip(result["eager"]["losses"], result["compiled"]["losses"]))
    print("max relative loss difference", result["loss_rel_diff"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
