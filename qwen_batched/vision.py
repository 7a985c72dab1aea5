"""The Qwen2.5-VL vision transformer, encoding every image of a batch in one packed (varlen) pass.

Module names mirror the checkpoint (``visual.blocks.N.attn.qkv`` ...). The Conv3d patch embedding is held as
the equivalent Linear (its weight viewed as (hidden, C*T*P*P)).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import varlen_attention
from .config import VisionConfig
from .geometry import VisionGeometry
from .fused import rotary_qkv
from .layers import RMSNorm, SwiGLU


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos, sin, plan, backend: str) -> torch.Tensor:
        N, D = x.shape
        qkv = self.qkv(x).view(N, 3, self.n_heads, self.head_dim)
        # q, k rotated in fp32, each (N, H, hd); the CUDA varlen kernels want v dense too (copied in the same kernel)
        q, k, v = rotary_qkv(qkv, cos, sin, copy_v=backend != "sdpa")
        o = varlen_attention(q, k, v, plan, backend)  # (N, H, hd)
        return self.proj(o.reshape(N, D))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x, cos, sin, plan, backend: str) -> torch.Tensor:
        a = self.attn(self.norm1(x), cos, sin, plan, backend)
        x, h = self.norm2.add_and_norm(x, a)  # x + a and its norm
        return x + self.mlp(h)


class PatchMerger(nn.Module):
    """RMSNorm -> group m*m neighbouring patches -> Linear -> GELU -> Linear."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N/mu, out)
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.patch_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.full_blocks = frozenset(cfg.fullatt_block_indexes)
        # state dicts hold the config's MLP width whatever ``align_mlp`` made of it (checkpoints stay loadable)
        self._register_state_dict_hook(_mlp_state_to_config_width)
        self._register_load_state_dict_pre_hook(_mlp_state_to_own_width, with_module=True)

    def forward(self, pixel_values: torch.Tensor, geo: VisionGeometry, backend: str,
                return_pre_merger: bool = False) -> torch.Tensor:
        """pixel_values (N, C*T*P*P) of the images ``geo`` was built for (checked by the caller) -> merged
        (N/mu, out) in raster order per image, or with ``return_pre_merger`` the block output (N, hidden) in input
        patch order."""
        cfg, w = self.cfg, self.patch_embed.proj.weight
        mu = cfg.merge_unit
        assert pixel_values.shape[0] == geo.window_index.shape[0] * mu, "geometry built for other grids"
        x = self.patch_embed(pixel_values.to(device=w.device, dtype=w.dtype))  # (N, D)
        x = x.view(-1, mu, cfg.hidden_size)[geo.window_index].view(-1, cfg.hidden_size)  # window order
        for i, blk in enumerate(self.blocks):
            plan = geo.full_plan if i in self.full_blocks else geo.window_plan
            x = blk(x, geo.cos, geo.sin, plan, backend)
        if return_pre_merger:
            return x.view(-1, mu, cfg.hidden_size)[geo.reverse_index].view(-1, cfg.hidden_size)
        return self.merger(x)[geo.reverse_index]


def align_mlp(tower: VisionTransformer, multiple: int) -> None:
    """Widen every block's MLP to a multiple of ``multiple`` units with zero units (or trim it back to the
    config's width). Why: the published 3B/7B towers have 3420 units, which is not a multiple of 8; in fp16/bf16 the
    (N, 3420) activations and the down projection's rows are then not 16-byte aligned, which keeps cuBLAS off its
    fastest tensor-core kernels for the three GEMMs holding two thirds of the tower's FLOPs (the 32B/72B towers have
    3456). A zero unit adds exactly zero: silu(0 + 0) * (0 + 0) = 0 through zero columns of the down projection."""
    width = -(-tower.cfg.intermediate_size // multiple) * multiple
    for blk in tower.blocks:
        mlp = blk.mlp
        have = mlp.gate_proj.weight.shape[0]
        if have == width:
            continue
        for lin in (mlp.gate_proj, mlp.up_proj):  # output units: rows of the weight, entries of the bias
            lin.weight = nn.Parameter(_resize(lin.weight, 0, width), requires_grad=False)
            if lin.bias is not None:
                lin.bias = nn.Parameter(_resize(lin.bias, 0, width), requires_grad=False)
            lin.out_features = width
        mlp.down_proj.weight = nn.Parameter(_resize(mlp.down_proj.weight, 1, width), requires_grad=False)
        mlp.down_proj.in_features = width


_MLP_WIDTH_DIMS = (("gate_proj.weight", 0), ("gate_proj.bias", 0), ("up_proj.weight", 0), ("up_proj.bias", 0),
                   ("down_proj.weight", 1))  # the MLP tensors whose dim follows the unit count


def _mlp_state_to_config_width(tower: VisionTransformer, state: dict, prefix: str, _meta) -> None:
    """state_dict hook: an aligned MLP's tensors cut back to the config's width (the padding is zero units)."""
    for i in range(len(tower.blocks)):
        for name, dim in _MLP_WIDTH_DIMS:
            key = f"{prefix}blocks.{i}.mlp.{name}"
            if key in state and state[key].shape[dim] != tower.cfg.intermediate_size:
                state[key] = _resize(state[key], dim, tower.cfg.intermediate_size)


def _mlp_state_to_own_width(tower: VisionTransformer, state: dict, prefix: str, *_args) -> None:
    """load_state_dict pre-hook: tensors of the config's width zero-padded to an aligned MLP's width."""
    for i, blk in enumerate(tower.blocks):
        width = blk.mlp.gate_proj.weight.shape[0]
        for name, dim in _MLP_WIDTH_DIMS:
            key = f"{prefix}blocks.{i}.mlp.{name}"
            if key in state and state[key].shape[dim] == tower.cfg.intermediate_size != width:
                state[key] = _resize(state[key], dim, width)


def _resize(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` cut or zero-padded to ``size`` along ``dim`` (a new contiguous tensor)."""
    if t.shape[dim] >= size:
        return t.narrow(dim, 0, size).contiguous()
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)
