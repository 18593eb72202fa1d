"""What the command lines of scripts/ share, in the standard library only: each script imports it before torch and
transformers (10-14 s), so that a bad argument is answered at once. Also where modeling_longnet cannot be imported
(generate.py runs in such a process in the main job)."""

from __future__ import annotations

import os
from pathlib import Path

HUB_TIMEOUT = 10.0  # seconds for the one look-up of a Hub id, before loading it


def one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


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
