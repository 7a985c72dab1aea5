"""Fused SwiGLU activation: ``silu(gate) * up`` in one kernel instead of two (and no temporary).

Reference (``silu_mul_reference``): torch's eager ``F.silu(gate) * up``. torch computes silu in float32 as
``g / (1 + exp(-g))`` and rounds it to the dtype, then rounds the float32 product (exact for two bf16/fp16
values) to the dtype. The kernel keeps both roundings (``cast_rne``) and the same float32 formula:

- compiled (CUDA): libdevice ``exp`` (the CUDA math library's ``expf``, which torch's CUDA kernel calls) and an
  IEEE round-to-nearest division (``div_rn``; triton's ``/`` is the approximate one), so results should equal
  torch's CUDA kernel bit for bit. Two compiler liberties leave the values unchanged: triton links libdevice
  with flush-to-zero (it matters only where exp's input or result is subnormal: 1 + e is 1 there either way),
  and it contracts expf's final scaling by 2**j with the ``1 +`` into one fma (the scaling is exact, so the sum
  is rounded once either way).
- interpreted (``TRITON_INTERPRET=1``, numpy on the CPU): the interpreter has no libdevice, and numpy's float32
  ``exp`` differs from torch's CPU ``exp`` in the last bit for some inputs (3 of the 63488 finite fp16 gate values
  then round differently). The exp is taken in float64 and rounded to float32 instead (correctly rounded): every
  finite bf16 and fp16 gate value then gives torch's CPU result bit for bit (the tests check all of them).
  In float32 the two exps still differ in the last bit for some inputs (close, not equal).
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:
    from triton.language.extra import libdevice

    from .rounding import cast_rne, to_f32

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 1024  # columns per program: rows of the MLP width (3420 vision, 11008 decoder at 3B) span a few programs


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., H) -> silu(gate) * up (..., H): the eager ops the kernel replaces. The product goes into
    silu's fresh output, so that no more than three (..., H) tensors are alive at once (gate, up, out)."""
    return torch.nn.functional.silu(gate).mul_(up)


if HAS_TRITON:

    @triton.jit
    def _silu(g, COMPILED: tl.constexpr):
        """float32 silu as torch's kernels compute it: g / (1 + exp(-g)), accurate exp, IEEE division."""
        if COMPILED:
            e = libdevice.exp(-g)
        else:  # the interpreter: numpy's exp in float64, rounded once to float32
            e = tl.exp((-g).to(tl.float64)).to(tl.float32)
        return tl.div_rn(g, 1.0 + e)

    @triton.jit
    def _silu_mul_kernel(G, U, OUT, sg_row, sg_col, su_row, su_col, stride_out, H, BLOCK: tl.constexpr,
                         COMPILED: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < H
        g = to_f32(tl.load(G + row * sg_row + cols * sg_col, mask=mask, other=0.0))
        u = to_f32(tl.load(U + row * su_row + cols * su_col, mask=mask, other=0.0))
        a = cast_rne(_silu(g, COMPILED), OUT.dtype.element_ty)  # torch's silu output, in the dtype
        tl.store(OUT + row * stride_out + cols, cast_rne(to_f32(a) * u, OUT.dtype.element_ty), mask=mask)

    _COMPILED = isinstance(_silu_mul_kernel, triton.JITFunction)  # False under TRITON_INTERPRET=1


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.dim() < 1 or gate.dtype not in _FLOATS:
        raise ValueError(f"gate must be a float32/bfloat16/float16 tensor (..., H), got {gate.dtype} "
                         f"{tuple(gate.shape)}")
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(f"up must match gate ({gate.dtype} {tuple(gate.shape)} on {gate.device}), "
                         f"got {up.dtype} {tuple(up.shape)} on {up.device}")


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton version of ``silu_mul_reference`` (CUDA, or CPU under ``TRITON_INTERPRET=1``): gate, up (..., H)
    -> (..., H) in their dtype. Strided inputs are read in place."""
    if not HAS_TRITON:
        raise RuntimeError("silu_mul needs the triton package; use silu_mul_reference")
    _check(gate, up)
    H = gate.shape[-1]
    g2, u2 = gate.reshape(-1, H), up.reshape(-1, H)  # views where the strides allow
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        block = min(_BLOCK, triton.next_power_of_2(H))
        grid = (g2.shape[0], triton.cdiv(H, block))
        _silu_mul_kernel[grid](g2, u2, out, *g2.stride(), *u2.stride(), out.stride(0), H, BLOCK=block,
                               COMPILED=_COMPILED, num_warps=4)
    return out.view(gate.shape)
