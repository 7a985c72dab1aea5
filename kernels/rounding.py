"""Casts inside Triton kernels that round like torch (round to nearest even), also under TRITON_INTERPRET=1,
whose float32 -> bfloat16 conversion truncates."""
from __future__ import annotations

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def cast_rne(x, DT: tl.constexpr):
        """float32 ``x`` -> dtype ``DT``; bfloat16 is rounded to nearest even explicitly (then exact)."""
        if DT == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        return x.to(DT)
