"""Evaluation of a causal language model on long contexts: perplexity by position and retrieval accuracy by
distance, as a table (markdown), a JSON file and a PNG plot.

* **Perplexity by position bucket.** Each document is evaluated alone, cut into contexts of at most
  ``block_size`` tokens; the negative log-likelihood of the token at position ``t`` of its context (predicted
  from positions ``< t``) goes to the bucket holding ``t``, and a bucket's perplexity is ``exp`` of its mean.
  A model that uses long context gets lower perplexity at later positions.
* **Retrieval accuracy by distance.** For records with evidence and answer spans (the ``passkey`` and
  ``key_value`` documents of :func:`modeling_longnet.data.generate_default_dataset`, or any JSON lines with the
  same fields), the model reads the document with teacher forcing and predicts each answer token greedily. The
  distance is the number of tokens from the evidence's first token to the answer's first token. A record counts
  as an exact match when every answer token is predicted right; token accuracy counts tokens.

The metric functions (:func:`perplexity_by_position`, :func:`retrieval_accuracy_by_distance`) work on plain
tensors and lists; :func:`evaluate_model` runs a model to produce them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path

import torch

from .data import min_retrieval_distance

__all__ = [
    "DistanceBucket",
    "EvaluationReport",
    "PositionBucket",
    "RetrievalResult",
    "distance_edges",
    "evaluate_model",
    "locate_answer",
    "perplexity_by_position",
    "comparison_markdown",
    "plot_comparison",
    "plot_report",
    "retrieval_accuracy_by_distance",
    "score_retrieval",
    "token_negative_log_likelihoods",
]


@dataclass
class PositionBucket:
    """Tokens at context positions ``start <= t < end``."""

    start: int
    end: int
    num_tokens: int
    mean_nll: float
    perplexity: float


@dataclass
class DistanceBucket:
    """Retrieval records whose evidence lies ``low <= distance < high`` tokens before the answer."""

    low: int
    high: int
    num_examples: int
    exact_match: float
    token_accuracy: float


@dataclass
class RetrievalResult:
    """One retrieval record: its distance in tokens, and which answer tokens the model predicted right."""

    task: str
    distance: int
    expected: str
    predicted: str
    correct_tokens: list[bool]

    @property
    def exact_match(self) -> bool:
        return all(self.correct_tokens)


@dataclass
class EvaluationReport:
    """Everything :func:`evaluate_model` measures; ``to_dict``/``from_dict`` round-trip through JSON."""

    perplexity: float
    num_tokens: int
    position_buckets: list[PositionBucket]
    distance_buckets: list[DistanceBucket]
    exact_match: float | None
    num_retrieval_examples: int
    block_size: int
    segment_lengths: list[int] | None = None
    metadata: dict = field(default_factory=dict)
    # Exact match over the records whose evidence lies at least `far_distance` tokens back (by default twice the
    # smallest segment length: where only the dilated branches reach).
    far_distance: int | None = None
    far_exact_match: float | None = None
    num_far_examples: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> EvaluationReport:
        values = dict(values)
        values["position_buckets"] = [PositionBucket(**b) for b in values["position_buckets"]]
        values["distance_buckets"] = [DistanceBucket(**b) for b in values["distance_buckets"]]
        return cls(**values)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvaluationReport:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_markdown(self) -> str:
        lines = [
            f"Perplexity over {self.num_tokens} tokens: **{self.perplexity:.3f}**",
            "",
            "| positions | tokens | mean NLL | perplexity |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {b.start}-{b.end - 1} | {b.num_tokens} | {b.mean_nll:.4f} | {b.perplexity:.3f} |"
            for b in self.position_buckets
        ]
        if self.num_retrieval_examples:
            far = (
                f"; over the {self.num_far_examples} whose evidence lies at least {self.far_distance} tokens back: "
                f"**{self.far_exact_match:.1%}**"
                if self.num_far_examples else ""
            )
            lines += [
                "",
                f"Retrieval exact match over {self.num_retrieval_examples} records: **{self.exact_match:.1%}**{far}",
                "",
                "| distance (tokens) | records | exact match | token accuracy |",
                "|---|---:|---:|---:|",
            ]
            lines += [
                f"| {b.low}-{b.high - 1} | {b.num_examples} | {b.exact_match:.1%} | {b.token_accuracy:.1%} |"
                for b in self.distance_buckets
            ]
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Metrics on plain tensors and lists
# ----------------------------------------------------------------------------------------------------------


def perplexity_by_position(
    nll: torch.Tensor, mask: torch.Tensor, bucket_edges: Sequence[int]
) -> list[PositionBucket]:
    """Mean negative log-likelihood and perplexity of the tokens of each position bucket.

    Args:
        nll: ``(rows, positions)`` negative log-likelihood of the token at each position of a context.
        mask: ``(rows, positions)``, true where ``nll`` counts (real, predicted tokens).
        bucket_edges: increasing positions ``e_0 < e_1 < ... < e_k``; bucket j holds ``e_j <= t < e_{j+1}``.
            Empty buckets are left out of the result.
    """
    if nll.shape != mask.shape or nll.dim() != 2:
        raise ValueError(f"`nll` and `mask` must both be (rows, positions), got {tuple(nll.shape)} and {tuple(mask.shape)}")
    edges = list(bucket_edges)
    if len(edges) < 2 or any(b <= a for a, b in pairwise(edges)):
        raise ValueError(f"`bucket_edges` must be at least two increasing positions, got {edges}")
    mask = mask.bool()
    nll = nll.double()
    buckets = []
    for start, end in pairwise(edges):
        bucket_mask = mask[:, start:end]
        count = int(bucket_mask.sum())
        if count == 0:
            continue
        mean = float(nll[:, start:end][bucket_mask].sum()) / count
        buckets.append(PositionBucket(start, end, count, mean, math.exp(mean)))
    return buckets


def retrieval_accuracy_by_distance(
    results: Sequence[RetrievalResult], edges: Sequence[int]
) -> list[DistanceBucket]:
    """Exact match and token accuracy of the retrieval results in each distance bucket ``[e_j, e_{j+1})``
    (empty buckets left out)."""
    edges = list(edges)
    if len(edges) < 2 or any(b <= a for a, b in pairwise(edges)):
        raise ValueError(f"`edges` must be at least two increasing distances, got {edges}")
    buckets = []
    for low, high in pairwise(edges):
        members = [r for r in results if low <= r.distance < high]
        if not members:
            continue
        tokens = [ok for r in members for ok in r.correct_tokens]
        buckets.append(
            DistanceBucket(
                low, high, len(members),
                exact_match=sum(r.exact_match for r in members) / len(members),
                token_accuracy=sum(tokens) / len(tokens),
            )
        )
    return buckets


def distance_edges(distances: Sequence[int], segment_lengths: Sequence[int] | None = None) -> list[int]:
    """Bucket edges for retrieval distances: ``0``, the model's segment lengths (so that each bucket tells how
    the evidence sits against the segments) and one past the largest distance; without segment lengths,
    doubling edges from 64."""
    largest = max(distances, default=0) + 1
    if segment_lengths:
        inner = sorted({w for w in segment_lengths if 0 < w < largest})
    else:
        inner, edge = [], 64
        while edge < largest:
            inner.append(edge)
            edge *= 2
    return [0, *inner, largest]


# ----------------------------------------------------------------------------------------------------------
# Running a model
# ----------------------------------------------------------------------------------------------------------


def _contexts(token_lists: Sequence[Sequence[int]], block_size: int) -> list[list[int]]:
    """Each document cut into contexts of at most ``block_size`` tokens (the last one may be shorter)."""
    contexts = []
    for tokens in token_lists:
        contexts.extend(list(tokens[i : i + block_size]) for i in range(0, len(tokens), block_size))
    return [c for c in contexts if len(c) >= 2]


def _right_padded(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


@torch.no_grad()
def token_negative_log_likelihoods(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll, mask)``, both ``(rows, positions)``: ``nll[:, t] = -log p(x_t | x_<t)`` in float32, and ``mask`` true
    where it counts (a real token with a real token before it; position 0 never counts)."""
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = input_ids[:, 1:].to(device)
    nll = torch.zeros(input_ids.shape, dtype=torch.float32, device=device)
    nll[:, 1:] = -log_probs.gather(-1, targets[..., None])[..., 0]
    mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    mask[:, 1:] = (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)
    return nll.cpu(), mask


