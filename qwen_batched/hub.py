"""Checkpoint names as ``transformers`` resolves them: a local directory, or a Hugging Face hub id.

A hub id (``"Qwen/Qwen2.5-VL-7B-Instruct"``) is looked up in the local hub cache first (the layout
``models--Qwen--Qwen2.5-VL-7B-Instruct/snapshots/<commit>/`` with ``refs/<revision>`` naming the commit), and
downloaded only when it is not there and the hub may be reached (``HF_HUB_OFFLINE=1`` forbids it).
``huggingface_hub`` (installed with ``transformers``) is imported only for hub ids: local directories need nothing.
"""
from __future__ import annotations

import os

# What loading a checkpoint reads: config, weights, tokenizer and processor files (no pickles, no other formats).
ALLOW_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
                  "processor_config.json",
                  "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja"]


def _offline() -> bool:
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().upper()
    return env in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def _has_weights(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "config.json")) and any(
        os.path.isfile(os.path.join(directory, n)) for n in ("model.safetensors", "model.safetensors.index.json"))


def resolve_checkpoint(name_or_path: str | os.PathLike, *, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> str:
    """The local directory of a checkpoint: ``name_or_path`` itself when it is a directory, else the hub cache's
    snapshot of that hub id at ``revision`` (a branch, tag or commit; default ``main``), downloaded when missing
    and online. ``cache_dir`` replaces the hub cache (default ``HF_HUB_CACHE``, ``~/.cache/huggingface/hub``).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a checkpoint directory or a hub id (str), got "
                        f"{type(name_or_path).__name__}")
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise TypeError(f"revision must be a non-empty str (branch, tag or commit) or None, got {revision!r}")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a path or None, got {type(cache_dir).__name__}")
    name = os.fspath(name_or_path)
    if os.path.isfile(name):
        raise FileNotFoundError(f"{name!r} is a file; pass the checkpoint directory holding it "
                                f"({os.path.dirname(os.path.abspath(name))!r})")
    if os.path.isdir(name):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub ids, but {name!r} is a local directory")
        return name
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError:
        raise FileNotFoundError(f"checkpoint directory {name!r} does not exist (loading it as a hub id needs "
                                f"huggingface_hub: pip install huggingface_hub)") from None
    cache = None if cache_dir is None else os.fspath(cache_dir)
    where = f"the hub cache {cache}" if cache is not None else "the hub cache"
    at = "" if revision is None else f" at revision {revision!r}"
    kw = dict(revision=revision, cache_dir=cache, allow_patterns=ALLOW_PATTERNS)
    try:
        path = snapshot_download(name, local_files_only=True, **kw)
        if _has_weights(path):
            return path
        missing = f"the cached snapshot {path} has no config.json or safetensors weights"
    except HFValidationError:
        raise FileNotFoundError(f"checkpoint directory {name!r} does not exist (and it is not a hub id such as "
                                f"'Qwen/Qwen2.5-VL-7B-Instruct')") from None
    except Exception as e:  # noqa: BLE001 - LocalEntryNotFoundError, IncompleteSnapshotError: not (fully) cached
        missing = f"it is not in {where}{at} ({type(e).__name__})"
    if _offline():
        raise FileNotFoundError(f"{name!r} is not a local directory and {missing}; HF_HUB_OFFLINE is set, so it "
                                f"cannot be downloaded (download it once online, or pass a checkpoint directory)")
    try:
        path = snapshot_download(name, **kw)
    except Exception as e:  # noqa: BLE001 - name the id whatever the hub says
        raise FileNotFoundError(f"{name!r} is not a local directory and could not be fetched from the hub{at}: "
                                f"{type(e).__name__}: {e}") from None
    if not _has_weights(path):
        raise FileNotFoundError(f"hub model {name!r}{at} has no config.json or safetensors weights (in {path})")
    return path
