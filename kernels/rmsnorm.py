"""Fused RMSNorm: one read of x, one write of y, with the reference's rounding.

Reference (``rms_norm_reference``): normalise in float32, cast to the input dtype, then multiply by the weight
(in the input dtype, i.e. a float32 product rounded once). The kernel keeps those two roundings, so bf16 results
match the unfused torch ops bit for bit except where the float32 sum of squares lands differently (a last-bit
difference in rare elements).
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:
    from .rounding import cast_rne


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D), weight (D,) -> (..., D) in the dtype of ``weight * x``."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(X, W, Y, stride_x, stride_y, D, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        n = cast_rne(x * rstd, X.dtype.element_ty)  # the reference's cast back to the input dtype
        w = tl.load(W + cols, mask=mask, other=0.0)
        y = n.to(tl.float32) * w.to(tl.float32)
        tl.store(Y + row * stride_y + cols, cast_rne(y, Y.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dim of a (..., D) tensor (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    if not HAS_TRITON:
        raise RuntimeError("rms_norm needs the triton package; use rms_norm_reference")
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight must have shape ({D},), got {tuple(weight.shape)}")
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(D)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), D, float(eps), BLOCK=block,
                                         num_warps=4 if block <= 2048 else 8)
    return y.view(x.shape)
