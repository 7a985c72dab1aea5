"""Fused normalize + patchify: frames (n, F, C, H, W) -> model-ready patch rows (rows, C*T*P*P) float32.

Row order per clip: (t, h-block, w-block, row-in-block, col-in-block) with ``merge x merge`` blocks of patches;
column order (C, T, P, P). Frame ``gt*T + t`` feeds temporal slot ``t`` of temporal group ``gt``; frame indices
past the end are clamped to the last frame, which is the reference's padding (a single image is one frame
repeated ``T`` times, an odd-length clip repeats its last frame). Normalisation is ``(x - mean) / std`` in
float32 with ``mean``/``std`` already in the input's value range (x255 for uint8).

``patchify_reference`` is the torch implementation (any device); ``patchify`` is a Triton kernel (CUDA, or
CPU under ``TRITON_INTERPRET=1``) that reads each input element once and writes each output element once.
``resize_patchify`` also runs the bicubic resize (given its per-axis taps): a width pass, then one kernel for
the height taps, uint8 rounding, normalisation and the patch layout.
"""
from __future__ import annotations

import math

import torch

from ._triton import HAS_TRITON, tl, triton


def _geometry(shape, patch_size: int, temporal_patch_size: int, merge_size: int):
    """(n, F, C, GT, GH, GW) of frames of ``shape`` (n, F, C, H, W), checking the sizes."""
    if len(shape) != 5:
        raise ValueError(f"frames must be (n, F, C, H, W), got shape {tuple(shape)}")
    n, f, c, h, w = shape
    unit = patch_size * merge_size
    if h % unit or w % unit or f < 1:
        raise ValueError(f"frame size {h}x{w} must be a multiple of patch_size*merge_size = {unit} (and F >= 1)")
    return n, f, c, math.ceil(f / temporal_patch_size), h // patch_size, w // patch_size