def locate_answer(tokenizer, record: dict) -> tuple[list[int], int, list[int]]:
    """``(input_ids, evidence_token, answer_tokens)`` of a retrieval record: the document's tokens up to the
    answer's end, the index of the first token of the evidence, and the indices of the answer's tokens (those
    that overlap its character span)."""
    text = record["text"][: record["answer_end"]]
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]

    def overlapping(start: int, end: int) -> list[int]:
        return [i for i, (a, b) in enumerate(offsets) if a < end and b > start]

    evidence = overlapping(record["evidence_start"], record["evidence_end"])
    answer = overlapping(record["answer_start"], record["answer_end"])
    if not evidence or not answer or answer[0] == 0:
        raise ValueError(f"cannot locate the evidence or the answer of a {record.get('task', 'retrieval')} record in its tokens")
    return encoding["input_ids"], evidence[0], answer


@torch.no_grad()
def score_retrieval(model, tokenizer, records: Sequence[dict], *, batch_size: int = 8, max_length: int | None = None) -> list[RetrievalResult]:
    """Teacher-forced greedy prediction of each record's answer tokens (records longer than ``max_length``
    tokens are skipped)."""
    located = []
    for record in records:
        input_ids, evidence, answer = locate_answer(tokenizer, record)
        if max_length is None or len(input_ids) <= max_length:
            located.append((record, input_ids, evidence, answer))
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(located), batch_size):
        chunk = located[start : start + batch_size]
        input_ids, attention_mask = _right_padded([ids for _, ids, _, _ in chunk], pad_token_id)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for row, (record, ids, evidence, answer) in enumerate(chunk):
            # The token at position p is predicted by the logits at p - 1.
            predicted = logits[row, [p - 1 for p in answer]].argmax(-1).tolist()
            expected = [ids[p] for p in answer]
            results.append(
                RetrievalResult(
                    task=record.get("task", "retrieval"),
                    distance=answer[0] - evidence,
                    expected=tokenizer.decode(expected),
                    predicted=tokenizer.decode(predicted),
                    correct_tokens=[p == e for p, e in zip(predicted, expected)],
                )
            )
    return results


