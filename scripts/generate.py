#!/usr/bin/env python
"""Generate text with a saved LongNet (a folder or a Hub id), streaming the tokens as they come.

Needs only transformers: where the modeling_longnet package is not installed, pass --trust-remote-code to run
the model code saved beside the weights (train.py and push_to_hub.py save it there).

Examples:
    python scripts/generate.py outputs/tiny --prompt "What is the pass key? The pass key is"
    python scripts/generate.py user/longnet-tiny --trust-remote-code --prompt-file long_prompt.txt \\
        --max-new-tokens 200 --do-sample --temperature 0.8 --top-p 0.95
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "generate.py"

# the shared checks beside this script (a run through runpy, as in main.py's isolated process, does not put
# the script's folder on sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_support import check_device, check_device_name, check_model, one_line  # noqa: E402
DEFAULT_PROMPT = "The old sailor"
# What --do-sample samples with where a flag is left out. The flags default to None, so that one given without
# --do-sample (which would do nothing) can be told from one left out.
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="a saved model: folder or Hub id (user/name)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="run the model code stored with the model (needed where modeling_longnet is not installed)",
    )
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help=f"the text to continue (default: {DEFAULT_PROMPT!r})")
    prompt.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    prompt.add_argument(
        "--prompts-jsonl", default=None,
        help="continue many prompts: a JSON lines file of objects with a 'prompt' field; prints each object back "
        "as one JSON line with the continuation added as 'generated'",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument(
        "--temperature", type=float, default=None,
        help=f"sampling temperature (with --do-sample; default {SAMPLING_DEFAULTS['temperature']})",
    )
    parser.add_argument(
        "--top-k", type=int, default=None,
        help=f"sample among the k most likely tokens (with --do-sample; default {SAMPLING_DEFAULTS['top_k']})",
    )
    parser.add_argument(
        "--top-p", type=float, default=None,
        help=f"nucleus sampling mass (with --do-sample; default {SAMPLING_DEFAULTS['top_p']})",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    parser.add_argument("--no-prompt-echo", action="store_true", help="print only the generated text, not the prompt")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="weights' dtype")
    return parser


def check_arguments(args: argparse.Namespace) -> str | list[dict]:
    """Refuses a bad command line before torch and transformers are imported (10-14 s); returns the prompt, or for
    --prompts-jsonl its objects (each with a non-empty 'prompt')."""
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    given = [f"--{name.replace('_', '-')}" for name in SAMPLING_DEFAULTS if getattr(args, name) is not None]
    if given and not args.do_sample:  # greedy decoding would ignore them
        flags, apply, them = (" and ".join(given), "apply", "them") if len(given) > 1 else (given[0], "applies", "it")
        raise ValueError(f"{flags} {apply} only with --do-sample: add it, or drop {them}")
    if args.do_sample:
        temperature, top_k, top_p = (sampling_option(args, name) for name in ("temperature", "top_k", "top_p"))
        if not temperature > 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError("sampling needs --temperature > 0, 0 < --top-p <= 1 and --top-k >= 0")
    check_device_name(args.device)
    if args.prompts_jsonl is not None:
        if not Path(args.prompts_jsonl).is_file():
            raise FileNotFoundError(f"--prompts-jsonl {args.prompts_jsonl!r} does not exist")
        items = []
        for number, line in enumerate(Path(args.prompts_jsonl).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"--prompts-jsonl line {number}: not JSON ({error.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
                raise ValueError(f"--prompts-jsonl line {number}: needs an object with a non-empty string 'prompt'")
            items.append(item)
        if not items:
            raise ValueError(f"--prompts-jsonl {args.prompts_jsonl!r} holds no prompt")
        check_model(args.model, args.revision)
        return items
    if args.prompt_file is not None:
        if not Path(args.prompt_file).is_file():
            raise FileNotFoundError(f"--prompt-file {args.prompt_file!r} does not exist")
        prompt = Path(args.prompt_file).read_text()
    else:
        prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPT
    if not prompt:
        raise ValueError("the prompt is empty")
    check_model(args.model, args.revision)
    return prompt


def sampling_option(args: argparse.Namespace, name: str):
    """--temperature, --top-k or --top-p as given, else its default."""
    value = getattr(args, name)
    return SAMPLING_DEFAULTS[name] if value is None else value


def load(args: argparse.Namespace) -> tuple:
    """The model, its tokenizer and the prompt (or the --prompts-jsonl objects); everything that can fail on user
    input."""
    prompt_or_items = check_arguments(args)  # before the slow imports: a bad command line is answered at once
    import torch

    check_device(args.device)  # before the model is loaded for it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import modeling_longnet  # noqa: F401  (registers LongNet with the Auto classes, where installed)
    except ImportError:
        pass
    options = {"revision": args.revision, "trust_remote_code": args.trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(args.model, **options)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), **options)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval(), tokenizer, prompt_or_items


def generate(args: argparse.Namespace, model, tokenizer, prompt: str, *, stream: bool = True) -> str:
    """Streams the continuation of ``prompt`` to stdout (unless ``stream`` is false) and returns it."""
    import torch
    from transformers import TextStreamer

    torch.manual_seed(args.seed)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=args.no_prompt_echo, skip_special_tokens=True) if stream else None
    sampling = {"do_sample": False}
    if args.do_sample:
        sampling = {"do_sample": True, **{name: sampling_option(args, name) for name in SAMPLING_DEFAULTS}}
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, streamer=streamer,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **sampling,
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, tokenizer, prompt_or_items = load(args)
    except (FileNotFoundError, ValueError, TypeError, ImportError, ConnectionError, OSError) as error:
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return 1
    if isinstance(prompt_or_items, list):  # --prompts-jsonl
        for item in prompt_or_items:
            print(json.dumps({**item, "generated": generate(args, model, tokenizer, item["prompt"], stream=False)}), flush=True)
        return 0
    generate(args, model, tokenizer, prompt_or_items)
    return 0


if __name__ == "__main__":
    sys.exit(main())
