"""Plots the 32K GPU runs of docs/quality.md ("Retrieval at 32K on one H200"): held-out retrieval exact match by
distance, LongNet against the local-only and the dense model, and their training losses against steps with the
curriculum's stages marked. `python experiments/retrieval/plot_gpu_32k.py` writes docs/retrieval_32k.png from the
logs and evaluations kept in experiments/retrieval/gpu_32k_run2 (LongNet, local-only) and gpu_32k_run3 (dense)."""
import ast
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = {  # label: (folder, run name, colour)
    "LongNet (w 2048/8192/32768, r 1/4/8)": ("gpu_32k_run2", "longnet-wide", "tab:blue"),
    "local-only (w 2048)": ("gpu_32k_run2", "local-wide", "tab:orange"),
    "dense (w 32768, r 1)": ("gpu_32k_run3", "dense-wide", "tab:green"),
}


def evaluation(folder: str, run: str, which: str) -> dict:
    with open(os.path.join(HERE, folder, which, "evaluation.json")) as file:
        scores = json.load(file)
    return scores.get(run, scores)  # one model: the file holds its scores alone


def bucket_accuracy(scores: dict, low: int, high: int) -> float:
    """Exact match over the questions between low and high tokens back: every bucket of the evaluation that lies
    inside (a one-model evaluation may use one wide bucket; all its questions lie in [4096, 24576])."""
    inside = [b for b in scores["distance_buckets"] if b["num_examples"] and b["low"] < high and b["high"] > low]
    total = sum(b["num_examples"] for b in inside)
    return sum(b["exact_match"] * b["num_examples"] for b in inside) / total


def losses(folder: str, run: str) -> list[tuple[int, float]]:
    with open(os.path.join(HERE, folder, run, "training_summary.json")) as file:
        max_steps = json.load(file)["max_steps"]
    points = []
    with open(os.path.join(HERE, folder, f"{run}.log")) as file:
        for line in file:
            if line.startswith("{'loss'"):
                entry = ast.literal_eval(line.strip())
                points.append((round(float(entry["epoch"]) * max_steps), float(entry["loss"])))  # epoch = step / max_steps
    return points


def main(output: str) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
    buckets = [("0-2047\n(near)", None, None), ("4096-8191", 4096, 8192), ("8192-16383", 8192, 16384), ("16384-24576", 16384, 32769)]
    width = 0.27
    for index, (label, (folder, run, colour)) in enumerate(RUNS.items()):
        values = []
        for _, low, high in buckets:
            scores = evaluation(folder, run, "evaluation-near" if low is None else "evaluation")
            values.append(100 * (scores["exact_match"] if low is None else bucket_accuracy(scores, low, high)))
        positions = [i + (index - 1) * width for i in range(len(buckets))]
        left.bar(positions, values, width, label=label, color=colour)
        for x, value in zip(positions, values):
            left.text(x, value + 1.5, f"{value:.0f}", ha="center", fontsize=8)
        right.plot(*zip(*losses(folder, run)), label=label, color=colour)
    left.set_xticks(range(len(buckets)), [b[0] for b in buckets])
    left.set_xlabel("distance from the evidence to the answer (tokens; the local branch ends at 2048)")
    left.set_ylabel("held-out exact match (%)")
    left.set_ylim(0, 135)
    left.set_title("retrieval, 40 held-out documents of 16K-32K tokens")
    left.legend(loc="upper center", ncol=3, fontsize=7)
    for boundary, name in ((250, "512-char documents"), (400, "4096")):
        right.axvline(boundary, color="grey", linestyle=":")
        right.text(boundary - 5, 4.6, name, rotation=90, ha="right", va="top", fontsize=8, color="grey")
    right.text(405, 4.6, "32K documents", rotation=90, ha="left", va="top", fontsize=8, color="grey")
    right.set_ylim(0, 5)
    right.set_xlabel("step (8 rows of 32768 tokens each)")
    right.set_ylabel("training loss (LM + 5 x answers)")
    right.set_title("training: curriculum stages dotted")
    right.legend(fontsize=8)
    figure.suptitle("LongNet at 32K on one H200, 900 steps (dense: 850), bf16, 2026-12-02")
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    print(f"wrote {output}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "docs", "retrieval_32k.png"))
