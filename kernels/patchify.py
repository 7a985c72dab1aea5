"""Fused normalize + patchify: frames (n, F, C, H, W) -> model-ready patch rows (rows, C*T*P*P) float32.

Row order per clip: (t, h-block, w-block, row-in-block, col-in-block) with ``merge x merge`` blocks of patches;
column order (C, T, P, P). Frame ``gt*T + t`` feeds temporal slot ``t`` of temporal group ``gt``; frame indices
past the end are clamped to the last frame, which is the reference's padding (a single image is one frame
repeated ``T`` times, an odd-length clip repeats its last frame). Normalisation is ``(x - mean) / std`` in
float32 with ``mean``/``std`` already in the input's value range (x255 for uint8).

``patchify_reference`` is the torch implementation (any device); ``patchify`` is a Triton kernel (CUDA, or
CPU under ``TRITON_INTERPRET=1``) that reads each input element once and writes each output element once.
"""
from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    triton = tl = None
    HAS_TRITON = False


def _geometry(frames: torch.Tensor, patch_size: int, temporal_patch_size: int, merge_size: int):
    if frames.dim() != 5:
        raise ValueError(f"frames must be (n, F, C, H, W), got shape {tuple(frames.shape)}")
    n, f, c, h, w = frames.shape
    unit = patch_size * merge_size
    if h % unit or w % unit or f < 1:
        raise ValueError(f"frame size {h}x{w} must be a multiple of patch_size*merge_size = {unit} (and F >= 1)")
    return n, f, c, math.ceil(f / temporal_patch_size), h // patch_size, w // patch_size


def patchify_reference(frames: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *, patch_size: int = 14,
                       temporal_patch_size: int = 2, merge_size: int = 2) -> torch.Tensor:
    """frames (n, F, C, H, W) uint8/float; mean, std (C,) float32 -> (n*GT*GH*GW, C*T*P*P) float32."""
    n, f, c, gt, gh, gw = _geometry(frames, patch_size, temporal_patch_size, merge_size)
    t, p, m = temporal_patch_size, patch_size, merge_size
    x = (frames.float() - mean.view(c, 1, 1)) / std.view(c, 1, 1)  # (n, F, C, H, W)
    if f == 1:
        x = x.expand(n, t, c, *x.shape[-2:])  # one image: repeat the frame without copying
    elif f != gt * t:
        x = x.index_select(1, torch.arange(gt * t, device=x.device).clamp_(max=f - 1))  # repeat the last frame
    x = x.reshape(n, gt, t, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # (n, gt, bh, bw, mh, mw, C, T, P, P)
    return x.reshape(n * gt * gh * gw, c * t * p * p)


if HAS_TRITON:

    @triton.jit
    def _patchify_kernel(x_ptr, out_ptr, mean_ptr, std_ptr, n_rows, s_n, s_f, s_c, s_h, s_w, n_frames, GT, GH, GW,
                         C: tl.constexpr, T: tl.constexpr, P: tl.constexpr, M: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        NCOL: tl.constexpr = C * T * P * P
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # (BR,)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BC,)
        # row -> clip b, temporal group g, patch (ph, pw)
        per_clip = GT * GH * GW
        b = rows // per_clip
        r = rows % per_clip
        g = r // (GH * GW)
        r = r % (GH * GW)
        blk = r // (M * M)
        inner = r % (M * M)
        ph = (blk // (GW // M)) * M + inner // M
        pw = (blk % (GW // M)) * M + inner % M
        # column -> channel c, temporal slot t, pixel (py, px)
        c = cols // (T * P * P)
        t = (cols // (P * P)) % T
        py = (cols // P) % P
        px = cols % P
        frame = tl.minimum(g[:, None] * T + t[None, :], n_frames - 1)  # clamp = repeat the last frame
        src = (b[:, None] * s_n + frame * s_f + c[None, :] * s_c
               + (ph[:, None] * P + py[None, :]) * s_h + (pw[:, None] * P + px[None, :]) * s_w)
        col_ok = cols < NCOL
        mask = (rows[:, None] < n_rows) & col_ok[None, :]
        v = tl.load(x_ptr + src, mask=mask, other=0).to(tl.float32)
        mu = tl.load(mean_ptr + c, mask=col_ok, other=0.0)
        sd = tl.load(std_ptr + c, mask=col_ok, other=1.0)
        y = tl.math.div_rn(v - mu[None, :], sd[None, :])  # IEEE division: same bits as torch's x / std
        tl.store(out_ptr + rows[:, None] * NCOL + cols[None, :], y, mask=mask)


def patchify(frames: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *, patch_size: int = 14,
             temporal_patch_size: int = 2, merge_size: int = 2, block_rows: int = 16,
             block_cols: int = 256) -> torch.Tensor:
    """Triton version of :func:`patchify_reference` (same arguments, same result); frames may be strided."""
    if not HAS_TRITON:
        raise RuntimeError("patchify needs triton; use patchify_reference")
    if frames.dtype not in (torch.uint8, torch.float32):
        frames = frames.float()
    n, f, c, gt, gh, gw = _geometry(frames, patch_size, temporal_patch_size, merge_size)
    ncol = c * temporal_patch_size * patch_size * patch_size
    n_rows = n * gt * gh * gw
    out = torch.empty(n_rows, ncol, dtype=torch.float32, device=frames.device)
    if n_rows == 0:
        return out
    mean = mean.to(device=frames.device, dtype=torch.float32).contiguous()
    std = std.to(device=frames.device, dtype=torch.float32).contiguous()
    grid = (triton.cdiv(n_rows, block_rows), triton.cdiv(ncol, block_cols))
    _patchify_kernel[grid](frames, out, mean, std, n_rows, *frames.stride(), f, gt, gh, gw,
                           C=c, T=temporal_patch_size, P=patch_size, M=merge_size,
                           BLOCK_R=block_rows, BLOCK_C=block_cols)
    return out
