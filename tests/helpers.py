"""Reference models for parity tests: tiny random-weight ``transformers`` Qwen2.5-VL models."""
from __future__ import annotations

import dataclasses

import torch

from qwen_batched.config import ModelConfig, VisionConfig, tiny_config


def tiny_model_config(**vision_overrides) -> ModelConfig:
    cfg = tiny_config()
    if vision_overrides:
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **vision_overrides))
    return cfg


def make_hf_model(cfg: ModelConfig | None = None, seed: int = 0, attn: str = "sdpa"):
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` (fp32, eval) for ``cfg`` (default: tiny).

    Norm weights and biases are randomised too, so a parity test notices a missing or misplaced term.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = cfg or tiny_config()
    torch.manual_seed(seed)
    hf_cfg = Qwen2_5_VLConfig(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = attn
    model = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|"""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