def patchify_reference(frames: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *, patch_size: int = 14,
                       temporal_patch_size: int = 2, merge_size: int = 2) -> torch.Tensor:
    """frames (n, F, C, H, W) uint8/float; mean, std (C,) float32 -> (n*GT*GH*GW, C*T*P*P) float32."""
    n, f, c, gt, gh, gw = _geometry(frames.shape, patch_size, temporal_patch_size, merge_size)
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
    def _round_half_even(v):
        f = tl.floor(v)
        d = v - f
        odd = f - 2.0 * tl.floor(f * 0.5)  # 1.0 when f is odd
        return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))

    @triton.jit
    def _resize_width_kernel(x_ptr, out_ptr, xmin_ptr, wx_ptr, n_planes, F, C, H, W_in, W_out, KX,
                             s_n, s_f, s_c, s_h, s_w, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
        """out (planes, H, W_out) float32 = taps along the width of x (n, F, C, H, W_in), planes = n*F*C."""
        n_yblocks = tl.cdiv(H, BLOCK_Y)
        plane = tl.program_id(0) // n_yblocks
        ys = (tl.program_id(0) % n_yblocks) * BLOCK_Y + tl.arange(0, BLOCK_Y)  # (BY,)
        xs = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)  # (BX,)
        b = plane // (F * C)
        f = (plane // C) % F
        c = plane % C
        base = b.to(tl.int64) * s_n + f.to(tl.int64) * s_f + c.to(tl.int64) * s_c  # int64: clips of > 2**31 values
        x_ok = xs < W_out
        mask = (ys < H)[:, None] & x_ok[None, :]
        x0 = tl.load(xmin_ptr + xs, mask=x_ok, other=0)
        acc = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
        for k in range(KX):  # taps in order, as torch accumulates
            wk = tl.load(wx_ptr + xs * KX + k, mask=x_ok, other=0.0)
            col = tl.minimum(x0 + k, W_in - 1)  # taps past the window have weight 0
            v = tl.load(x_ptr + base + ys[:, None].to(tl.int64) * s_h + col[None, :].to(tl.int64) * s_w,
                        mask=mask, other=0)
            acc += v.to(tl.float32) * wk[None, :]
        out = out_ptr + (plane.to(tl.int64) * H + ys[:, None]) * W_out + xs[None, :]
        tl.store(out, acc, mask=mask)

    @triton.jit
    def _patchify_kernel(x_ptr, out_ptr, mean_ptr, std_ptr, ymin_ptr, wy_ptr, n_rows, s_n, s_f, s_c, s_h, s_w,
                         n_frames, GT, GH, GW, H_in, KY, ROUND: tl.constexpr,
                         C: tl.constexpr, T: tl.constexpr, P: tl.constexpr, M: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Height taps (identity when not resizing), optional uint8 rounding, normalize, patch layout."""
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
        y = (ph[:, None] * P + py[None, :]).to(tl.int32)  # output pixel row (BR, BC)
        base = (b[:, None] * s_n + frame * s_f + c[None, :].to(tl.int64) * s_c
                + (pw[:, None] * P + px[None, :]) * s_w)
        col_ok = cols < NCOL
        mask = (rows[:, None] < n_rows) & col_ok[None, :]
        y0 = tl.load(ymin_ptr + y, mask=mask, other=0)
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for k in range(KY):
            wk = tl.load(wy_ptr + y * KY + k, mask=mask, other=0.0)
            yy = tl.minimum(y0 + k, H_in - 1)
            v = tl.load(x_ptr + base + yy.to(tl.int64) * s_h, mask=mask, other=0)
            acc += v.to(tl.float32) * wk
        if ROUND:
            acc = _round_half_even(tl.minimum(tl.maximum(acc, 0.0), 255.0))
        mu = tl.load(mean_ptr + c, mask=col_ok, other=0.0)
        sd = tl.load(std_ptr + c, mask=col_ok, other=1.0)
        out = tl.math.div_rn(acc - mu[None, :], sd[None, :])  # IEEE division: the same bits as torch's x / std
        tl.store(out_ptr + rows[:, None] * NCOL + cols[None, :], out, mask=mask)


_IDENTITY: dict = {}


def _identity_taps(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Taps of an axis that keeps its size (each output reads its own pixel with weight 1), cached for the process
    and never evicted: a captured CUDA graph reads them at every replay (a few bytes per distinct size)."""
    key = (n, device)
    if key not in _IDENTITY:
        _IDENTITY[key] = (torch.arange(n, dtype=torch.int32, device=device), torch.ones(n, 1, device=device))
    return _IDENTITY[key]


def resize_patchify(frames: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *, height_taps=None,
                    width_taps=None, round_uint8: bool = False, patch_size: int = 14, temporal_patch_size: int = 2,
                    merge_size: int = 2, block_rows: int = 16, block_cols: int = 256) -> torch.Tensor:
    """Triton: optional separable resize, then normalize + patchify, in two kernels (one without a resize).

    frames (n, F, C, H, W) uint8/float32, any strides. ``height_taps`` / ``width_taps``: ``(first_index (out,)
    int64, weights (out, K) float32)`` per axis (``qwen_batched.resize.axis_taps``), None where the size stays.
    The width pass writes a float32 (n, F, C, H, w) intermediate; the second kernel applies the height taps,
    clamps and rounds when ``round_uint8`` (torchvision's uint8 output), normalizes and writes patch rows.
    Without taps and rounding this is exactly :func:`patchify_reference`.
    """
    if not HAS_TRITON:
        raise RuntimeError("resize_patchify needs triton; use the torch path")
    if frames.dtype not in (torch.uint8, torch.float32):
        frames = frames.float()
    dev = frames.device
    if width_taps is not None:
        frames = _resize_width(frames, *width_taps)
    h_in = frames.shape[-2]
    ymin, wy = height_taps if height_taps is not None else _identity_taps(h_in, dev)
    ymin, wy = ymin.to(device=dev, dtype=torch.int32).contiguous(), wy.to(device=dev, dtype=torch.float32).contiguous()
    n, f, c, gt, gh, gw = _geometry((*frames.shape[:3], ymin.shape[0], frames.shape[-1]), patch_size,
                                    temporal_patch_size, merge_size)
    ncol = c * temporal_patch_size * patch_size * patch_size
    n_rows = n * gt * gh * gw
    out = torch.empty(n_rows, ncol, dtype=torch.float32, device=dev)
    if n_rows == 0:
        return out
    mean = mean.to(device=dev, dtype=torch.float32).contiguous()
    std = std.to(device=dev, dtype=torch.float32).contiguous()
    grid = (triton.cdiv(n_rows, block_rows), triton.cdiv(ncol, block_cols))
    _patchify_kernel[grid](frames, out, mean, std, ymin, wy, n_rows, *frames.stride(), f, gt, gh, gw, h_in,
                           wy.shape[1], ROUND=bool(round_uint8), C=c, T=temporal_patch_size, P=patch_size,
                           M=merge_size, BLOCK_R=block_rows, BLOCK_C=block_cols)
    return out


def _resize_width(frames: torch.Tensor, xmin: torch.Tensor, wx: torch.Tensor, block_y: int = 16,
                  block_x: int = 64) -> torch.Tensor:
    """(n, F, C, H, W) -> (n, F, C, H, w) float32 with width taps."""
    n, f, c, h, w_in = frames.shape
    xmin = xmin.to(device=frames.device, dtype=torch.int32).contiguous()
    wx = wx.to(device=frames.device, dtype=torch.float32).contiguous()
    w_out = xmin.shape[0]
    out = torch.empty(n, f, c, h, w_out, dtype=torch.float32, device=frames.device)
    if out.numel() == 0:
        return out
    grid = (n * f * c * triton.cdiv(h, block_y), triton.cdiv(w_out, block_x))
    _resize_width_kernel[grid](frames, out, xmin, wx, n * f * c, f, c, h, w_in, w_out, wx.shape[1], *frames.stride(),
                               BLOCK_Y=block_y, BLOCK_X=block_x)
    return out


def patchify(frames: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *, patch_size: int = 14,
             temporal_patch_size: int = 2, merge_size: int = 2) -> torch.Tensor:
    """Triton version of :func:`patchify_reference` (same arguments, same bits); frames may be strided."""
    return resize_patchify(frames, mean, std, patch_size=patch_size, temporal_patch_size=temporal_patch_size,
                           merge_size=merge_size)
