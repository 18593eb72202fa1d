"""Plots held-out retrieval accuracy (answer tokens whose evidence lies beyond 2 x w_min) against steps, one panel
per sweep: `python experiments/retrieval/plot_sweeps.py` writes docs/retrieval_sweeps.png (sweeps 1-3);
`python experiments/retrieval/plot_sweeps.py docs/retrieval_sweeps_2.png 4 5 6 7` the later ones."""
import collections, json, os, sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = os.path.dirname(os.path.abspath(__file__))
TITLES = {
    1: "sweep 1: key=value statements, 1024 tokens",
    2: "sweep 2: single pass key / grid records, 512 tokens",
    3: "sweep 3: pass key stated 1-4 times, length curriculum",
    4: "sweep 4: grid-aligned key/value recall, 512 tokens",
    5: "sweep 5: repeated questions, answer-weighted loss",
    6: "sweep 6: 2-symbol keys, answer weight 5, 512 tokens",
    7: "sweep 7: 2-symbol keys, 256 tokens, 8 heads",
}


def last_values(cfg, option, count=3):
    """The values of the last occurrence of `option` (later ones override earlier ones in the harness)."""
    if option not in cfg:
        return None
    at = len(cfg) - 1 - cfg[::-1].index(option)
    values = []
    for x in cfg[at + 1 :]:
        if not x.isdigit() or len(values) == count:
            break
        values.append(int(x))
    return values


def far_accuracy(buckets, w_min):
    # the harness's buckets are "lo-hi": keep those at or beyond 2 * w_min
    hits = total = 0
    for name, value in buckets.items():
        if name.startswith("slot"):
            continue
        acc, n = value
        if int(name.split("-")[0]) >= 2 * w_min:
            hits += acc * n
            total += n
    return hits / total if total else None


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "docs", "retrieval_sweeps.png")
    sweeps = [int(x) for x in sys.argv[2:]] or [1, 2, 3]
    figure, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), 5), sharey=True)
    for axis, sweep in zip(axes, sweeps):
        configs = {cfg[cfg.index("--name") + 1]: cfg for cfg in json.load(open(os.path.join(HERE, f"sweep{sweep}.json")))}
        curves = collections.defaultdict(list)
        for line in open(os.path.join(HERE, f"sweep{sweep}_log.jsonl")):
            if line.startswith("{"):
                row = json.loads(line)
                cfg = configs[row["name"]]
                w = last_values(cfg, "--w") or [64]
                acc = far_accuracy(row["buckets"], min(w))
                if acc is None:  # one branch: no bucket beyond 2 w; use every distance
                    accs = [v for k, v in row["buckets"].items() if not k.startswith("slot")]
                    acc = sum(a * n for a, n in accs) / sum(n for _, n in accs)
                curves[row["name"]].append((row["step"], acc))
        for name, points in curves.items():
            points.sort()
            axis.plot([s for s, _ in points], [a for _, a in points], label=name, linewidth=1.2)
        axis.set_title(TITLES[sweep], fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6, ncol=2)
    axes[0].set_ylabel("held-out answer-token accuracy, evidence beyond 2 x w_min")
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    print("wrote", out)


if __name__ == "__main__":
    main()
