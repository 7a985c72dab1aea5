"""The Qwen2 decoder: embeddings, GQA attention layers with M-RoPE, final norm.

Module names mirror the checkpoint (``model.embed_tokens``, ``model.layers.N.self_attn.q_proj`` ...), so the
loader maps keys one to one.

The layers are layout-agnostic: tokens are (..., T, D), either padded (B, L, D) or packed (T, D). Attention
itself is a callable ``attn(layer_idx, q, k, v) -> o`` with q (..., T, H, hd), k/v (..., T, Hkv, hd) and
o (..., T, H*hd), so one decoder serves the padded SDPA prefill, the packed varlen prefill and the KV-cache
decode step (see the ``*Attention`` classes below and ``generation.py``).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import PACKED_BACKENDS, VarlenPlan, varlen_attention
from .batching import is_oom
from .config import TextConfig
from .fused import rope_qk
from .layers import RMSNorm, SwiGLU
from .rope import mrope_cos_sin

AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        hd = cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=True)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttnFn, idx: int) -> torch.Tensor:
        """x (..., T, D), cos/sin (..., T, hd) -> (..., T, D)"""
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(*lead, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(*lead, self.n_kv, self.head_dim)
        q, k = rope_qk(q, k, cos, sin)  # one kernel on CUDA (~10 small ops in eager torch)
        return self.o_proj(attn(idx, q, k, v))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x, cos, sin, attn: AttnFn, idx: int) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), cos, sin, attn, idx)
        x, h = self.post_attention_layernorm.add_and_norm(x, a)  # x + a and its norm
        return x + self.mlp(h)


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttnFn, *,
                depth: int | None = None, keep: Iterable[int] = (), final_norm: bool = True,
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the first ``depth`` layers (default all) on embeddings h (..., T, D).

        ``keep``: hidden-state indices to return (0 = embeddings, i = output of layer i; index num_layers is
        taken after the final norm when ``final_norm``). Returns (last state, {index: state}); the last state is
        normed iff depth == num_layers and final_norm.
        """
        n = len(self.layers)
        depth = n if depth is None else depth
        keep = set(keep)
        states = {0: h} if 0 in keep else {}
        for i in range(depth):
            h = self.layers[i](h, cos, sin, attn, i)
            if i + 1 in keep:
                states[i + 1] = h
        if depth == n and final_norm:
            h = self.norm(h)
            if n in keep:
                states[n] = h
        return h, states


# ---------------------------------------------------------------------------------------------- attention
def _merge_heads(o: torch.Tensor) -> torch.Tensor:
    return o.flatten(-2)  # (..., T, H, hd) -> (..., T, H*hd)


class PaddedAttention:
    """SDPA over a padded batch: causal plus key-padding mask; optionally fills a compact KV cache.

    mask: (B, 1, L, L) bool from ``padded_mask``. q (B, L, H, hd), k/v (B, L, Hkv, hd). tok: (T,) flat indices
    of the real tokens (``real_tokens``), for the sink.
    """

    def __init__(self, mask: torch.Tensor, sink: Callable | None = None, tok: torch.Tensor | None = None):
        self.mask, self.sink, self.tok = mask, sink, tok

    def __call__(self, idx, q, k, v):
        if self.sink is not None:  # the cache keeps only real tokens, in order (an index: no read per layer)
            self.sink(idx, k.flatten(0, 1)[self.tok], v.flatten(0, 1)[self.tok])
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=self.mask, enable_gqa=q.shape[-2] != k.shape[-2])
        return _merge_heads(o.transpose(1, 2))


