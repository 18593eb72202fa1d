"""Experiment harness (docs/quality.md): does a LongNet learn long-range associative recall within a small budget?

Documents are byte strings of `key=value` statements. Keys: an uppercase letter and a digit (or one character);
values: a lowercase letter. A dictionary of K statements, then queries (statements of keys seen before, at least
`min_distance` tokens after their previous statement). Every query's value is a retrieval target.
"""
import argparse, json, math, os, random, sys, time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository root
import torch
import torch.nn.functional as F

UP = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LOW = "abcdefghijklmnopqrstuvwxyz"
DIG = "0123456789"


def key_pool(kind, split):
    if kind == "char":
        keys = list(UP) + list(DIG)  # 36 single chars
        return keys  # no held-out split possible
    keys = [a + d for a in UP for d in DIG]
    # held-out: a fixed 20% of the (letter, digit) combinations, so that every letter and digit still occurs in training
    held = [k for i, k in enumerate(keys) if (UP.index(k[0]) * 7 + DIG.index(k[1]) * 3) % 5 == 0]
    if split == "train":
        return [k for k in keys if k not in held]
    return held


def make_document(rng, length, pool, num_keys, min_distance, fmt, max_distance=None, short_frac=0.0, short_max=64):
    keys = rng.sample(pool, min(num_keys, len(pool)))
    values = {k: rng.choice(LOW) for k in keys}
    text = ""
    last = {}  # key -> position of its value token in the last statement
    spans = []  # (evidence_pos, answer_pos)

    def statement(k):
        if fmt == "eq":
            return f"{k}={values[k]} ", len(k) + 1
        if fmt == "eq2":  # value then the key again: the fact sits on 4+ consecutive tokens
            return f"{k}={values[k]}:{k} ", len(k) + 1
        if fmt == "colon":
            return f"{k}: {values[k]}\n", len(k) + 2
        raise ValueError(fmt)

    order = list(keys)
    rng.shuffle(order)
    for k in order:
        s, off = statement(k)
        if len(text) + len(s) > length:
            break
        last[k] = len(text) + off
        text += s
    stated = list(last)
    while True:
        pos_next = len(text)
        eligible = [k for k in stated if pos_next + len(k) + 1 - last[k] >= min_distance and (max_distance is None or pos_next + len(k) + 1 - last[k] < max_distance)]
        if not eligible:
            # filler statement of a fresh key? use a filler space line
            if len(text) + 1 > length:
                break
            text += " "
            continue
        short = [k for k in eligible if pos_next + len(k) + 1 - last[k] < short_max]
        k = rng.choice(short if short and rng.random() < short_frac else eligible)
        s, off = statement(k)
        if len(text) + len(s) > length:
            break
        ans = len(text) + off
        spans.append((last[k], ans))
        last[k] = ans
        text += s
    text = text + " " * (length - len(text))
    return text, spans


def grid_document(rng, length, pool, num_keys, min_distance, shift=True, query_prob=0.5, requery=False):
    """Cells of 4 tokens: records `Xd` + value + `;` and questions `?Xd` + value (shift) or `Xd` + value + `?`.

    requery: a key can be asked again, once its last question lies min_distance back (the local branch never
    reaches an earlier copy of the answer)."""
    keys = rng.sample(pool, min(num_keys, len(pool)))
    klen = len(keys[0])
    values = {k: rng.choice(LOW) for k in keys}
    text, spans = "", []
    record_at = {}  # key -> value position of its record
    asked_at = {}  # key -> answer position of its last question
    new = list(keys)
    while len(text) + 4 <= length:
        here = len(text)
        qoff = (1 if shift else 0) + klen  # answer offset inside a question cell
        eligible = [k for k, p in record_at.items() if here + qoff - p >= min_distance and here + qoff - asked_at.get(k, -10**9) >= min_distance]
        if eligible and (not new or rng.random() < query_prob):
            k = rng.choice(eligible)
            cell = ("?" + k + values[k]) if shift else (k + values[k] + "?")
            cell = cell + " " * (4 - len(cell))
            spans.append((record_at[k] if requery else record_at.pop(k), here + qoff))
            asked_at[k] = here + qoff
        elif new:
            k = new.pop()
            cell = k + values[k] + ";" * (3 - klen)
            record_at[k] = here + klen
        else:
            cell = "    "
        text += cell
    text += " " * (length - len(text))
    return text, spans


WORDS = ("the old sailor painted a wooden boat near the river small child found red door in market gardener carried "
         "map behind library neighbour watched garden wall on hill teacher repaired basket of apples by harbour tired "
         "traveller forgot broken clock forest baker described letter from home station her brother cleaned blue kite "
         "under bridge young doctor opened pile books beside lake quiet student sold narrow farmer borrowed silver spoon "
         "town our guide measured stone well beach painter followed paper lantern farm stray cat drew winter coat").split()