def evaluate_model(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    block_size: int,
    retrieval_records: Sequence[dict] = (),
    num_position_buckets: int = 8,
    batch_size: int = 8,
    metadata: dict | None = None,
    distance_bucket_edges: Sequence[int] | None = None,
    far_distance: int | None = None,
) -> EvaluationReport:
    """Perplexity by position over ``texts`` and retrieval accuracy by distance over ``retrieval_records``.

    ``distance_bucket_edges`` fixes the distance buckets (to compare models on the same ones; default: from the
    model's segment lengths, :func:`distance_edges`). ``far_distance`` (default: twice the model's smallest segment
    length) sets which records count for ``far_exact_match``."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"`block_size` must be an int >= 2, got {block_size!r}")
    if isinstance(num_position_buckets, bool) or not isinstance(num_position_buckets, int) or num_position_buckets < 1:
        raise ValueError(f"`num_position_buckets` must be a positive int, got {num_position_buckets!r}")
    model.eval()
    token_lists = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    contexts = _contexts(token_lists, block_size)
    if not contexts:
        raise ValueError("no text to evaluate: every document is shorter than 2 tokens")
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    contexts.sort(key=len)  # batches of similar lengths waste less padding
    nll = torch.zeros(len(contexts), block_size)
    mask = torch.zeros(len(contexts), block_size, dtype=torch.bool)
    for start in range(0, len(contexts), batch_size):
        input_ids, attention_mask = _right_padded(contexts[start : start + batch_size], pad_token_id)
        batch_nll, batch_mask = token_negative_log_likelihoods(model, input_ids, attention_mask)
        nll[start : start + len(input_ids), : input_ids.shape[1]] = batch_nll
        mask[start : start + len(input_ids), : input_ids.shape[1]] = batch_mask
    width = -(-block_size // num_position_buckets)
    edges = list(range(0, block_size, width)) + [block_size]
    total = int(mask.sum())
    mean_nll = float(nll.double()[mask].sum()) / total

    segment_lengths = getattr(model.config, "segment_lengths", None)
    results = score_retrieval(model, tokenizer, retrieval_records, batch_size=batch_size, max_length=block_size)
    if results:
        by_distance = list(distance_bucket_edges) if distance_bucket_edges else distance_edges([r.distance for r in results], segment_lengths)
        by_distance[-1] = max(by_distance[-1], max(r.distance for r in results) + 1)
        distance_buckets = retrieval_accuracy_by_distance(results, by_distance)
    else:
        distance_buckets = []
    if far_distance is None and segment_lengths:
        far_distance = min_retrieval_distance(segment_lengths)
    far = [r for r in results if far_distance is not None and r.distance >= far_distance]
    return EvaluationReport(
        perplexity=math.exp(mean_nll),
        num_tokens=total,
        position_buckets=perplexity_by_position(nll, mask, edges),
        distance_buckets=distance_buckets,
        exact_match=sum(r.exact_match for r in results) / len(results) if results else None,
        num_retrieval_examples=len(results),
        block_size=block_size,
        segment_lengths=list(segment_lengths) if segment_lengths else None,
        metadata=dict(metadata or {}),
        far_distance=far_distance,
        far_exact_match=sum(r.exact_match for r in far) / len(far) if far else None,
        num_far_examples=len(far),
    )


def plot_report(report: EvaluationReport, path: str | Path, *, title: str | None = None) -> Path:
    """Writes a PNG: perplexity by position bucket (left) and retrieval accuracy by distance (right), with the
    model's segment lengths marked. Uses matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    panels = 2 if report.distance_buckets else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    left = axes[0][0]
    centers = [(b.start + b.end - 1) / 2 for b in report.position_buckets]
    left.plot(centers, [b.perplexity for b in report.position_buckets], marker="o")
    left.set_xlabel("position in context (tokens)")
    left.set_ylabel("perplexity")
    left.set_title("Perplexity by position")
    left.grid(alpha=0.3)
    for w in report.segment_lengths or []:
        if w < report.block_size:
            left.axvline(w, color="grey", linestyle="--", linewidth=0.8)
    if report.distance_buckets:
        right = axes[0][1]
        labels = [f"{b.low}-{b.high - 1}" for b in report.distance_buckets]
        positions = range(len(labels))
        right.bar([p - 0.2 for p in positions], [b.exact_match for b in report.distance_buckets], width=0.4, label="exact match")
        right.bar([p + 0.2 for p in positions], [b.token_accuracy for b in report.distance_buckets], width=0.4, label="token accuracy")
        for p, b in zip(positions, report.distance_buckets):
            right.annotate(f"n={b.num_examples}", (p, max(b.exact_match, b.token_accuracy)), ha="center", va="bottom", fontsize=8)
        right.set_xticks(list(positions), labels)
        right.set_ylim(0, 1.1)
        right.set_xlabel("evidence distance (tokens; edges at segment lengths)")
        right.set_ylabel("accuracy")
        right.set_title("Retrieval accuracy by distance")
        right.legend(loc="upper right", fontsize=8)
    return _save(figure, path, title)


