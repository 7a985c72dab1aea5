"""Variable-length (packed) attention behind one function, for the vision tower and the packed decoder prefill.

The optional kernels are imported here and nowhere else. Backends, resolved once when the model is built
(``resolve_backend``) and passed down as ``backend``:
  * ``flash``        flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16), when the package imports;
  * ``torch_varlen`` ``torch.nn.attention.varlen.varlen_attn`` (torch's own varlen flash kernel, CUDA, fp16/bf16);
  * ``sdpa``         everywhere else: segments of equal length are gathered into one batched SDPA call per
                     bucket (buckets of near-equal lengths are padded with a key mask). Never a dense mask over
                     the whole batch, never a per-segment Python loop at run time. Bidirectional only: the
                     decoder on this backend runs padded (``text.PaddedAttention``).
The bucket plan is built on the host once per batch geometry (see ``VarlenPlan.build``); running a layer
costs no host sync.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
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
    # keyword names moved between torch releases: 2.10 has is_causal, later ones window_size (and enable_gqa)
    _VARLEN_KW = set(inspect.signature(_torch_varlen).parameters)
except Exception:
    _torch_varlen = None
    HAS_TORCH_VARLEN = False
    _VARLEN_KW = set()

BACKENDS = ("auto", "flash", "torch_varlen", "sdpa")
PACKED_BACKENDS = ("flash", "torch_varlen")  # the CUDA varlen kernels (causal packed prefill too)
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
    src: torch.Tensor | None = None  # (n_real,) gathered rows that are real tokens (padded buckets only)
    dest: torch.Tensor | None = None  # (n_real,) their token rows


@dataclass
class VarlenPlan:
    """Segment layout of one packed sequence: cumulative lengths plus the SDPA bucket plan."""
    cu_seqlens: torch.Tensor  # (S+1,) int32 on the compute device
    max_seqlen: int
    buckets: list[_Bucket] = field(default_factory=list)

    @classmethod
    def build(cls, lengths: list[int], device: torch.device, backend: str, pad_waste: float = 0.25) -> "VarlenPlan":
        """lengths: host list of segment lengths, in packed order. Built with numpy on the host (no device reads)."""
        lens = np.asarray(lengths, dtype=np.int64)
        cu = np.concatenate([[0], np.cumsum(lens)])
        plan = cls(cu_seqlens=torch.from_numpy(cu).to(device=device, dtype=torch.int32), max_seqlen=int(lens.max()))
        if backend == "sdpa":
            plan.buckets = _make_buckets(lens, cu, device, pad_waste)
        return plan


def _make_buckets(lens: np.ndarray, cu: np.ndarray, device, pad_waste: float) -> list[_Bucket]:
    starts = cu[:-1]
    distinct = sorted(set(lens.tolist()), reverse=True)
    groups: list[list[int]] = []
    for L in distinct:  # greedy: a bucket takes lengths within pad_waste of its longest
        if groups and L >= groups[-1][0] * (1 - pad_waste):
            groups[-1].append(L)
        else:
            groups.append([L])

    def dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    buckets = []
    for g in groups:
        Lmax = g[0]
        sel = np.flatnonzero(np.isin(lens, g))  # segment ids, packed order
        seg_len, seg_start = lens[sel], starts[sel]
        n = len(sel)
        if len(g) == 1:
            if (np.diff(seg_start) == Lmax).all():
                buckets.append(_Bucket(None, int(seg_start[0]), n, Lmax))  # contiguous run: slice and view
                continue
            buckets.append(_Bucket(dev(seg_start[:, None] + np.arange(Lmax)), 0, n, Lmax))
            continue
        ar = np.arange(Lmax)
        valid = ar[None, :] < seg_len[:, None]  # (n, Lmax)
        idx = np.where(valid, seg_start[:, None] + ar, seg_start[:, None])  # pad rows re-read a real row
        src = np.flatnonzero(valid)
        buckets.append(_Bucket(dev(idx), 0, n, Lmax, mask=dev(valid[:, None, None, :]), src=dev(src),
                               dest=dev(idx.reshape(-1)[src])))
    return buckets


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: VarlenPlan, backend: str,
                     causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Attention within each segment of ``plan``. q (N, H, D), k/v (N, Hkv, D) (GQA when Hkv < H) -> (N, H, D).

    ``causal``: each token sees the earlier tokens of its segment (the decoder's packed prefill).
    """
    if backend == "flash":
        return _flash_varlen(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen,
                             softmax_scale=scale, causal=causal)
    if backend == "torch_varlen":
        return _torch_varlen_call(q, k, v, plan, causal, scale)
    if causal:
        raise ValueError("the 'sdpa' varlen backend is bidirectional; run a causal batch padded")
    return _sdpa_buckets(q, k, v, plan, scale)


def _torch_varlen_call(q, k, v, plan: VarlenPlan, causal: bool, scale) -> torch.Tensor:
    kw = {"scale": scale}
    if causal:
        if "window_size" in _VARLEN_KW:
            kw["window_size"] = (-1, 0)
        else:
            kw["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in _VARLEN_KW:
            kw["enable_gqa"] = True
        else:  # older torch: repeat the KV heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return _torch_varlen(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen, **kw)


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
        if b.src is None:
            out.index_copy_(0, flat, o)
        else:
            out.index_copy_(0, b.dest, o.index_select(0, b.src))
    return out