SYMBOLS = "#$%&*+=@^~"


import functools


@functools.lru_cache(maxsize=None)
def passkey_pool(split, key_len=3):
    keys = [u + d + s for u in UP for d in DIG for s in SYMBOLS]
    held = [k for i, k in enumerate(keys) if (UP.index(k[0]) * 7 + DIG.index(k[1]) * 3 + SYMBOLS.index(k[2])) % 5 == 0]
    if key_len == 2:
        keys = [u + d for u in UP for d in DIG]
        held = [k for k in keys if (UP.index(k[0]) * 7 + DIG.index(k[1]) * 3) % 5 == 0]
    held_set = set(held)
    return held if split != "train" else [k for k in keys if k not in held_set]


def prose(rng, n):
    out = ""
    while len(out) < n:
        sent = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + ". "
        out += sent
    return out[:n]


def statement(key):
    """One statement of the pass key, padded to 1 mod 4 tokens: repeated statements put the key on every residue."""
    text = f" the pass key is {key}."
    return text + " " * ((1 - len(text)) % 4)


def passkey_document(rng, length, min_distance, pool, repeats=1, align=0):
    key = rng.choice(pool)
    needle = "".join(statement(key) for _ in range(repeats)) + " "
    question = " what is the pass key? the pass key is "
    tail = key + "."
    room = length - len(needle) - len(question) - len(tail)
    # the key sits at least min_distance before the answer
    latest = room - max(0, min_distance - len(needle) + needle.rindex(key) - len(question))
    before = rng.randint(0, max(0, latest))
    if align:  # evidence-to-answer distance = 1 mod align: the query before the answer shares the evidence's residue
        total_after = room - before  # prose after the needle
        d0 = len(needle) - needle.rindex(key) + total_after + len(question)
        before += (d0 - 1) % align
        before = min(before, room)
    text = prose(rng, before) + needle
    ev = len(text) - len(needle) + needle.rindex(key)
    text += prose(rng, room - before) + question
    ans = len(text)
    text += tail
    spans = [(ev + i, ans + i) for i in range(len(key))]
    return text, spans


def passkey_multi_document(rng, length, min_distance, pool, repeats=4, question=" key? ", gap=(0, 48)):
    """The pass key stated `repeats` times, then prose and questions: every answer lies at least min_distance
    after the previous statement of the key (the needle or the last answer), so only the dilated branches reach it."""
    key = rng.choice(pool)
    text = prose(rng, rng.randint(0, 24)) + "".join(statement(key) for _ in range(repeats))
    last = text.rindex(key)  # the last statement's key
    spans = []
    while True:
        filler = max(0, min_distance - (len(text) - last) - len(question)) + rng.randint(*gap)
        if len(text) + filler + len(question) + len(key) + 1 > length:
            break
        text += prose(rng, filler) + question
        ans = len(text)
        spans += [(last + i, ans + i) for i in range(len(key))]
        text += key + "."
        last = ans
    text += prose(rng, length - len(text))
    return text, spans


def batch_docs(split, seed, start, count, args, min_distance=None, short_frac=0.0, length=None):
    docs = []
    for i in range(start, start + count):
        rng = random.Random(f"{split}/{seed}/{i}")
        if args.fmt == "passkey-multi":
            docs.append(passkey_multi_document(rng, length or args.length, min_distance or args.min_distance, passkey_pool(split, args.key_len), args.needle_repeats))
            continue
        if args.fmt == "passkey":
            docs.append(passkey_document(rng, length or args.length, min_distance or args.min_distance, passkey_pool(split, args.key_len), args.needle_repeats, args.align))
            continue
        if args.fmt.startswith("grid"):
            docs.append(grid_document(rng, length or args.length, key_pool(args.keys, split), args.num_keys, min_distance or args.min_distance, shift=args.fmt != "grid-noshift", query_prob=args.query_prob, requery=args.requery))
            continue
        docs.append(make_document(rng, args.length, key_pool(args.keys, split), args.num_keys, min_distance or args.min_distance, args.fmt, short_frac=short_frac, short_max=args.short_max))
    return docs


def to_tensors(docs):
    ids = torch.tensor([list(t.encode()) for t, _ in docs], dtype=torch.long)
    return ids


def build_model(args):
    from modeling_longnet import LongNetConfig, LongNetForCausalLM

    cfg = LongNetConfig(
        vocab_size=258, hidden_size=args.hidden, intermediate_size=args.hidden * args.mlp_ratio,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        segment_lengths=args.w, dilation_rates=args.r, max_position_embeddings=args.length,
        pad_token_id=257, bos_token_id=256, eos_token_id=256,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        position_encoding=args.pos,
    )
    torch.manual_seed(args.seed)
    m = LongNetForCausalLM(cfg)
    m.set_attn_implementation(args.attn)
    return m


