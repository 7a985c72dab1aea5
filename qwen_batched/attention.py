"""Variable-length (packed) bidirectional attention behind one function.

Backends, picked once per batch by ``resolve_backend``:
  * ``flash``        flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16), when the package imports;
  * ``torch_varlen`` ``torch.nn.attention.varlen.varlen_attn`` (torch's own varlen flash kernel, CUDA, fp16/bf16);
  * ``sdpa``         everywhere else: segments of equal length are gathered into one batched SDPA call per
                     bucket (buckets of near-equal lengths are padded with a key mask). Never a dense mask over
                     the whole batch, never a per-segment Python loop at run time.
The bucket plan is built on the host once per batch geometry (see ``VarlenPlan.build``); running a layer
costs no host sync.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:  # optional: pip install qwen_batched[flash]
    from flash_attn import flash_attn_varlen_func as _flash_varlen

    HAS_FLASH_ATTN = True
except Exception:  # ImportError, or a broken CUDA build
    _flash_varlen = None
    HAS_FLASH_ATTN = False

try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen

    HAS_TORCH_VARLEN = True
except Exception:
    _torch_varlen = None
    HAS_TORCH_VARLEN = False

BACKENDS = ("auto", "flash", "torch_varlen", "sdpa")
_HALF = (torch.float16, torch.bfloat16)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Map ``attn_backend`` to the backend that will run; raise a clear error if a forced one can't."""
    if name not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {BACKENDS}, got {name!r}")
    device = torch.device(device)
    if device.type == "meta":
        return "sdpa"
    half = dtype is None or dtype in _HALF
    if name == "auto":
        if device.type == "cuda" and half:
            if HAS_FLASH_ATTN:
                return "flash"
            if HAS_TORCH_VARLEN:
                return "torch_varlen"
        return "sdpa"
    if name == "flash":
        if not HAS_FLASH_ATTN:
            raise ValueError("attn_backend='flash' needs the flash-attn package (pip install 'qwen_batched[flash]'), "
                             "which is not importable here; use 'auto' or 'sdpa'")
        if device.type != "cuda" or not half:
            raise ValueError(f"attn_backend='flash' runs on CUDA in fp16/bf16, got device={device}, dtype={dtype}")
    if name == "torch_varlen":
        if not HAS_TORCH_VARLEN:
            raise ValueError(f"attn_backend='torch_varlen' needs torch.nn.attention.varlen (torch {torch.__version__} lacks it)")
        if device.type != "cuda" or not half:
            raise ValueError(f"attn_backend='torch_varlen' runs on CUDA in fp16/bf16, got device={device}, dtype={dtype}")
    return name


@dataclass
class _Bucket:
    """Segments gathered into one SDPA call: ``index`` (n, L) token rows; ``mask`` (n, 1, 1, L) if padded."""
    index: torch.Tensor | None  # None when the bucket is one contiguous run (pure view)
    start: int
    n: int
    length: int
    mask: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # (n*L,) bool, which gathered rows are real tokens


@dataclass
class VarlenPlan:
    """Segment layout of one packed sequence: cumulative lengths plus the SDPA bucket plan."""
    cu_seqlens: torch.Tensor  # (S+1,) int32 on the compute device
    max_seqlen: int
    buckets: list[_Bucket] = field(default_factory=list)

    @classmethod
    def build(cls, lengths: list[int], device: torch.device, backend: str, pad_waste: float = 0.25) -> "VarlenPlan":
        """lengths: host list of segment lengths, in packed order."""
        lens = torch.tensor(lengths, dtype=torch.int64)
        cu = F.pad(lens.cumsum(0), (1, 0))
        plan = cls(cu_seqlens=cu.to(device=device, dtype=torch.int32), max_seqlen=int(lens.max()))
        if backend == "sdpa":
            plan.buckets = _make_buckets(lens, cu, device, pad_waste)
        return plan


def _make_buckets(lens: torch.Tensor, cu: torch.Tensor, device, pad_waste: float) -> list[_Bucket]:
    starts = cu[:-1]
    distinct = torch.unique(lens).flip(0).tolist()  # descending
    groups: list[list[int]] = []
    for L in distinct:  # greedy: a bucket takes lengths within pad_waste of its longest
        if groups and L >= groups[-1][0] * (1 - pad_waste):
            groups[-1].append(L)
        else:
            groups.append([L])
    buckets = []
    for g in groups:
        Lmax = g[0]
        sel = torch.nonzero(torch.isin(lens, torch.tensor(g))).flatten()  # segment ids, packed order
        seg_len, seg_start = lens[sel], starts[sel]
        n = len(sel)
        if len(g) == 1:
            first = int(seg_start[0])
            if int(seg_start[-1]) - first == (n - 1) * Lmax and bool((seg_start.diff() == Lmax).all()):
                buckets.append(_Bucket(None, first, n, Lmax))  # contiguous run: slice and view
                continue
            idx = seg_start[:, None] + torch.arange(Lmax)
            buckets.append(_Bucket(idx.to(device), 0, n, Lmax))
            continue
        ar = torch.arange(Lmax)
        valid = ar[None, :] < seg_len[:, None]  # (n, Lmax)
        idx = torch.where(valid, seg_start[:, None] + ar, seg_start[:, None])  # pad rows re-read a real row
        buckets.append(_Bucket(idx.to(device), 0, n, Lmax, mask=valid[:, None, None, :].to(device),
                               valid=valid.flatten().to(device)))
    return buckets


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan, backend: str,
                     scale: float | None = None) -> torch.Tensor:
    """Bidirectional attention within each segment. q, k, v: (N, H, D) -> (N, H, D)."""
    if backend == "flash":
        return _flash_varlen(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen,
                             softmax_scale=scale, causal=False)
    if backend == "torch_varlen":
        return _torch_varlen(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen, scale=scale)
    return _sdpa_buckets(q, k, v, plan, scale)


def _sdpa_buckets(q, k, v, plan: VarlenPlan, scale) -> torch.Tensor:
    N, H, D = q.shape
    if len(plan.buckets) == 1 and plan.buckets[0].index is None:  # one contiguous run of equal segments
        b = plan.buckets[0]
        qb, kb, vb = (x.view(b.n, b.length, H, D).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)  # (n, H, L, D)
        return o.transpose(1, 2).reshape(N, H, D)
    out = torch.empty_like(q)
    for b in plan.buckets:  # a handful of buckets per batch, fixed at plan time
        if b.index is None:
            sl = slice(b.start, b.start + b.n * b.length)
            qb, kb, vb = (x[sl].view(b.n, b.length, H, D).transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(qb, kb, vb, scale=scale)
            out[sl] = o.transpose(1, 2).reshape(-1, H, D)
            continue
        flat = b.index.flatten()
        qb, kb, vb = (x.index_select(0, flat).view(b.n, b.length, H, D).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=b.mask, scale=scale)
        o = o.transpose(1, 2).reshape(-1, H, D)  # (n*L, H, D)
        if b.valid is None:
            out.index_copy_(0, flat, o)
        else:
            out[flat[b.valid]] = o[b.valid]
    return out
