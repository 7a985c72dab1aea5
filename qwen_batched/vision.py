"""The Qwen2.5-VL vision transformer, encoding every image of a batch in one packed (varlen) pass.

Module names mirror the checkpoint (``visual.blocks.N.attn.qkv`` ...). The Conv3d patch embedding is held as
the equivalent Linear (its weight viewed as (hidden, C*T*P*P)).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import resolve_backend, varlen_attention
from .config import VisionConfig
from .geometry import GeometryCache, VisionGeometry
from .fused import rotary_qk
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
        qk = rotary_qk(qkv, cos, sin)  # (N, 2H, hd): q and k rotated at once, in fp32
        q, k = qk.view(N, 2, self.n_heads, self.head_dim).unbind(1)  # each (N, H, hd)
        v = qkv[:, 2]
        if backend != "sdpa":  # the CUDA varlen kernels want dense (N, H, hd)
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
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
        x = x + self.attn(self.norm1(x), cos, sin, plan, backend)
        return x + self.mlp(self.norm2(x))


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
        self.geometry_cache = GeometryCache()

    def geometry(self, image_grid_thw: torch.Tensor, n_rows: int, backend: str) -> VisionGeometry:
        """Validate ``image_grid_thw`` against the pixel rows and return the (cached) batch geometry."""
        grids = self.validate_grids(image_grid_thw, n_rows)
        return self.geometry_cache.get(grids, self.cfg, self.patch_embed.proj.weight.device, backend)

    def validate_grids(self, image_grid_thw: torch.Tensor, n_rows: int, *, name: str = "image_grid_thw",
                       pixels: str = "pixel_values") -> tuple[tuple[int, int, int], ...]:
        """``image_grid_thw`` as host tuples (the one host sync per batch), checked against the pixel rows.
        ``name`` / ``pixels``: the argument names errors report (videos: video_grid_thw / pixel_values_videos)."""
        items = "n_videos" if "video" in name else "n_images"
        if not isinstance(image_grid_thw, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape ({items}, 3), got {type(image_grid_thw).__name__}")
        if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3 or image_grid_thw.shape[0] == 0:
            raise ValueError(f"{name} must have shape ({items} >= 1, 3), got {tuple(image_grid_thw.shape)}")
        if image_grid_thw.dtype.is_floating_point or image_grid_thw.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {image_grid_thw.dtype}")
        grids = tuple(tuple(g) for g in image_grid_thw.tolist())  # the one host sync per batch
        m = self.cfg.spatial_merge_size
        bad = [g for g in grids if g[0] < 1 or g[1] < m or g[2] < m or g[1] % m or g[2] % m]
        if bad:
            raise ValueError(f"{name} rows must be (t >= 1, h, w) with h, w positive multiples of "
                             f"spatial_merge_size={m}; got {bad[:3]}")
        total = sum(t * h * w for t, h, w in grids)
        if total != n_rows:
            raise ValueError(f"{pixels} has {n_rows} patch rows but {name} describes {total} "
                             f"(sum of t*h*w)")
        return grids

    def check_pixels(self, pixel_values: torch.Tensor, name: str = "pixel_values") -> None:
        pd = self.cfg.patch_dim
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 2 or pixel_values.shape[1] != pd:
            raise ValueError(f"{name} must have shape (n_patches, {pd}), got {tuple(pixel_values.shape)}")
        if not pixel_values.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point (normalized patches), got {pixel_values.dtype}")

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, backend: str = "auto",
                return_pre_merger: bool = False) -> torch.Tensor:
        """pixel_values (N, C*T*P*P), image_grid_thw (n, 3) -> merged (N/mu, out) in raster order per image,
        or with ``return_pre_merger`` the block output (N, hidden) in input patch order."""
        cfg, w = self.cfg, self.patch_embed.proj.weight
        self.check_pixels(pixel_values)
        backend = resolve_backend(backend, w.device, w.dtype)
        geo = self.geometry(image_grid_thw, pixel_values.shape[0], backend)
        mu = cfg.merge_unit
        x = self.patch_embed(pixel_values.to(device=w.device, dtype=w.dtype))  # (N, D)
        x = x.view(-1, mu, cfg.hidden_size)[geo.window_index].view(-1, cfg.hidden_size)  # window order
        for i, blk in enumerate(self.blocks):
            plan = geo.full_plan if i in self.full_blocks else geo.window_plan
            x = blk(x, geo.cos, geo.sin, plan, backend)
        if return_pre_merger:
            return x.view(-1, mu, cfg.hidden_size)[geo.reverse_index].view(-1, cfg.hidden_size)
        return self.merger(x)[geo.reverse_index]