@torch.no_grad()
def evaluate(model, docs, args, device):
    model.eval()
    correct, total = {}, {}
    ids = to_tensors(docs).to(device)
    logits = []
    for i in range(0, len(docs), 8):
        logits.append(model(input_ids=ids[i:i + 8]).logits.argmax(-1).cpu())
    pred = torch.cat(logits)
    edges = [0, min(args.w), 2 * min(args.w)] + sorted(w for w in args.w if w > 2 * min(args.w)) + [10**9]
    slot_ok, slot_n = {}, {}
    for d, (t, spans) in enumerate(docs):
        for slot, (ev, ans) in enumerate(spans):
            dist = ans - ev
            ok = int(pred[d, ans - 1]) == t.encode()[ans]
            if args.fmt.startswith("passkey"):
                slot = slot % args.key_len
                slot_ok[slot] = slot_ok.get(slot, 0) + ok
                slot_n[slot] = slot_n.get(slot, 0) + 1
            b = max(i for i, e in enumerate(edges) if dist >= e)
            correct[b] = correct.get(b, 0) + ok
            total[b] = total.get(b, 0) + 1
    model.train()
    far = [b for b in total if edges[b] >= 2 * min(args.w)]
    acc_far = sum(correct[b] for b in far) / max(1, sum(total[b] for b in far))
    buckets = {f"{edges[b]}-{edges[b+1]-1}": (round(correct[b] / total[b], 3), total[b]) for b in sorted(total)}
    buckets.update({f"slot{k}": round(slot_ok[k] / slot_n[k], 3) for k in sorted(slot_n)})
    return acc_far, buckets


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="run")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--keys", default="pair", choices=["pair", "char"])
    p.add_argument("--num-keys", type=int, default=60)
    p.add_argument("--min-distance", type=int, default=128)
    p.add_argument("--fmt", default="eq")
    p.add_argument("--train-min-distance", type=int, default=0)
    p.add_argument("--short-frac", type=float, default=0.0)
    p.add_argument("--needle-repeats", type=int, default=1)
    p.add_argument("--align", type=int, default=0)
    p.add_argument("--len-curriculum", type=int, default=0)
    p.add_argument("--len-start", type=int, default=96)
    p.add_argument("--eval-min-distance", type=int, default=0)
    p.add_argument("--query-prob", type=float, default=0.5)
    p.add_argument("--requery", action="store_true")
    p.add_argument("--key-len", type=int, default=3)
    p.add_argument("--short-max", type=int, default=64)
    p.add_argument("--curriculum", type=int, default=0, help="steps over which the train min distance ramps up")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--mlp-ratio", type=int, default=3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--w", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--r", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--pos", default="rope")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--attn", default="torch")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--answer-weight", type=float, default=0.0)
    p.add_argument("--wd", type=float, default=0.01)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-docs", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--time-limit", type=float, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd, betas=(0.9, 0.95))

    def lr_at(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        if args.schedule == "constant":
            return 1.0
        prog = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * prog)) if args.schedule == "cosine" else 1 - prog

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    eval_docs = batch_docs("heldout", args.seed, 0, args.eval_docs, args, min_distance=args.eval_min_distance or args.min_distance)
    history = []
    t0 = time.time()
    for step in range(args.steps):
        md = args.train_min_distance or args.min_distance
        if args.curriculum and step < args.curriculum:
            md = int(md + (args.min_distance - md) * step / args.curriculum)
        length = args.length
        if args.len_curriculum and step < args.len_curriculum:
            length = int(args.len_start + (args.length - args.len_start) * step / args.len_curriculum) // 4 * 4
            md = max(8, md * length // args.length)
        docs = batch_docs("train", args.seed, step * args.batch, args.batch, args, min_distance=md, short_frac=args.short_frac, length=length)
        ids = to_tensors(docs).to(device)
        logits = model(input_ids=ids).logits
        lp = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none").view(ids.shape[0], -1)
        loss = lp.mean()
        if args.answer_weight:
            rows = [d for d, (_, spans) in enumerate(docs) for _ in spans]
            cols = [ans - 1 for _, spans in docs for _, ans in spans]
            mask = torch.zeros(lp.shape, dtype=lp.dtype)
            mask[rows, cols] = 1
            mask = mask.to(lp.device)
            loss = loss + args.answer_weight * (lp * mask).sum() / mask.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            acc, buckets = evaluate(model, eval_docs, args, device)
            el = time.time() - t0
            history.append({"step": step + 1, "time": round(el, 1), "loss": round(loss.item(), 4), "acc_far": round(acc, 4), "buckets": buckets})
            print(json.dumps({"name": args.name, **history[-1]}), flush=True)
        if args.time_limit and time.time() - t0 > args.time_limit:
            break
    res = {"name": args.name, "args": vars(args), "history": history, "seconds": time.time() - t0}
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
