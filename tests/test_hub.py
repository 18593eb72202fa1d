"""Hub publishing: the local Hub-compatible server (tests/hub_server.py) against huggingface_hub, the model card,
the upload folder, the upload errors, and the whole round trip: scripts/push_to_hub.py, then
AutoModelForCausalLM.from_pretrained("user/name", trust_remote_code=True) in a process that cannot import
modeling_longnet, generating what the local model generates."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import huggingface_hub
import pytest
from hub_server import serve
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
from scripts_support import (
    assert_clean_failure,
    run_script,
    script_env,
)

from modeling_longnet.hub import HubPublishError, build_model_card, prepare_upload_folder, upload_to_hub

pytest_plugins = ["scripts_support"]  # its fixtures: trained_model, one_torch_thread (autouse)

TOKEN, USER = "hf_test_token", "user"


@pytest.fixture
def hub(monkeypatch):
    """A fresh server; huggingface_hub in this process talks to it without Xet."""
    server = serve({TOKEN: USER})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    yield server
    server.shutdown()
    server.server_close()


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ----------------------------------------------------------------------------------------------------------
# The server speaks huggingface_hub's protocol
# ----------------------------------------------------------------------------------------------------------


def test_server_round_trips_regular_and_lfs_files(hub, tmp_path):
    api = HfApi(endpoint=hub.url, token=TOKEN)
    assert api.whoami()["name"] == USER
    repo = api.create_repo("demo")
    assert repo.repo_id == f"{USER}/demo"
    folder = tmp_path / "upload"
    (folder / "sub").mkdir(parents=True)
    files = {"config.json": b'{"a": 1}', "sub/notes.md": b"# notes\n", "weights.safetensors": bytes(range(256)) * 64}
    for path, content in files.items():
        (folder / path).write_bytes(content)
    commit = api.upload_folder(repo_id=f"{USER}/demo", folder_path=folder, commit_message="first")
    assert any(request.startswith("PUT /lfs-objects/") for request in hub.requests)  # the LFS path was taken

    info = api.model_info(f"{USER}/demo")
    assert info.sha == commit.oid
    assert sorted(s.rfilename for s in info.siblings) == sorted(files)
    assert sorted(api.list_repo_files(f"{USER}/demo")) == sorted(files)
    for path, content in files.items():
        local = hf_hub_download(f"{USER}/demo", path, endpoint=hub.url, cache_dir=tmp_path / "cache", token=TOKEN)
        assert Path(local).read_bytes() == content

    api.upload_file(path_or_fileobj=b"changed", path_in_repo="sub/notes.md", repo_id=f"{USER}/demo")
    assert api.model_info(f"{USER}/demo").sha != commit.oid
    again = hf_hub_download(f"{USER}/demo", "sub/notes.md", endpoint=hub.url, cache_dir=tmp_path / "cache", token=TOKEN)
    assert Path(again).read_bytes() == b"changed"


def test_server_errors_are_the_hubs(hub, tmp_path):
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("demo")
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("demo")
    assert conflict.value.response.status_code == 409
    assert api.create_repo("demo", exist_ok=True).repo_id == f"{USER}/demo"
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=f"{USER}/demo")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(f"{USER}/demo", "missing.json", endpoint=hub.url, cache_dir=tmp_path, token=TOKEN)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{USER}/absent")
    with pytest.raises(HfHubHTTPError) as unauthorized:
        HfApi(endpoint=hub.url, token="wrong").whoami()
    assert unauthorized.value.response.status_code == 401


# ----------------------------------------------------------------------------------------------------------
# Card, folder, upload errors
# ----------------------------------------------------------------------------------------------------------


def test_model_card_describes_config_data_and_evaluation(trained_model):
    config = json.loads((trained_model / "config.json").read_text())
    training = json.loads((trained_model / "training_summary.json").read_text())
    evaluation = json.loads((trained_model / "evaluation" / "evaluation.json").read_text())
    text = build_model_card(config, repo_id="user/tiny", training=training, evaluation=evaluation,
                            figures=["evaluation/evaluation.png"], num_parameters=1234)
    card = ModelCard(text)
    assert card.data.library_name == "transformers" and "custom_code" in card.data.tags
    assert 'from_pretrained("user/tiny", trust_remote_code=True)' in text
    assert "| segment lengths w | `[16, 64, 256]` |" in text and "| parameters | `1,234` |" in text
    assert "embedded default dataset" in text and f"{training['global_step']} optimizer steps" in text
    assert "| distance (tokens) | records | exact match | token accuracy |" in text
    assert "![evaluation](evaluation/evaluation.png)" in text
    bare = build_model_card(config, repo_id="user/tiny")
    assert bare.count("Not recorded.") == 2


def test_model_card_times_only_the_steps_a_resumed_run_trained(trained_model):
    """A run resumed at step 30 of 50 timed 20 steps: the card must not put all 50 steps' tokens over those seconds."""
    config = json.loads((trained_model / "config.json").read_text())
    training = {**json.loads((trained_model / "training_summary.json").read_text()), "global_step": 50,
                "train_tokens": 50_000, "resumed_at_step": 30, "steps_this_run": 20, "tokens_this_run": 20_000,
                "train_seconds": 12.4}
    text = build_model_card(config, repo_id="user/tiny", training=training)
    assert "50 optimizer steps over 50,000 tokens" in text
    assert "resumed at step 30: 12 s for the last 20 steps (20,000 tokens)" in text
    fresh = build_model_card(config, repo_id="user/tiny", training={**training, "resumed_at_step": None})
    assert "resumed" not in fresh and "process(es), 12 s." in fresh