def _save(figure, path: Path, title: str | None) -> Path:
    import matplotlib.pyplot as plt

    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def comparison_markdown(reports: dict[str, EvaluationReport]) -> str:
    """One table of several models evaluated on the same documents: perplexity by position, then retrieval exact
    match by distance, a column per model."""
    names = list(reports)
    first = reports[names[0]]
    header = "| {} | " + " | ".join(names) + " |"
    rule = "|---|" + "---:|" * len(names)
    lines = ["Perplexity by position", "", header.format("positions"), rule]
    for i, bucket in enumerate(first.position_buckets):
        cells = [f"{r.position_buckets[i].perplexity:.3f}" if i < len(r.position_buckets) else "" for r in reports.values()]
        lines.append(f"| {bucket.start}-{bucket.end - 1} | " + " | ".join(cells) + " |")
    lines.append("| all | " + " | ".join(f"{r.perplexity:.3f}" for r in reports.values()) + " |")
    if first.distance_buckets:
        lines += ["", "Retrieval exact match by distance (records in brackets)", "", header.format("distance (tokens)"), rule]
        for bucket in first.distance_buckets:
            cells = []
            for report in reports.values():
                match = [b for b in report.distance_buckets if (b.low, b.high) == (bucket.low, bucket.high)]
                cells.append(f"{match[0].exact_match:.1%} ({match[0].num_examples})" if match else "")
            lines.append(f"| {bucket.low}-{bucket.high - 1} | " + " | ".join(cells) + " |")
        lines.append("| all | " + " | ".join(f"{r.exact_match:.1%} ({r.num_retrieval_examples})" for r in reports.values()) + " |")
        far = first.far_distance
        if far is not None:
            cells = [
                f"{r.far_exact_match:.1%} ({r.num_far_examples})" if r.num_far_examples else "" for r in reports.values()
            ]
            lines.append(f"| >= {far} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(reports: dict[str, EvaluationReport], path: str | Path, *, title: str | None = None, segment_lengths: Sequence[int] = ()) -> Path:
    """Writes a PNG of several models evaluated on the same documents: perplexity by position (left) and
    retrieval exact match by distance (right), one curve per model, the given segment lengths marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    has_retrieval = any(r.distance_buckets for r in reports.values())
    figure, axes = plt.subplots(1, 2 if has_retrieval else 1, figsize=(12 if has_retrieval else 6, 4), squeeze=False)
    left = axes[0][0]
    for name, report in reports.items():
        centers = [(b.start + b.end - 1) / 2 for b in report.position_buckets]
        left.plot(centers, [b.perplexity for b in report.position_buckets], marker="o", label=name)
    left.set_xlabel("position in context (tokens)")
    left.set_ylabel("perplexity")
    left.set_title("Perplexity by position")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    block_size = max(r.block_size for r in reports.values())
    for w in segment_lengths:
        if w < block_size:
            left.axvline(w, color="grey", linestyle="--", linewidth=0.8)
            left.annotate(f"w={w}", (w, 1), xycoords=("data", "axes fraction"), ha="left", va="top", fontsize=8, color="grey")
    if has_retrieval:
        right = axes[0][1]
        for name, report in reports.items():
            centers = [(b.low + b.high - 1) / 2 for b in report.distance_buckets]
            right.plot(centers, [b.exact_match for b in report.distance_buckets], marker="o", label=name)
        for w in segment_lengths:
            right.axvline(w, color="grey", linestyle="--", linewidth=0.8)
            right.annotate(f"w={w}", (w, 1), xycoords=("data", "axes fraction"), ha="left", va="top", fontsize=8, color="grey")
        right.set_xscale("log", base=2)
        right.set_ylim(-0.03, 1.05)
        right.set_xlabel("evidence distance (tokens, log scale; points at bucket centres)")
        right.set_ylabel("exact match")
        right.set_title("Retrieval exact match by distance")
        right.grid(alpha=0.3)
        right.legend(fontsize=8)
    return _save(figure, path, title)
