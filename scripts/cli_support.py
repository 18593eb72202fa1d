"""What the command lines of scripts/ share, in the standard library only: each script imports it before torch and
transformers (10-14 s), so that a bad argument is answered at once. Also where modeling_longnet cannot be imported
(generate.py runs in such a process in the main job). check_device alone imports torch: the scripts call it once
they have imported it themselves."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

HUB_TIMEOUT = 10.0  # seconds for the one look-up of a Hub id, before loading it

# The attention functions a LongNet takes by name: DilatedAttentionInterface's in modeling_longnet/modeling_longnet.py
# (a test keeps the two alike). Named here so that a typo is refused before torch is imported.
LONGNET_ATTENTIONS = ("auto", "torch", "triton", "cudnn", "flash", "eager")

# "cpu", "cuda", "cuda:1", "mps", ...: a device type and an optional index. Whether torch knows the type, and
# whether this machine has it, is asked of torch once it is imported (check_device).
TORCH_DEVICE = re.compile(r"[a-z][a-z0-9_]*(:\d+)?")


def one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def parse_size(text: str) -> int:
    """``4096``, ``4K`` (4 * 1024) or ``1M`` (1024 * 1024): a sequence length or size on a command line."""
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def size_list(text: str) -> list[int]:
    """``4K,64K,1M``: a comma-separated list of sizes (see :func:`parse_size`); an argparse ``type``."""
    return [parse_size(part) for part in text.split(",")]


def parse_sizes(parser, option: str, text: str, example: str) -> list[int]:
    """A comma-separated list of positive sizes, or ``parser.error`` naming ``option``."""
    try:
        sizes = size_list(text)
    except ValueError:
        parser.error(f"{option}: {text!r} is not a comma-separated list of sizes (e.g. {example})")
    if not all(size > 0 for size in sizes):
        parser.error(f"{option}: every length must be positive, got {sizes}")
    return sizes


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` means a local path rather than a Hub id ("user/name"): it starts with ./ ../ / or ~, has more
    than one '/', holds an OS path separator (Windows' '\\'), or exists."""
    separators = {os.sep, os.altsep} - {None, "/"}
    return (
        name in (".", "..") or name.startswith(("./", "../", "/", "~")) or os.path.isabs(name) or name.count("/") > 1
        or any(separator in name for separator in separators) or os.path.exists(name)
    )


def check_model(name: str, revision: str | None = None) -> None:
    """Fails at once on a model that is neither a local folder nor on the Hub, before the slow imports and the
    loaders' retries: a path that does not exist; else (a Hub id) one quick question to the Hub, or to its local
    cache in offline mode (HF_HUB_OFFLINE)."""
    if looks_like_local_path(name):
        if not Path(name).expanduser().is_dir():
            raise FileNotFoundError(f"model folder {name!r} does not exist")
        return
    import huggingface_hub
    from huggingface_hub import constants, errors

    def cached() -> bool:
        return isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json", revision=revision), str)

    if constants.HF_HUB_OFFLINE:
        if not cached():
            raise FileNotFoundError(
                f"model {name!r} is not a local folder, and offline mode is on (HF_HUB_OFFLINE) while the Hub cache "
                f"({constants.HF_HUB_CACHE}) does not hold it"
            )
        return
    try:
        huggingface_hub.model_info(name, revision=revision, timeout=HUB_TIMEOUT)
    except errors.GatedRepoError:
        return  # the loaders say how to get access
    except errors.RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"model {name!r} does not exist: there is no local folder of that name, and the Hub "
            f"({constants.ENDPOINT}) has no model {name!r} that this token may see"
        ) from error
    except errors.RevisionNotFoundError as error:
        message = f"model {name!r} has no revision {revision!r} on the Hub ({constants.ENDPOINT})"
        raise FileNotFoundError(message) from error
    except errors.HFValidationError as error:
        raise FileNotFoundError(f"model folder {name!r} does not exist (nor is it a valid Hub id)") from error
    except Exception as error:  # noqa: BLE001  (no network, a proxy, a Hub error: the cache may still serve)
        if not cached():
            raise ConnectionError(
                f"model {name!r} is not a local folder, and the Hub ({constants.ENDPOINT}) cannot be reached to find "
                f"it ({one_line(error)}); check the network, or give a local folder"
            ) from error


def check_output_folder(option: str, path: str) -> None:
    """Refuses an output folder that cannot be made, before any work for it: a path that is a file, or lies inside
    one (making it would fail with FileExistsError or NotADirectoryError only once the results are ready)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{option}: {path!r} is a file; give a folder")
    existing = next((parent for parent in target.parents if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"{option}: {path!r} lies inside the file {str(existing)!r}; give a folder")


def check_output_file(option: str, path: str) -> None:
    """Refuses a file to write at the end of a run (a table, a plot) whose folder does not exist, before the run
    rather than after it."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{option}: {path!r} is a folder; give a file name")
    if not target.parent.is_dir():
        raise ValueError(
            f"{option}: the folder of {path!r} ({str(target.parent)!r}) does not exist; create it, or give a file in "
            "an existing folder"
        )


def preset_names() -> list[str] | None:
    """The names LongNetConfig.from_preset takes: the JSON files of configuration/ beside the package (a source
    checkout), else of modeling_longnet/presets (a wheel), as configuration_longnet.PRESETS_DIR finds them, without
    importing the package (its import pulls in torch). None where the package or its presets cannot be found: the
    loader then says why."""
    try:
        spec = importlib.util.find_spec("modeling_longnet")
    except (ImportError, ValueError):  # hidden, as in main.py's isolated process
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations))).resolve()
    folder = next((path for path in (package.parent / "configuration", package / "presets") if path.is_dir()), None)
    return None if folder is None else sorted(path.stem for path in folder.glob("*.json"))


def unknown_preset_message(option: str, name: str) -> str | None:
    """Why ``name`` is no preset, or None (also where the presets cannot be found: from_preset then says why)."""
    presets = preset_names()
    if presets is None or name in presets:
        return None
    return f"unknown preset {name!r}: {option} takes one of {', '.join(presets)}"  # from_preset's words, and the flag


def unknown_attention_message(option: str, name: str) -> str | None:
    """Why ``name`` is no LongNet attention function, or None."""
    if name in LONGNET_ATTENTIONS:
        return None
    return (
        f"{option} {name!r} is not a LongNet attention; choose one of {', '.join(LONGNET_ATTENTIONS)} (LongNet's "
        "attention is dilated: the dense 'sdpa' / 'flash_attention_2' of other models do not apply)"
    )


def check_device_name(device: str | None) -> None:
    """Refuses a --device that no torch device string looks like, before torch is imported."""
    if device is not None and not TORCH_DEVICE.fullmatch(device):
        raise ValueError(f"--device {device} is not a torch device (cpu, cuda, cuda:1, ...)")


def check_device(device: str | None) -> None:
    """Refuses a --device that torch does not know, or that this machine does not have; right after torch is
    imported, before a model is loaded onto it."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"--device {device} is not a torch device (cpu, cuda, cuda:1, ...)") from error
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: no CUDA GPU here; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}; give one of "
                "them, or --device cpu"
            )
    elif parsed.type != "cpu":
        try:  # mps, xpu, ...: whether this build and machine have one
            torch.empty(0, device=parsed)
        except Exception as error:  # noqa: BLE001  (each backend fails in its own way: RuntimeError, AssertionError)
            raise ValueError(f"--device {device}: not available here ({one_line(error)}); use --device cpu") from error
