"""Fused rotary embeddings: the vision tower's 2-D rotary and the decoder's M-RoPE, one launch each per layer.

Vision (``rotary_qkv``): reads each row of the packed qkv projection once, rotates q and k in float32 and writes
them dense, and (for the CUDA varlen kernels, which want dense tensors) copies v in the same launch. Reference
(``rotary_qkv_reference``): upcast to float32, ``x * cos + rotate_half(x) * sin``, cast back.

Decoder (``rope_qk``): rotates q and k (GQA: their head counts may differ) with cos/sin in their dtype. Reference
(``rope_qk_reference``): eager torch's ``x * cos + rotate_half(x) * sin``, which in bf16/fp16 rounds each product
and then the sum to the dtype; the kernel keeps those three roundings.

Both kernels are built without floating-point contraction (``enable_fp_fusion=False``): a fused multiply-add would
skip the rounding of a product (in fp16 the compiler would otherwise narrow the ops to half precision and fuse
them), so the results are their references' bit for bit.
"""
from __future__ import annotations

import math

import torch

from ._triton import HAS_TRITON, tl, triton

if HAS_TRITON:
    from .rounding import cast_rne, to_f32


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# ---------------------------------------------------------------------------------------------- vision
def rotary_qkv_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         copy_v: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (N, 3, H, hd); cos/sin (N, hd) float32 -> q, k, v, each (N, H, hd) in qkv's dtype.

    q and k are rotated in float32 and dense; v is a view of qkv, or a dense copy with ``copy_v``.
    """
    # (2, N, H, hd) dense float32 copy of q and k (one op in any dtype), so the rotated q and k come out dense
    x = qkv[:, :2].movedim(1, 0).to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    qk = (x * cos[:, None] + _rotate_half(x) * sin[:, None]).to(qkv.dtype)
    v = qkv[:, 2]
    return *qk.unbind(0), (v.contiguous() if copy_v else v)


if HAS_TRITON:

    @triton.jit
    def _rotary_qkv_kernel(QKV, COS, SIN, OUT, stride_qkv, stride_cs, stride_part, HEADS, HALF,
                           COPY_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_V: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        hd = 2 * HALF
        h = tl.arange(0, BLOCK_H)[:, None]  # heads of q then k
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < 2 * HEADS) & (d < HALF)
        src = QKV + n * stride_qkv + h * hd + d
        x1 = to_f32(tl.load(src, mask=mask, other=0.0))
        x2 = to_f32(tl.load(src + HALF, mask=mask, other=0.0))
        dmask = d < HALF
        c1 = tl.load(COS + n * stride_cs + d, mask=dmask, other=0.0)
        c2 = tl.load(COS + n * stride_cs + HALF + d, mask=dmask, other=0.0)
        s1 = tl.load(SIN + n * stride_cs + d, mask=dmask, other=0.0)
        s2 = tl.load(SIN + n * stride_cs + HALF + d, mask=dmask, other=0.0)
        part = h // HEADS  # 0: q, 1: k
        dst = OUT + part.to(tl.int64) * stride_part + n * HEADS * hd + (h - part * HEADS) * hd + d
        tl.store(dst, cast_rne(x1 * c1 - x2 * s1, OUT.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, cast_rne(x2 * c2 + x1 * s2, OUT.dtype.element_ty), mask=mask)
        if COPY_V:  # v's heads are one contiguous run of the row
            e = tl.arange(0, BLOCK_V)
            emask = e < HEADS * hd
            v = tl.load(QKV + n * stride_qkv + 2 * HEADS * hd + e, mask=emask)
            tl.store(OUT + 2 * stride_part.to(tl.int64) + n * HEADS * hd + e, v, mask=emask)  # int64: > 2**31


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               copy_v: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of ``rotary_qkv_reference`` (CUDA, or CPU under ``TRITON_INTERPRET=1``): one launch writes
    q, k (and v with ``copy_v``) into one (2 or 3, N, H, hd) buffer."""
    if not HAS_TRITON:
        raise RuntimeError("rotary_qkv needs the triton package; use rotary_qkv_reference")
    if qkv.dim() != 4 or qkv.shape[1] != 3 or qkv.shape[-1] % 2:
        raise ValueError(f"expected qkv (N, 3, H, hd) with an even hd, got {tuple(qkv.shape)}")
    N, _, H, hd = qkv.shape
    if cos.shape != (N, hd) or sin.shape != (N, hd):
        raise ValueError(f"expected cos/sin ({N}, {hd}) for qkv {tuple(qkv.shape)}, got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    if qkv.stride(-1) != 1 or qkv.stride(-2) != hd or qkv.stride(1) != H * hd:
        qkv = qkv.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    out = torch.empty(2 + copy_v, N, H, hd, dtype=qkv.dtype, device=qkv.device)
    if N:
        _rotary_qkv_kernel[(N,)](qkv, cos, sin, out, qkv.stride(0), cos.stride(0), out.stride(0), H, hd // 2,
                                 COPY_V=bool(copy_v), BLOCK_H=triton.next_power_of_2(2 * H),
                                 BLOCK_D=triton.next_power_of_2(hd // 2), BLOCK_V=triton.next_power_of_2(H * hd),
                                 enable_fp_fusion=False)
    return out[0], out[1], (out[2] if copy_v else qkv[:, 2])


# ---------------------------------------------------------------------------------------------- decoder
def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, H, hd), cos/sin (..., T, hd) -> rotated x (eager torch, rounding as its dtype does)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + _rotate_half(x) * sin


def rope_qk_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope_reference`` of q (..., T, H, hd) and of k (..., T, Hkv, hd)."""
    return rope_reference(q, cos, sin), rope_reference(k, cos, sin)


if HAS_TRITON:

    @triton.jit
    def _round(x, DT: tl.constexpr):
        """float32 ``x`` rounded to ``DT`` as an eager torch op's result is, back in float32."""
        return to_f32(cast_rne(x, DT))

    @triton.jit
    def _rope_heads(X, stride_h, OUT, rows, HEADS, c1, c2, s1, s2, HALF,
                    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rotate the HEADS heads of a block of tokens into dense OUT. X/OUT: (BLOCK_T, 1, 1) pointers to each
        token's first element (heads ``stride_h`` apart in X); rows: (BLOCK_T, 1, 1) which tokens are real."""
        DT = OUT.dtype.element_ty
        h = tl.arange(0, BLOCK_H)[None, :, None]
        d = tl.arange(0, BLOCK_D)[None, None, :]
        mask = rows & (h < HEADS) & (d < HALF)
        src = X + h * stride_h + d
        x1 = to_f32(tl.load(src, mask=mask, other=0.0))
        x2 = to_f32(tl.load(src + HALF, mask=mask, other=0.0))
        # x * cos + rotate_half(x) * sin: each product rounded to DT, then their sum
        y1 = _round(x1 * c1, DT) + _round(-x2 * s1, DT)
        y2 = _round(x2 * c2, DT) + _round(x1 * s2, DT)
        dst = OUT + h * (2 * HALF) + d
        tl.store(dst, cast_rne(y1, DT), mask=mask)
        tl.store(dst + HALF, cast_rne(y2, DT), mask=mask)

    @triton.jit
    def _rope_qk_kernel(Q, K, COS, SIN, QO, KO, N, T, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sc_b, sc_t, ss_b, ss_t,
                        HQ, HK, HALF, BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                        BLOCK_D: tl.constexpr):
        n = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # tokens of the flattened (B, T)
        b = n // T
        t = n - b * T
        rows = (n < N)[:, None, None]
        d = tl.arange(0, BLOCK_D)[None, None, :]
        cmask = rows & (d < HALF)
        cs = COS + (b * sc_b + t * sc_t)[:, None, None] + d  # (BLOCK_T, 1, BLOCK_D)
        sn = SIN + (b * ss_b + t * ss_t)[:, None, None] + d
        c1 = to_f32(tl.load(cs, mask=cmask, other=0.0))
        c2 = to_f32(tl.load(cs + HALF, mask=cmask, other=0.0))
        s1 = to_f32(tl.load(sn, mask=cmask, other=0.0))
        s2 = to_f32(tl.load(sn + HALF, mask=cmask, other=0.0))
        _rope_heads(Q + (b * sq_b + t * sq_t)[:, None, None], sq_h, QO + (n * HQ * 2 * HALF)[:, None, None], rows,
                    HQ, c1, c2, s1, s2, HALF, BLOCK_HQ, BLOCK_D)
        _rope_heads(K + (b * sk_b + t * sk_t)[:, None, None], sk_h, KO + (n * HK * 2 * HALF)[:, None, None], rows,
                    HK, c1, c2, s1, s2, HALF, BLOCK_HK, BLOCK_D)


_TILE = 2048  # q elements (per half of hd) a program rotates: one token of a 16-head, hd=128 model is 1024


def _check_rope(q, k, cos, sin) -> tuple[tuple[int, ...], int]:
    """The leading dims and T of q (*lead, T, H, hd); ValueError unless k and cos/sin fit it."""
    if q.dim() < 3 or k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1] \
            or q.shape[-1] % 2:
        raise ValueError(f"expected q (..., T, H, hd) and k (..., T, Hkv, hd) with the same leading dims and an "
                         f"even hd, got {tuple(q.shape)}, {tuple(k.shape)}")
    rows = (*q.shape[:-2], q.shape[-1])  # (*lead, T, hd)
    try:
        fits = cos.shape == sin.shape and torch.broadcast_shapes(cos.shape, rows) == rows
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"expected cos/sin of one shape broadcasting to (..., T, hd) = {rows}, got "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    if not (q.dtype == k.dtype == cos.dtype == sin.dtype) or not q.is_floating_point():
        raise ValueError(f"expected q, k, cos, sin of one floating dtype, got {q.dtype}, {k.dtype}, {cos.dtype}, "
                         f"{sin.dtype}")
    return tuple(q.shape[:-3]), q.shape[-3]


def _rows(x: torch.Tensor, n_lead: int, B: int, T: int) -> torch.Tensor:
    """x (*lead, T, ...) with n_lead leading dims -> (B, T, ...): a view when the strides allow (else a copy),
    with a unit last stride."""
    x = x.reshape(B, T, *x.shape[n_lead + 1:])
    return x if x.stride(-1) == 1 else x.contiguous()


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ``rope_qk_reference`` (CUDA, or CPU under ``TRITON_INTERPRET=1``): q (..., T, H, hd) and
    k (..., T, Hkv, hd), possibly strided views of a projection, rotated in one launch into new contiguous
    tensors. cos/sin (..., T, hd) may broadcast over q's leading dims (read with stride 0, not copied)."""
    if not HAS_TRITON:
        raise RuntimeError("rope_qk needs the triton package; use rope_qk_reference")
    lead, T = _check_rope(q, k, cos, sin)
    B, (H, hd), Hkv = math.prod(lead), q.shape[-2:], k.shape[-2]
    n = len(lead)
    q3, k3 = _rows(q, n, B, T), _rows(k, n, B, T)  # (B, T, H, hd), (B, T, Hkv, hd)
    c3, s3 = (_rows(x.expand(*lead, T, hd), n, B, T) for x in (cos, sin))  # (B, T, hd), stride 0 if broadcast
    qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    N = B * T
    if N:
        bh, bd = triton.next_power_of_2(H), triton.next_power_of_2(hd // 2)
        bt = min(triton.next_power_of_2(N), max(1, _TILE // (bh * bd)))  # tokens per program: q tiles of ~_TILE
        _rope_qk_kernel[(triton.cdiv(N, bt),)](
            q3, k3, c3, s3, qo, ko, N, T, *q3.stride()[:3], *k3.stride()[:3], *c3.stride()[:2], *s3.stride()[:2],
            H, Hkv, hd // 2, BLOCK_T=bt, BLOCK_HQ=bh, BLOCK_HK=triton.next_power_of_2(Hkv), BLOCK_D=bd,
            enable_fp_fusion=False)
    return qo, ko
