"""Every ```python block of README.md runs, as written, in a fresh ``python`` process on the CPU, offline.

Each block runs alone (nothing carries over from the block above it), with a temporary folder as its working
directory. A block that reads a folder a user would already have gets it from a fixture that creates it there
first, keyed by the path the block names (see ``USER_FILES``):

- ``"my-longnet"``: a tiny ``LongNetForCausalLM`` (preset ``"tiny"``) saved with ``save_pretrained``, what the
  block "The model" saves; given to the blocks that load it without saving it ("Attention implementations",
  "Generation").
- ``"path/to/llama"``: a tiny ``LlamaForCausalLM`` (the config of tests/test_conversion.py), for "From Llama".

A block that saves the folder itself ("The model" saves ``my-longnet``) gets nothing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts_support import REPO_ROOT, script_env

README = REPO_ROOT / "README.md"
FENCE = re.compile(r"^```(?P<info>[^`]*)$")
HEADING = re.compile(r"^(?:#+\s+(?P<heading>.+?)|\*\*(?P<bold>[^*]+?)[.:]?\*\*.*)$")


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(id, code) of every fenced block whose info string is ``python``, in order; the id is the block's index and
    the heading (or bold lead-in) above it."""
    blocks, heading, code, inside = [], "top", None, False
    for line in text.splitlines():
        fence = FENCE.match(line.strip()) if line.startswith("```") else None
        if fence and not inside:
            inside, code = True, ([] if fence["info"].strip() == "python" else None)
        elif fence and inside:
            if code is not None:
                slug = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")
                blocks.append((f"{len(blocks)}-{slug}", "\n".join(code) + "\n"))
            inside, code = False, None
        elif inside:
            if code is not None:
                code.append(line)
        elif match := HEADING.match(line):
            heading = (match["heading"] or match["bold"]).strip("`")
    assert not inside, "README.md ends inside a fenced block"
    return blocks


BLOCKS = readme_blocks(README.read_text())


def make_tiny_longnet(path: Path) -> None:
    import torch

    from modeling_longnet import LongNetConfig, LongNetForCausalLM

    torch.manual_seed(0)
    LongNetForCausalLM(LongNetConfig.from_preset("tiny")).save_pretrained(path)


def make_tiny_llama(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(path)


# the folders a user would have before running a block, by the path the block names
USER_FILES = {"my-longnet": make_tiny_longnet, "path/to/llama": make_tiny_llama}


def user_files(code: str) -> list[str]:
    """The paths of USER_FILES that ``code`` names in quotes without saving them itself."""
    return [
        name for name in USER_FILES
        if f'"{name}"' in code and not re.search(rf'save_pretrained\(\s*"{re.escape(name)}"', code)
    ]


@pytest.fixture
def readme_cwd(tmp_path, request) -> Path:
    """A fresh working directory holding the USER_FILES that the block of this test reads."""
    code = dict(BLOCKS)[request.node.callspec.params["block_id"]]
    for name in user_files(code):
        USER_FILES[name](tmp_path / name)
    return tmp_path


def test_readme_has_python_blocks_and_each_is_collected():
    text = README.read_text()
    fences = [line.strip()[3:].strip() for line in text.splitlines() if line.lstrip().startswith("```")]
    openings = fences[::2]  # fences alternate: opening (with its info string), closing
    python_like = [info for info in openings if info.lower() in {"python", "py", "python3", "pycon", "ipython"}]
    assert python_like and set(python_like) == {"python"}, f"python blocks must be fenced ```python: {python_like}"
    assert len(BLOCKS) == len(python_like) == text.count("\n```python\n") > 0
    assert len({block_id for block_id, _ in BLOCKS}) == len(BLOCKS)
    assert all(code.strip() for _, code in BLOCKS)
    # every USER_FILES fixture is used by some block, so that none lingers after the README changes
    assert {name for _, code in BLOCKS for name in user_files(code)} == set(USER_FILES)


@pytest.mark.transformers_versions
@pytest.mark.parametrize("block_id", [block_id for block_id, _ in BLOCKS])
def test_readme_block_runs(block_id, readme_cwd):
    code = dict(BLOCKS)[block_id]
    env = script_env(readme_cwd / "hf-home", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=readme_cwd, env=env, capture_output=True, text=True, timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"README block {block_id} failed:\n{code}\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
