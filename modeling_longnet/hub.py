"""Publishing a trained LongNet on the Hugging Face Hub (or any Hub-compatible endpoint): the model card, the
folder to upload (weights as safetensors, config, model code for ``trust_remote_code=True``, tokenizer, card,
evaluation figures), and the upload itself through ``huggingface_hub``.

The endpoint is ``huggingface_hub``'s: ``HF_ENDPOINT`` (default https://huggingface.co) unless one is passed.
Failures a user can act on (no token, a refused token, no network, offline mode) raise :class:`HubPublishError`
with a one-line message that says what to do.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

__all__ = ["EVALUATION_FILES", "HubPublishError", "build_model_card", "prepare_upload_folder", "upload_to_hub"]

EVALUATION_FILES = ("evaluation.json", "evaluation.md", "evaluation.png")
TRAINING_SUMMARY = "training_summary.json"
PAPER = "https://arxiv.org/abs/2307.02486"


class HubPublishError(RuntimeError):
    """A publishing failure with a message that says what to do."""


# ----------------------------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------------------------


def _describe_time(training: dict) -> str:
    """The run's seconds, said of the steps they timed: a resumed run timed only the steps after its checkpoint."""
    seconds = f"{training.get('train_seconds', 0):.0f} s"
    resumed_at = training.get("resumed_at_step")
    if not resumed_at:
        return seconds
    return (
        f"resumed at step {resumed_at}: {seconds} for the last {training.get('steps_this_run')} steps "
        f"({training.get('tokens_this_run', 0):,} tokens)"
    )


def _describe_data(training: dict) -> str:
    data = training.get("data", {})
    source = data.get("source", {})
    documents = data.get("documents", {})
    counts = ", ".join(f"{count} {split}" for split, count in documents.items())
    if source.get("kind") == "default":
        return (
            "The embedded default dataset of `modeling_longnet.data` (generated deterministically, no download): "
            "pass-key retrieval (a five-digit key stated once, asked for at the end of the document), key-value "
            "retrieval (a list of `name = value` records, one value asked for at the end) and ordinary sentences. "
            f"The evidence lies at least {source.get('default_min_distance')} characters before the answer "
            f"(documents of up to {source.get('default_max_chars')} characters, seed {source.get('seed')}; "
            f"{counts} documents)."
        )
    if source.get("kind") == "hub":
        name = source.get("dataset")
        config = f" (configuration `{source['config']}`)" if source.get("config") else ""
        return f"The Hub dataset [`{name}`](https://huggingface.co/datasets/{name}){config}; {counts} documents."
    if source.get("kind") == "files":
        files = ", ".join(f"`{Path(f).name}`" for f in source.get("train_files", []))
        return f"Local files {files}; {counts} documents."
    return "Not recorded."


def build_model_card(
    config: dict,
    *,
    repo_id: str,
    training: dict | None = None,
    evaluation: dict | None = None,
    figures: list[str] = (),
    num_parameters: int | None = None,
) -> str:
    """The README.md of a LongNet repository: metadata, usage, configuration, training data and run, and the
    evaluation tables and figures (``figures`` are paths inside the repository).

    Args:
        config: the model's config as a dict (``config.to_dict()``).
        repo_id: where it is published (``user/name``), used in the usage example.
        training: the ``training_summary.json`` written by ``scripts/train.py``, if any.
        evaluation: an :class:`~modeling_longnet.evaluation.EvaluationReport` as a dict, if any.
    """
    from huggingface_hub import ModelCardData

    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license="apache-2.0",
        tags=["longnet", "dilated-attention", "long-context", "custom_code"],
    )
    name = repo_id.split("/")[-1]
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        f"# {name}",
        "",
        (
            f"A LongNet causal language model ([Ding et al. 2023]({PAPER})): a decoder whose self-attention is "
            "dilated attention, a mixture of branches (segment length w, dilation rate r) in which a token attends "
            "the tokens of its segment whose position is congruent to its head's offset modulo r. The cost grows "
            "linearly with the sequence length while the longest branches span the whole context. Built with the "
            "`modeling_longnet` package (exact dilated attention, KV cache, Triton kernels)."
        ),
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
        'inputs = tokenizer("What is the pass key? The pass key is", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=16)[0]))",
        "```",
        "",
        (
            "The model code is stored in this repository (`modeling_longnet.py` and the modules it imports), hence "
            "`trust_remote_code=True`; where the `modeling_longnet` package is installed, importing it registers the "
            "model with the Auto classes instead."
        ),
        "",
        "## Configuration",
        "",
        "| field | value |",
        "|---|---|",
    ]
    rows = [
        ("parameters", f"{num_parameters:,}" if num_parameters else None),
        ("layers", config.get("num_hidden_layers")),
        ("hidden size", config.get("hidden_size")),
        ("attention heads (key/value)", f"{config.get('num_attention_heads')} ({config.get('num_key_value_heads')})"),
        ("segment lengths w", config.get("segment_lengths")),
        ("dilation rates r", config.get("dilation_rates")),
        ("head offsets", config.get("dilation_offsets")),
        ("position encoding", config.get("position_encoding")),
        ("normalization", config.get("normalization")),
        ("vocabulary", config.get("vocab_size")),
        ("max positions", config.get("max_position_embeddings")),
    ]
    lines += [f"| {field} | `{value}` |" for field, value in rows if value is not None]
    lines += ["", "## Training", ""]
    if training:
        losses = training.get("loss_history") or []
        lines += [
            f"**Data.** {_describe_data(training)}",
            "",
            (
                f"**Run.** {training.get('global_step')} optimizer steps over {training.get('train_tokens', 0):,} "
                f"tokens in contexts of {training.get('block_size')} tokens (packing: "
                f"{training.get('data', {}).get('packing')}), tokenizer `{training.get('tokenizer')}`, precision "
                f"{training.get('precision')}, {training.get('world_size', 1)} process(es), {_describe_time(training)}."
            ),
        ]
        if losses:
            lines += ["", f"Training loss {losses[0][1]:.3f} (step {losses[0][0]}) -> {losses[-1][1]:.3f} (step {losses[-1][0]})."]
        if training.get("eval_loss") is not None:
            lines += [f"Validation loss {training['eval_loss']:.3f} (perplexity {training['eval_perplexity']:.3f})."]
    else:
        lines += ["Not recorded."]
    lines += ["", "## Evaluation", ""]
    if evaluation:
        from .evaluation import EvaluationReport

        report = EvaluationReport.from_dict(evaluation)
        lines += [
            (
                "Perplexity by position in the context, and teacher-forced greedy retrieval accuracy by the distance "
                "(in tokens) between the evidence and the answer; bucket edges lie at the segment lengths "
                f"(`scripts/evaluate.py`, {report.metadata.get('documents', '?')} documents of "
                f"{report.metadata.get('data', '?')})."
            ),
            "",
            report.to_markdown().rstrip(),
        ]
    else:
        lines += ["Not recorded."]
    lines += [f"\n![evaluation]({figure})" for figure in figures]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The folder to upload
