"""The model a job runs: a checkpoint directory or a random-weight preset."""
from __future__ import annotations

import os

import torch


def is_preset(name: str) -> bool:
    from ..config import PRESETS

    return not os.path.exists(name) and name.lower() in PRESETS


def load_model(spec: str, device: torch.device, dtype: str | None, seed: int = 0):
    """A checkpoint directory, or a preset name (``tiny``, ``3b`` ...) for a random-weight model."""
    from ..api import QwenBatchedVL

    dt = None if dtype in (None, "auto") else dtype
    if is_preset(spec):
        return QwenBatchedVL.from_config(spec.lower(), device=device, dtype=dt, seed=seed)
    return QwenBatchedVL.from_pretrained(spec, device=device, dtype=dt)


def model_id_of(spec: str) -> str:
    return spec.lower() if is_preset(spec) else os.path.basename(os.path.normpath(spec))
