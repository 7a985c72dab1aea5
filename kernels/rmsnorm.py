"""Fused RMSNorm: one read of x, one write of y, with the reference's rounding.

Reference (``rms_norm_reference``): normalise in float32, cast to the input dtype, then multiply by the weight
(in the input dtype, i.e. a float32 product rounded once). The kernel keeps those two roundings, so bf16 results
match the unfused torch ops bit for bit except where the float32 sum of squares lands differently (a last-bit
difference in rare elements).

``add_rms_norm`` fuses the residual add in front of a norm (vLLM's fused_add_rms_norm): ``s = x + r`` rounded to
the dtype as torch's add rounds it, and the norm of ``s`` computed by the same code as ``rms_norm``'s kernel, so
both outputs equal the unfused add + ``rms_norm`` bit for bit (compiled, for inputs with unit column stride, as
the model's: another stride may change the register layout and so the order of the sum of squares). One read of x
and r, one write of s and y.
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:
    from .rounding import cast_rne, to_f32


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D), weight (D,) -> (..., D) in the dtype of ``weight * x``."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _norm_row(x, W, cols, mask, D, eps, X_DT: tl.constexpr, Y_DT: tl.constexpr):
        """One row (BLOCK,) float32, zero past D -> its RMSNorm in Y_DT. Shared by both kernels so that they
        round (and sum the squares) identically."""
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        n = cast_rne(x * rstd, X_DT)  # the reference's cast back to the input dtype
        w = tl.load(W + cols, mask=mask, other=0.0)
        return cast_rne(to_f32(n) * to_f32(w), Y_DT)

    @triton.jit
    def _rms_norm_kernel(X, W, Y, stride_x, stride_y, D, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        x = to_f32(tl.load(X + row * stride_x + cols, mask=mask, other=0.0))
        y = _norm_row(x, W, cols, mask, D, eps, X.dtype.element_ty, Y.dtype.element_ty)
        tl.store(Y + row * stride_y + cols, y, mask=mask)


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
    weight = weight.contiguous()  # the kernel reads it densely
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(D)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), D, float(eps), BLOCK=block,
                                         num_warps=_num_warps(block))
    return y.view(x.shape)


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else 8


# ---------------------------------------------------------------------------------------------- residual add + norm
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def add_rms_norm_reference(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, r (..., D) -> (s = x + r, rms_norm_reference(s)): the eager ops the kernel replaces."""
    s = x + r
    return s, rms_norm_reference(s, weight, eps)


if HAS_TRITON:

    @triton.jit
    def _add_rms_norm_kernel(X, R, W, S, Y, sx_row, sx_col, sr_row, sr_col, stride_s, stride_y, D, eps,
                             BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        x = to_f32(tl.load(X + row * sx_row + cols * sx_col, mask=mask, other=0.0))
        r = to_f32(tl.load(R + row * sr_row + cols * sr_col, mask=mask, other=0.0))
        s = cast_rne(x + r, S.dtype.element_ty)  # torch's add: a float32 sum rounded to the dtype
        tl.store(S + row * stride_s + cols, s, mask=mask)
        y = _norm_row(to_f32(s), W, cols, mask, D, eps, S.dtype.element_ty, Y.dtype.element_ty)
        tl.store(Y + row * stride_y + cols, y, mask=mask)


def _check_add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() < 1 or x.dtype not in _FLOATS:
        raise ValueError(f"x must be a float32/bfloat16/float16 tensor (..., D), got {x.dtype} {tuple(x.shape)}")
    if r.shape != x.shape or r.dtype != x.dtype or r.device != x.device:
        raise ValueError(f"r must match x ({x.dtype} {tuple(x.shape)} on {x.device}), "
                         f"got {r.dtype} {tuple(r.shape)} on {r.device}")
    D = x.shape[-1]
    if weight.shape != (D,) or not weight.is_floating_point() or weight.device != x.device:
        raise ValueError(f"weight must be a floating ({D},) tensor on {x.device}, "
                         f"got {weight.dtype} {tuple(weight.shape)} on {weight.device}")


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``add_rms_norm_reference`` (CUDA, or CPU under ``TRITON_INTERPRET=1``): x, r (..., D)
    -> s (..., D) in x's dtype, y (..., D) in the dtype of ``weight * s``. Strided inputs are read in place."""
    if not HAS_TRITON:
        raise RuntimeError("add_rms_norm needs the triton package; use add_rms_norm_reference")
    _check_add_rms_norm(x, r, weight)
    D = x.shape[-1]
    x2, r2 = x.reshape(-1, D), r.reshape(-1, D)  # views where the strides allow
    weight = weight.contiguous()  # the kernel reads it densely
    s = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if x2.shape[0] and D:
        block = triton.next_power_of_2(D)
        _add_rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, s, y, *x2.stride(), *r2.stride(), s.stride(0),
                                             y.stride(0), D, float(eps), BLOCK=block, num_warps=_num_warps(block))
    return s.view(x.shape), y.view(x.shape)
