"""Saving and loading: the exact round trip, the code written beside the weights, and loading that folder as remote
code in a process that cannot import the package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.dynamic_module_utils import get_relative_import_files

import modeling_longnet
from modeling_longnet import LongNetConfig, LongNetForCausalLM, LongNetForSequenceClassification, LongNetModel

PACKAGE_DIR = Path(modeling_longnet.__file__).parent
# everything the model's code reaches, the optional kernels included
CODE_FILES = {
    "modeling_longnet.py",
    "configuration_longnet.py",
    "cache_longnet.py",
    "dilated_attention.py",
    "dilated_attention_pattern.py",
    "dilated_attention_torch.py",
    "dilated_attention_triton.py",
    "dilated_attention_flash.py",
}


def tiny(model_class, **overrides):
    torch.manual_seed(0)
    return model_class(LongNetConfig.from_preset("tiny", **overrides)).eval()


@pytest.mark.transformers_versions
@pytest.mark.parametrize("model_class", [LongNetForCausalLM, LongNetForSequenceClassification, LongNetModel])
def test_save_and_load_round_trip_is_exact(tmp_path, model_class):
    model = tiny(model_class, num_labels=3, position_encoding="xpos", normalization="sub_layernorm", gated_mlp=False)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = type(model).from_pretrained(tmp_path).eval()
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    ids = torch.randint(3, 128, (2, 30))
    assert torch.equal(model(ids)[0], loaded(ids)[0])


@pytest.mark.transformers_versions
def test_tied_embeddings_stay_tied_through_a_round_trip(tmp_path):
    tiny(LongNetForCausalLM, tie_word_embeddings=True).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.transformers_versions
def test_saved_folder_carries_all_the_code_and_a_complete_auto_map(tmp_path):
    tiny(LongNetForCausalLM).save_pretrained(tmp_path)
    needed = {Path(f).name for f in get_relative_import_files(PACKAGE_DIR / "modeling_longnet.py")} | {
        "modeling_longnet.py"
    }
    assert CODE_FILES <= needed  # the optional kernels included
    assert needed <= {p.name for p in tmp_path.iterdir()}
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_longnet.LongNetConfig",
        "AutoModel": "modeling_longnet.LongNetModel",
        "AutoModelForCausalLM": "modeling_longnet.LongNetForCausalLM",
        "AutoModelForSequenceClassification": "modeling_longnet.LongNetForSequenceClassification",
    }


@pytest.mark.transformers_versions
def test_auto_classes_load_the_native_classes(tmp_path):
    tiny(LongNetForCausalLM).save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is LongNetConfig
    assert type(AutoModel.from_pretrained(tmp_path)) is LongNetModel
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is LongNetForCausalLM
    assert (
        type(AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2))
        is LongNetForSequenceClassification
    )


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, importlib.util, sys
    import torch

    class Blocker(importlib.abc.MetaPathFinder):  # even an installed copy of the package must not be found
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_longnet" or name.startswith("modeling_longnet."):
                raise ImportError("the package is hidden from this process")

    sys.meta_path.insert(0, Blocker())
    try:
        import modeling_longnet  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("modeling_longnet is importable")

    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    folder, hub_id, expected = sys.argv[1], sys.argv[2], torch.load(sys.argv[3])
    # from the local Hub cache, offline
    hub_model = AutoModelForCausalLM.from_pretrained(hub_id, trust_remote_code=True).eval()
    assert torch.equal(hub_model(expected["ids"]).logits, expected["logits"])
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__name__ == "LongNetConfig" and "transformers_modules" in type(config).__module__, type(config)
    ids = expected["ids"]
    lm = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert "transformers_modules" in type(lm).__module__
    assert torch.equal(lm(ids).logits, expected["logits"])
    generated = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, expected["generated"])
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert torch.equal(base(ids).last_hidden_state, expected["hidden"])
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, num_labels=2)
    assert classifier(ids).logits.shape == (ids.shape[0], 2)
    print("remote code OK")
    """
)


@pytest.mark.transformers_versions
def test_folder_and_hub_repo_load_as_remote_code_where_the_package_cannot_be_imported(tmp_path):
    model = tiny(LongNetForCausalLM)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    # the same files as a Hub repository in the local Hub cache, which transformers reads offline
    repo = tmp_path / "hf_home" / "hub" / "models--someone--tiny-longnet"
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    ids = torch.randint(3, 128, (2, 17))
    with torch.no_grad():
        expected = {
            "ids": ids,
            "logits": model(ids).logits,
            "hidden": model.model(ids).last_hidden_state,
            "generated": model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0
            ),
        }
    torch.save(expected, tmp_path / "expected.pt")
    (tmp_path / "run.py").write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    result = subprocess.run(
        [sys.executable, "run.py", str(folder), "someone/tiny-longnet", str(tmp_path / "expected.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "remote code OK" in result.stdout