def padded_mask(valid: torch.Tensor) -> torch.Tensor:
    """valid (B, L) bool -> (B, 1, L, L) bool: causal over real keys. A pad query also sees itself, so its
    (unused) row stays finite instead of NaN."""
    L = valid.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(L, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


class PackedAttention:
    """Causal varlen attention over packed tokens (CUDA, fp16/bf16): q (T, H, hd), k/v (T, Hkv, hd)."""

    def __init__(self, plan: VarlenPlan, backend: str, sink: Callable | None = None):
        self.plan, self.backend, self.sink = plan, backend, sink

    def __call__(self, idx, q, k, v):
        if self.sink is not None:
            self.sink(idx, k, v)
        return _merge_heads(varlen_attention(q, k, v, self.plan, self.backend, causal=True))


# ---------------------------------------------------------------------------------------------- batch forward
def token_runs(lengths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(row, within), each (sum(lengths),) int64 on the host: for every token of rows holding ``lengths[b]``
    tokens each, in (batch, seq) order, its row and its index inside the row's run."""
    n = np.asarray(lengths, dtype=np.int64)
    return np.repeat(np.arange(len(n)), n), np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)


def real_tokens(valid: torch.Tensor, lengths: list[int] | None = None,
                starts: list[int] | None = None) -> torch.Tensor:
    """(T,) long: flat (batch, seq) indices of the real tokens of ``valid`` (B, L), in order. Built on the host,
    without reading the device, from each row's first real column (``starts``) and real-token count
    (``lengths``) when the caller knows every row's real tokens are one run; else one read of the mask."""
    if starts is None or lengths is None:
        return valid.flatten().nonzero().squeeze(1)
    row, within = token_runs(lengths)  # (T,), (T,)
    idx = row * valid.shape[1] + np.asarray(starts, dtype=np.int64)[row] + within
    return torch.from_numpy(idx).to(valid.device, non_blocking=True)


def last_index(valid: torch.Tensor) -> torch.Tensor:
    """valid (B, L) bool -> (B,) index of each row's last real token."""
    return valid.shape[1] - 1 - valid.flip(1).int().argmax(1)


def run_batch(text: TextModel, h: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor, *,
              rope: tuple[torch.Tensor, torch.Tensor], backend: str = "sdpa", lengths: list[int] | None = None,
              starts: list[int] | None = None, depth: int | None = None, keep: Iterable[int] = (),
              final_norm: bool = True, sink: Callable | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Decoder over a padded batch.

    h: (B, L, D) input embeddings; position_ids: (3, B, L); valid: (B, L) bool; rope: (inverse frequencies,
    section index) from ``ModelCaches.rope``. backend: 'sdpa' (padded, masked SDPA) or 'flash' / 'torch_varlen'
    (real tokens packed, causal varlen; ``lengths`` = real tokens per row, known on the host). ``starts``: each
    row's first real column, when the host knows the rows have no masked holes (the real tokens are then indexed
    without reading the device).
    sink(layer, k, v): receives each layer's rotated k/v of the real tokens, (T, Hkv, hd) in (batch, seq) order.
    Returns (last (B, D): state at each row's last real token, {index: (B, L, D) state, zero at pads}).
    """
    cos, sin = mrope_cos_sin(position_ids, *rope, h.dtype)  # (B, L, hd)
    B, L, D = h.shape
    tok = real_tokens(valid, lengths, starts) if backend in PACKED_BACKENDS or sink is not None else None
    if backend in PACKED_BACKENDS:
        try:
            return _run_packed(text, h, cos, sin, valid, tok, backend, lengths, depth, keep, final_norm, sink)
        except RuntimeError as e:  # e.g. a GPU the varlen kernel does not support: padded SDPA instead
            if is_oom(e):  # (padded SDPA needs more memory, not less: the caller halves the batch)
                raise
            warnings.warn(f"packed {backend} prefill failed ({e}); using padded SDPA")
    attn = PaddedAttention(padded_mask(valid), sink, tok)
    out, states = text(h, cos, sin, attn, depth=depth, keep=keep, final_norm=final_norm)
    pad = ~valid[..., None]
    rows = torch.arange(B, device=h.device)
    return out[rows, last_index(valid)], {i: x.masked_fill(pad, 0) for i, x in states.items()}


def _run_packed(text, h, cos, sin, valid, tok, backend, lengths, depth, keep, final_norm, sink):
    """run_batch with the real tokens packed into (T, D) (tok: their (T,) flat indices) and causal varlen
    attention."""
    B, L, D = h.shape
    if lengths is None:
        lengths = valid.sum(1).tolist()
    plan = VarlenPlan.build(lengths, h.device, backend)
    attn = PackedAttention(plan, backend, sink)
    out, packed = text(h.flatten(0, 1)[tok], cos.flatten(0, 1)[tok], sin.flatten(0, 1)[tok], attn,
                       depth=depth, keep=keep, final_norm=final_norm)

    def unpack(x):  # (T, D) -> (B, L, D), zeros at pads
        return x.new_zeros(B * L, D).index_copy_(0, tok, x).view(B, L, D)

    return out[plan.cu_seqlens[1:].long() - 1], {i: unpack(x) for i, x in packed.items()}
