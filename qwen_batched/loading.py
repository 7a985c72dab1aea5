"""Checkpoint loading: safetensors only (never pickle), memory-mapped, straight to the target device/dtype.

Accepts the on-disk key names of the published checkpoints (``visual.*``, ``model.layers.*``, ``lm_head``)
and the in-memory names of ``transformers`` 5 (``model.visual.*``, ``model.language_model.*``).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn as nn

from .config import read_json

_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))
PATCH_EMBED = "visual.patch_embed.proj.weight"
# (parameter name, full shape) -> index of the part this process keeps, or None for all (tensor parallelism)
Select = Callable[[str, tuple[int, ...]], "tuple[slice, ...] | None"]


def normalize_key(key: str) -> str:
    """Checkpoint key -> our parameter name."""
    for src, dst in _PREFIXES:
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (single file or sharded via the index)."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} is not a safetensors index: it has no \"weight_map\" object")
        files = [os.path.join(path, name) for name in dict.fromkeys(weight_map.values())]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {missing}")
        return files
    if os.path.isfile(single):
        return [single]
    pickles = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {pickles}: pickle checkpoints are not loaded; convert them to safetensors)" if pickles else ""
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}{hint}")


def _iter_safetensors(files: list[str], device: torch.device, select: Select | None = None
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) per stored tensor; with ``select``, only the selected slice is read (memory-mapped)."""
    from safetensors import safe_open

    dev = "cpu" if device.type == "meta" else str(device)
    for fname in files:
        try:
            with safe_open(fname, framework="pt", device=dev) as f:
                for key in f.keys():
                    part = f.get_slice(key) if select is not None else None
                    idx = select(normalize_key(key), tuple(part.get_shape())) if part is not None else None
                    # a slice is a view of the whole mapped tensor: copy it out so only the slice stays in memory
                    yield key, f.get_tensor(key) if idx is None else part[idx].clone()
        except Exception as e:  # SafetensorsError / OSError on truncated or corrupt files
            raise ValueError(f"cannot read safetensors file {fname!r} (truncated or corrupt?): {e}") from None


def _expected(model: nn.Module) -> dict[str, torch.Size]:
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def convert_state_dict(tensors: Mapping[str, torch.Tensor] | Iterator[tuple[str, torch.Tensor]], model: nn.Module,
                       *, device: torch.device, dtype: torch.dtype, select: Select | None = None) -> dict[str, torch.Tensor]:
    """Rename, reshape (Conv3d patch embedding -> Linear) and check checkpoint tensors against ``model``.

    Raises ValueError naming every missing, unexpected or mis-shaped key. Tensors already on the right
    device/dtype are shared, not copied. ``select`` picks a tied ``lm_head``'s slice of the embeddings.
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    expected = _expected(model)
    out: dict[str, torch.Tensor] = {}
    unexpected, misshaped, seen = [], [], set()
    for key, t in items:
        name = normalize_key(key)
        if name not in expected:
            if name == "lm_head.weight" and model.cfg.tie_word_embeddings:
                continue  # some re-saved tied checkpoints still store it
            unexpected.append(key)
            continue
        if name == PATCH_EMBED and t.dim() == 5:
            t = t.reshape(t.shape[0], -1)
        seen.add(name)
        if t.shape != expected[name]:
            misshaped.append(f"{key}: checkpoint {tuple(t.shape)} vs model {tuple(expected[name])}")
            continue
        out[name] = t.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - seen)
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {missing[:20]}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:20]}")
        if misshaped:
            parts.append(f"wrongly shaped tensors ({len(misshaped)}): {misshaped[:20]}")
        raise ValueError("checkpoint does not match the model config: " + "; ".join(parts))
    if model.cfg.tie_word_embeddings:
        emb = out["model.embed_tokens.weight"]
        idx = select("lm_head.weight", tuple(emb.shape)) if select is not None else None
        out["lm_head.weight"] = emb if idx is None else emb[idx]
    return out


def load_state_dict(path: str, model: nn.Module, *, device: torch.device, dtype: torch.dtype,
                    select: Select | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor of the checkpoint at ``path`` onto ``device`` as ``dtype``, checked against ``model``.
    With ``select`` (tensor parallelism) only each tensor's selected slice is read."""
    files = checkpoint_files(path)
    return convert_state_dict(_iter_safetensors(files, device, select), model, device=device, dtype=dtype,
                              select=select)
