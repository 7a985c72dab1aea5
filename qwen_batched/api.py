"""``QwenBatchedVL``: the public model object (loading, image encoding, features, generation)."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from .attention import resolve_backend
from .config import ModelConfig, load_generation_eos
from .text import TextModel
from .vision import VisionTransformer


def _default_dtype(device: torch.device, cfg: ModelConfig) -> torch.dtype:
    """The checkpoint's dtype on CUDA (bf16 for the published models), float32 elsewhere."""
    if device.type == "cuda" and cfg.torch_dtype:
        return getattr(torch, str(cfg.torch_dtype).replace("torch.", ""), torch.bfloat16)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _check_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.replace("torch.", ""), None), torch.dtype):
        return getattr(torch, dtype.replace("torch.", ""))
    raise TypeError(f"dtype must be a torch.dtype or its name (e.g. 'bfloat16'), got {dtype!r}")


class QwenBatchedVL(nn.Module):
    """Qwen2.5-VL for whole batches: ``visual`` (vision tower), ``model`` (decoder), ``lm_head``."""

    def __init__(self, cfg: ModelConfig, attn_backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.attn_backend = attn_backend
        self.visual = VisionTransformer(cfg.vision)
        self.model = TextModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.processor = None  # set by the constructors below (BatchedImageProcessor)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def _empty(cls, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, attn_backend: str):
        resolve_backend(attn_backend, device, dtype)  # fail early on an unusable backend
        with torch.device("meta"):
            model = cls(cfg, attn_backend=attn_backend)
        return model

    @classmethod
    def from_config(cls, config_or_name: ModelConfig | str = "tiny", *, device=None, dtype=None, seed: int = 0,
                    attn_backend: str = "auto") -> "QwenBatchedVL":
        """A model with random weights (std 0.02 linears/embeddings, unit norms): demos, tests, benchmarks."""
        if isinstance(config_or_name, str):
            cfg = ModelConfig.from_name(config_or_name)
        elif isinstance(config_or_name, ModelConfig):
            cfg = config_or_name.validate()
        else:
            raise TypeError(f"config_or_name must be a ModelConfig or a preset name, got {type(config_or_name).__name__}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = _check_dtype(dtype) or _default_dtype(device, cfg)
        model = cls._empty(cfg, device, dtype, attn_backend)
        gen = torch.Generator(device=device).manual_seed(int(seed))
        state = {}
        for name, p in model.state_dict().items():  # materialise straight on the device, in the target dtype
            t = torch.empty(p.shape, device=device, dtype=dtype)
            if p.dim() == 1:  # 1-D weights are norm scales, the rest biases
                t.fill_(1.0) if name.endswith(".weight") else t.zero_()
            else:
                t.normal_(0.0, 0.02, generator=gen)
            state[name] = t
        if cfg.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model = model.eval().requires_grad_(False)
        model._attach_processor(None)
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device=None, dtype=None,
                        attn_backend: str = "auto") -> "QwenBatchedVL":
        """Load a checkpoint directory (``config.json`` + safetensors, single file or sharded)."""
        from .loading import load_state_dict

        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a checkpoint directory path, got {type(path).__name__}")
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
        cfg = ModelConfig.from_json(path)
        eos = load_generation_eos(path)
        if eos:
            import dataclasses
            cfg = dataclasses.replace(cfg, eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + eos)))
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = _check_dtype(dtype) or _default_dtype(device, cfg)
        model = cls._empty(cfg, device, dtype, attn_backend)
        state = load_state_dict(path, model, device=device, dtype=dtype)
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model = model.eval().requires_grad_(False)
        model._attach_processor(path)
        return model

    @classmethod
    def from_hf(cls, hf_model, *, attn_backend: str = "auto") -> "QwenBatchedVL":
        """Wrap a loaded ``Qwen2_5_VLForConditionalGeneration``, sharing its tensors (no copy)."""
        from .loading import convert_state_dict

        if not hasattr(hf_model, "state_dict") or not hasattr(hf_model, "config"):
            raise TypeError(f"hf_model must be a transformers Qwen2_5_VLForConditionalGeneration, got {type(hf_model).__name__}")
        cfg = ModelConfig.from_dict(hf_model.config.to_dict())
        param = next(hf_model.parameters())
        model = cls._empty(cfg, param.device, param.dtype, attn_backend)
        sd = {k: v.detach() for k, v in hf_model.state_dict(keep_vars=True).items()}
        state = convert_state_dict(sd, model, device=param.device, dtype=param.dtype)
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model = model.eval().requires_grad_(False)
        model._attach_processor(None)
        return model

    def _attach_processor(self, path: str | None) -> None:
        try:
            from .processor import load_processor
        except ImportError:  # processor module not available
            self.processor = None
            return
        self.processor = load_processor(path, self.cfg)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    # ------------------------------------------------------------------ vision
    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, *,
                      return_pre_merger: bool = False) -> torch.Tensor:
        """Encode every image of a batch in one varlen pass.

        pixel_values: (sum t*h*w, C*T*P*P) patch rows as the processor emits them.
        image_grid_thw: (n_images, 3) int.
        Returns (sum t*h*w/4, out_hidden): images concatenated in input order, each in raster order. With
        ``return_pre_merger=True``: (sum t*h*w, hidden) ViT output before the merger, in input patch order.
        """
        return self.visual(pixel_values, image_grid_thw, backend=self.attn_backend,
                           return_pre_merger=return_pre_merger)