# ----------------------------------------------------------------------------------------------------------


def prepare_upload_folder(
    model_dir: str | Path, output_dir: str | Path, *, repo_id: str, evaluation_dir: str | Path | None = None
) -> Path:
    """Writes into ``output_dir`` everything a repository needs: the model re-saved with ``save_pretrained``
    (safetensors weights, config, the model code for ``trust_remote_code=True``), its tokenizer, its training
    summary, the evaluation files of ``evaluation_dir`` (default: ``model_dir/evaluation`` if present) under
    ``evaluation/``, and a model card ``README.md``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import LongNetConfig  # noqa: F401  (importing the package registers LongNet with the Auto classes)

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(model_dir)!r} does not exist or holds no config.json")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ValueError(f"the folder to upload, {str(output_dir)!r}, is not empty")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    missing = [
        f"{reference.split('.')[0]}.py"
        for reference in (model.config.auto_map or {}).values()
        if not (output_dir / f"{reference.split('.')[0]}.py").is_file()
    ]
    if not model.config.auto_map or missing:
        raise ValueError(
            f"save_pretrained did not write the model code ({', '.join(missing) or 'no auto_map'}): the repository "
            "would not load with trust_remote_code=True"
        )

    training = None
    if (model_dir / TRAINING_SUMMARY).is_file():
        shutil.copy2(model_dir / TRAINING_SUMMARY, output_dir / TRAINING_SUMMARY)
        training = json.loads((model_dir / TRAINING_SUMMARY).read_text())
    evaluation, figures = None, []
    evaluation_dir = Path(evaluation_dir) if evaluation_dir is not None else model_dir / "evaluation"
    if evaluation_dir.is_dir():
        (output_dir / "evaluation").mkdir()
        for name in EVALUATION_FILES:
            if (evaluation_dir / name).is_file():
                shutil.copy2(evaluation_dir / name, output_dir / "evaluation" / name)
        if (evaluation_dir / "evaluation.json").is_file():
            evaluation = json.loads((evaluation_dir / "evaluation.json").read_text())
        if (evaluation_dir / "evaluation.png").is_file():
            figures.append("evaluation/evaluation.png")
    card = build_model_card(
        model.config.to_dict(), repo_id=repo_id, training=training, evaluation=evaluation, figures=figures,
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
    (output_dir / "README.md").write_text(card)
    return output_dir


# ----------------------------------------------------------------------------------------------------------
# The upload
# ----------------------------------------------------------------------------------------------------------


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of the HTTP clients huggingface_hub has used (httpx2 now, httpx and requests before)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def upload_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    commit_message: str = "Upload LongNet model",
) -> str:
    """Creates ``repo_id`` (if needed) and commits the content of ``folder`` to it; returns the commit URL.

    ``repo_id`` without a namespace goes to the token's user. ``token`` defaults to huggingface_hub's (``HF_TOKEN``,
    or the one saved by ``hf auth login``), ``endpoint`` to ``HF_ENDPOINT``."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder to upload {str(folder)!r} does not exist")
    token = token or get_token()
    if not token:
        raise HubPublishError("no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        user = api.whoami()["name"]
        if "/" not in repo_id:
            repo_id = f"{user}/{repo_id}"
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    except OfflineModeIsEnabled as error:
        raise HubPublishError(f"offline mode is on (HF_HUB_OFFLINE): unset it to upload ({error})") from error
    except _network_errors() as error:
        raise HubPublishError(f"cannot reach the Hub at {api.endpoint}: {error} (no network? check HF_ENDPOINT)") from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        first_line = str(error).strip().splitlines()[0]
        if status == 401:
            raise HubPublishError(f"the Hub at {api.endpoint} refused the token (401): log in again or pass a valid --token") from error
        if status == 403:
            raise HubPublishError(f"the token may not write to {repo_id!r} (403): use a token with write access") from error
        raise HubPublishError(f"upload to {repo_id!r} failed: {first_line}") from error
    return commit.commit_url
