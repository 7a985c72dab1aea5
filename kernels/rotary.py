"""Fused 2-D rotary embedding of the vision tower's q and k, straight from the packed qkv projection.

Reference (``rotary_qk_reference``): upcast to float32, ``x * cos + rotate_half(x) * sin``, cast back. The kernel
reads the q and k parts of each qkv row once, rotates them in float32 and writes (N, 2H, hd) in the input dtype.
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:
    from .rounding import cast_rne


def rotary_qk_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """qkv (N, 3, H, hd); cos/sin (N, hd) float32 -> rotated q and k as (N, 2H, hd) in qkv's dtype."""
    N, _, H, hd = qkv.shape
    x = qkv[:, :2].reshape(N, 2 * H, hd).float()
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)
    return (x * cos[:, None] + rot * sin[:, None]).to(qkv.dtype)


if HAS_TRITON:

    @triton.jit
    def _rotary_kernel(QKV, COS, SIN, OUT, stride_qkv, stride_cs, stride_out, HEADS2, HALF,
                       BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]  # heads of q then k
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < HEADS2) & (d < HALF)
        hd = 2 * HALF
        src = QKV + n * stride_qkv + h * hd + d
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        dmask = d < HALF
        c1 = tl.load(COS + n * stride_cs + d, mask=dmask, other=0.0)
        c2 = tl.load(COS + n * stride_cs + HALF + d, mask=dmask, other=0.0)
        s1 = tl.load(SIN + n * stride_cs + d, mask=dmask, other=0.0)
        s2 = tl.load(SIN + n * stride_cs + HALF + d, mask=dmask, other=0.0)
        dst = OUT + n * stride_out + h * hd + d
        tl.store(dst, cast_rne(x1 * c1 - x2 * s1, OUT.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, cast_rne(x2 * c2 + x1 * s2, OUT.dtype.element_ty), mask=mask)


def rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Triton version of ``rotary_qk_reference`` (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    if not HAS_TRITON:
        raise RuntimeError("rotary_qk needs the triton package; use rotary_qk_reference")
    N, three, H, hd = qkv.shape
    if three != 3 or hd % 2 or cos.shape != (N, hd) or sin.shape != (N, hd):
        raise ValueError(f"expected qkv (N, 3, H, hd) and cos/sin (N, hd), got {tuple(qkv.shape)}, "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    if qkv.stride(-1) != 1 or qkv.stride(-2) != hd or qkv.stride(1) != H * hd:
        qkv = qkv.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    out = torch.empty(N, 2 * H, hd, dtype=qkv.dtype, device=qkv.device)
    if N:
        _rotary_kernel[(N,)](qkv, cos, sin, out, qkv.stride(0), cos.stride(0), out.stride(0), 2 * H, hd // 2,
                             BLOCK_H=triton.next_power_of_2(2 * H), BLOCK_D=triton.next_power_of_2(hd // 2))
    return out