def test_upload_folder_holds_everything_a_repository_needs(trained_model, tmp_path):
    folder = prepare_upload_folder(trained_model, tmp_path / "upload", repo_id="user/tiny")
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert {"README.md", "config.json", "model.safetensors", "modeling_longnet.py", "configuration_longnet.py",
            "dilated_attention.py", "tokenizer.json", "tokenizer_config.json", "training_summary.json",
            "evaluation/evaluation.json", "evaluation/evaluation.md", "evaluation/evaluation.png"} <= files
    assert not any(name.endswith(".bin") for name in files)
    with pytest.raises(ValueError, match="is not empty"):
        prepare_upload_folder(trained_model, folder, repo_id="user/tiny")
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        prepare_upload_folder(tmp_path / "absent", tmp_path / "other", repo_id="user/tiny")


def test_upload_errors_say_what_to_do(hub, tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubPublishError, match="no Hugging Face token: pass --token, set HF_TOKEN"):
        upload_to_hub(tmp_path, "user/x", endpoint=hub.url)
    with pytest.raises(HubPublishError, match=r"refused the token \(401\)"):
        upload_to_hub(tmp_path, "user/x", endpoint=hub.url, token="wrong")
    with pytest.raises(HubPublishError, match="cannot reach the Hub at http://127.0.0.1"):
        upload_to_hub(tmp_path, "user/x", endpoint=_closed_port_url(), token=TOKEN)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        upload_to_hub(tmp_path / "absent", "user/x", endpoint=hub.url, token=TOKEN)
    assert upload_to_hub(tmp_path, "x", endpoint=hub.url, token=TOKEN).startswith(f"{hub.url}/{USER}/x/commit/")


def test_push_to_hub_cli_fails_in_one_line_without_token_or_network(trained_model, tmp_path):
    no_token = run_script("push_to_hub", str(trained_model), "--repo-id", "user/x", "--endpoint", _closed_port_url(),
                          env=script_env(tmp_path / "empty-hf-home", HF_TOKEN=""))
    assert_clean_failure(no_token, "no Hugging Face token")
    no_network = run_script("push_to_hub", str(trained_model), "--repo-id", "user/x", "--endpoint", _closed_port_url(),
                            "--token", TOKEN, env=script_env(tmp_path / "hf"))
    assert_clean_failure(no_network, "cannot reach the Hub at http://127.0.0.1")


# ----------------------------------------------------------------------------------------------------------
# The round trip
# ----------------------------------------------------------------------------------------------------------


def test_pushed_model_loads_from_the_hub_without_the_package_and_generates_the_same(hub, trained_model, tmp_path):
    env = script_env(tmp_path / "hf-home", HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN)
    pushed = run_script("push_to_hub", str(trained_model), "--repo-id", f"{USER}/tiny-longnet", env=env)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    assert f"uploaded to {hub.url}/{USER}/tiny-longnet/commit/" in pushed.stdout
    siblings = {s.rfilename for s in HfApi(endpoint=hub.url, token=TOKEN).model_info(f"{USER}/tiny-longnet").siblings}
    assert {"README.md", "model.safetensors", "modeling_longnet.py", "tokenizer.json", "evaluation/evaluation.png"} <= siblings

    arguments = ["--trust-remote-code", "--prompt", "A pass key is hidden in the text below.", "--max-new-tokens", "12"]
    from_hub = run_script("generate", f"{USER}/tiny-longnet", *arguments, env=env, cwd=tmp_path, isolated=True)
    assert from_hub.returncode == 0, from_hub.stderr[-3000:]
    assert f"model code loaded from: {tmp_path / 'hf-home'}" in from_hub.stderr  # the Hub download's module cache
    local_env = script_env(tmp_path / "hf-local", HF_HUB_OFFLINE="1")
    from_folder = run_script("generate", str(trained_model), *arguments, env=local_env, cwd=tmp_path, isolated=True)
    assert from_folder.returncode == 0, from_folder.stderr[-3000:]
    assert from_hub.stdout == from_folder.stdout
    assert any(r.startswith(f"GET /{USER}/tiny-longnet/resolve/") and r.endswith("/model.safetensors") for r in hub.requests)
