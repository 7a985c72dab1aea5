"""Casts inside Triton kernels that round like torch (round to nearest even), also under TRITON_INTERPRET=1,
whose float32 <-> bfloat16 conversions truncate, and flush or garble subnormals: bfloat16 goes through its bits."""
from __future__ import annotations

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def cast_rne(x, DT: tl.constexpr):
        """float32 ``x`` -> dtype ``DT``; bfloat16 is rounded to nearest even on the bits (a NaN stays a NaN,
        0x7FC0, instead of carrying into the sign or the exponent)."""
        if DT == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            bits = tl.where(x != x, 0x7FC0, bits)
            y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            y = x.to(DT)
        return y

    @triton.jit
    def to_f32(x):
        """A float tensor -> float32, exactly (bfloat16 by shifting its bits, subnormals included)."""
        if x.dtype == tl.bfloat16:
            y = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            y = x.to(tl.float32)
        return y
