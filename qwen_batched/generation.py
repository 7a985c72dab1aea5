"""Batched generation: static KV cache, one prefill, fixed-shape decode steps, sampling.

The cache is compact: row b keeps its n_b real prompt tokens at [0, n_b) (pads dropped), and decode step j
writes at n_b + j. A step therefore has static shapes (cache (B, Hkv, S, hd), index tensors, a length mask),
which suits torch.compile / CUDA graphs; ``StaticDecoder`` is that step as a module. On CUDA the eager step is
replayed as one captured CUDA graph (``CapturedStep``): a decode step at batch 32 is a few hundred small kernels,
so without a graph the GPU waits on their launches.

Positions of new tokens follow the reference ``generate``: new token j sits at the (t, h, w) position of the
row's last prompt token + 1 + j (the same as ``rope_deltas`` + n_prompt + j whenever the prompt ends in text).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .graphs import capture
from .rope import mrope_cos_sin
from .text import TextModel, last_index, real_tokens, run_batch, token_runs
from .validation import is_int


class KVCache:
    """Per-layer k/v caches (B, Hkv, S, hd), zero-initialised (masked slots must stay finite)."""

    def __init__(self, n_layers: int, batch: int, n_kv: int, length: int, head_dim: int, device, dtype):
        shape = (batch, n_kv, length, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.rows = self.cols = None

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def prompt_sink(self, lengths: list[int]):
        """A ``run_batch`` sink writing each row's n_b real prompt tokens (host ``lengths``) to [0, n_b), built on
        the host: the sink receives the real tokens in (batch, seq) order."""
        rows, cols = token_runs(lengths)  # row and compact column of each real token
        dev = self.k[0].device
        rows, cols = (torch.from_numpy(a).to(dev, non_blocking=True) for a in (rows, cols))

        def sink(idx: int, k: torch.Tensor, v: torch.Tensor) -> None:  # k, v: (T, Hkv, hd)
            self.k[idx][rows, :, cols] = k
            self.v[idx][rows, :, cols] = v

        return sink

    def scatter_sink(self, src: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        """A ``run_batch`` sink writing real token ``src[i]`` (index in (batch, seq) order) to cache slot
        (rows[i], cols[i]): one token may fill several rows (a prefix shared by them). All (N,) long."""

        def sink(idx: int, k: torch.Tensor, v: torch.Tensor) -> None:  # k, v: (T, Hkv, hd)
            self.k[idx][rows, :, cols] = k[src]
            self.v[idx][rows, :, cols] = v[src]

        return sink


class CachedPrefillAttention:
    """New tokens of a row attend to the row's cached tokens and to its new tokens up to themselves.

    Each layer first writes the new real tokens' k/v at their compact cache slots, then runs SDPA with
    q = the new tokens (R, T) and k/v = the rows' cache up to ``kv_len``. mask (R, 1, T, kv_len) bool.
    """

    def __init__(self, cache: KVCache, rows, write_rows, write_cols, tok, mask, kv_len: int):
        self.cache, self.rows, self.kv_len = cache, rows, kv_len
        self.write_rows, self.write_cols, self.tok, self.mask = write_rows, write_cols, tok, mask

    def __call__(self, idx, q, k, v):  # q (R, T, H, hd), k/v (R, T, Hkv, hd)
        kc, vc = self.cache.k[idx], self.cache.v[idx]
        kc[self.write_rows, :, self.write_cols] = k.flatten(0, 1)[self.tok]
        vc[self.write_rows, :, self.write_cols] = v.flatten(0, 1)[self.tok]
        keys = kc[self.rows, :, :self.kv_len]  # (R, Hkv, S, hd)
        values = vc[self.rows, :, :self.kv_len]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=self.mask,
                                           enable_gqa=q.shape[-2] != keys.shape[1])  # (R, H, T, hd)
        return o.transpose(1, 2).flatten(-2)


def prefill_on_cache(text: TextModel, cache: KVCache, h: torch.Tensor, position_ids: torch.Tensor,
                     valid: torch.Tensor, *, rows: torch.Tensor | range, cached: torch.Tensor,
                     rope: tuple[torch.Tensor, torch.Tensor], kv_len: int | None = None, depth: int | None = None,
                     keep: Iterable[int] = (), final_norm: bool = True, lengths: Sequence[int] | None = None,
                     starts: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Prefill new tokens on top of what ``cache`` already holds for their rows, appending them to it.

    The building block for prompts sharing a prefix (the prefix prefilled once, each row's suffix on top:
    ``prefix.run_shared``), and for what needs a prompt continued on a live cache: the next turn of a chat
    (on top of the conversation so far, generated tokens included) and continuous batching (a finished row's
    slot refilled with ``cached`` = 0, a fresh prompt, while the other rows keep decoding).

    h: (R, T, D) embeddings of the new tokens (any padding side); position_ids: (3, R, T) their M-RoPE positions,
    continuing the cached ones (``rope_index(new_ids, mask, ..., start=next)`` with ``next`` the 1-D position after
    the cached tokens: the last one's + 1 when it is text, last prompt position + 1 + n after n decoded tokens);
    valid: (R, T) bool, real new tokens.
    rows: the cache row of each new row, a (R,) long tensor or a ``range`` (contiguous rows: the cache is read as
    a view). cached: (R,) long, tokens each row holds at [0, cached); its new real tokens go to
    [cached, cached + n) (the compact layout ``generate`` decodes from: write the first new token at cached + n).
    kv_len: host bound on cached + n over the rows (the keys read per layer; default the cache length).
    lengths / starts: host (R,) real new tokens and first real column of each row, when each row's new tokens are
    one run: they are then indexed without reading the device (``text.real_tokens``); both or neither. They must
    agree with ``valid`` (checked against h's width, not against valid: that would be a device read).
    depth / keep / final_norm as ``TextModel.forward``; the cache must hold at least ``depth`` layers.
    Returns (last (R, D): the state at each row's last new token, {index: (R, T, D) states, zero at pads}).
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
    for name, x, dim in (("h", h, 3), ("position_ids", position_ids, 3), ("valid", valid, 2), ("cached", cached, 1)):
        if not isinstance(x, torch.Tensor) or x.dim() != dim:
            raise ValueError(f"{name} must be a {dim}-D tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    R, T, _ = h.shape
    if valid.dtype != torch.bool or tuple(valid.shape) != (R, T):
        raise ValueError(f"valid must be a ({R}, {T}) bool tensor, got {tuple(valid.shape)} {valid.dtype}")
    if tuple(position_ids.shape) != (3, R, T):
        raise ValueError(f"position_ids must have shape (3, {R}, {T}), got {tuple(position_ids.shape)}")
    if cached.shape[0] != R or cached.dtype.is_floating_point:
        raise ValueError(f"cached must be ({R},) integer tokens held per row, got {tuple(cached.shape)} {cached.dtype}")
    if not cache.k:
        raise ValueError("the cache holds no layers (a prefill on a cache runs at least one layer)")
    n_rows = cache.k[0].shape[0]
    if isinstance(rows, range):
        if len(rows) != R or rows.step != 1 or rows.start < 0 or rows.stop > n_rows:
            raise ValueError(f"rows must be a step-1 range of {R} cache rows within 0..{n_rows - 1}, got {rows}")
        sel, row_idx = slice(rows.start, rows.stop), torch.arange(rows.start, rows.stop, device=h.device)
    elif isinstance(rows, torch.Tensor) and rows.dim() == 1 and rows.shape[0] == R and not rows.dtype.is_floating_point:
        sel = row_idx = rows.long()
    else:
        raise ValueError(f"rows must be a ({R},) long tensor of cache rows or a range, got {rows!r:.80}")
    kv_len = cache.length if kv_len is None else kv_len
    if isinstance(kv_len, bool) or not isinstance(kv_len, int) or not 1 <= kv_len <= cache.length:
        raise ValueError(f"kv_len must be an int in 1..{cache.length} (the cache length), got {kv_len!r}")
    if (lengths is None) != (starts is None) or lengths is not None and not (
            len(lengths) == len(starts) == R and all(is_int(v) and v >= 0 for v in (*lengths, *starts))):
        raise ValueError(f"lengths and starts must both be None or both {R} ints >= 0 (host real new tokens and "
                         f"first real column per row), got {lengths!r:.80} and {starts!r:.80}")
    if lengths is not None and any(s + n > T for s, n in zip(starts, lengths)):
        raise ValueError(f"starts + lengths must stay within the {T} columns of h (each row's real new tokens are "
                         f"one run inside its row), got starts {list(starts)!r:.80} and lengths {list(lengths)!r:.80}")
    n_layers = len(text.layers) if depth is None else depth
    if n_layers > len(cache.k):
        raise ValueError(f"the cache holds {len(cache.k)} layers but {n_layers} are run (depth)")

    dev = h.device
    cached = cached.to(dev).long()
    qcol = torch.where(valid, cached[:, None] + valid.long().cumsum(1) - 1, 0)  # (R, T) compact slot (pad: 0)
    mask = (torch.arange(kv_len, device=dev) <= qcol[..., None])[:, None]  # (R, 1, T, S): causal over the row
    tok = real_tokens(valid, lengths, starts)  # (N,) the real new tokens, once per call
    write_rows = row_idx[:, None].expand(R, T).flatten()[tok]
    write_cols = qcol.flatten()[tok]
    attn = CachedPrefillAttention(cache, sel, write_rows, write_cols, tok, mask, kv_len)
    cos, sin = mrope_cos_sin(position_ids, *rope, h.dtype)  # (R, T, hd)
    out, states = text(h, cos, sin, attn, depth=depth, keep=keep, final_norm=final_norm)
    pad = ~valid[..., None]
    return out[torch.arange(R, device=dev), last_index(valid)], {i: x.masked_fill(pad, 0) for i, x in states.items()}


class DecodeAttention:
    """One new token per row: write its k/v at ``write_idx`` and attend to the cache up to it."""

    def __init__(self, k_cache, v_cache, rows: torch.Tensor, write_idx: torch.Tensor):
        S = k_cache[0].shape[2]
        self.k, self.v, self.rows, self.write_idx = k_cache, v_cache, rows, write_idx
        keys = torch.arange(S, device=write_idx.device)
        self.mask = (keys[None, :] <= write_idx[:, None])[:, None, None, :]  # (B, 1, 1, S)

    def __call__(self, idx, q, k, v):  # q (B, 1, H, hd), k/v (B, 1, Hkv, hd)
        kc, vc = self.k[idx], self.v[idx]
        kc[self.rows, :, self.write_idx] = k[:, 0]
        vc[self.rows, :, self.write_idx] = v[:, 0]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), kc, vc, attn_mask=self.mask,
                                           enable_gqa=q.shape[-2] != kc.shape[1])  # (B, H, 1, hd)
        return o.transpose(1, 2).flatten(-2)


class StaticDecoder(nn.Module):
    """The decode step over a fixed cache: (tokens (B,), positions (3, B), write_idx (B,)) -> logits (B, V) fp32."""

    def __init__(self, text: TextModel, lm_head: nn.Linear, cache: KVCache, rope: tuple[torch.Tensor, torch.Tensor]):
        super().__init__()
        self.text, self.lm_head, self.cache = text, lm_head, cache
        self.register_buffer("rows", torch.arange(cache.k[0].shape[0], device=cache.k[0].device), persistent=False)
        self.register_buffer("freqs", rope[0], persistent=False)
        self.register_buffer("sections", rope[1], persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, write_idx: torch.Tensor) -> torch.Tensor:
        h = self.text.embed_tokens(tokens)[:, None]  # (B, 1, D)
        cos, sin = mrope_cos_sin(positions[..., None], self.freqs, self.sections, h.dtype)  # (B, 1, hd)
        attn = DecodeAttention(self.cache.k, self.cache.v, self.rows, write_idx)
        h, _ = self.text(h, cos, sin, attn)
        return self.lm_head(h[:, 0]).float()


class CapturedStep:
    """The eager ``StaticDecoder`` step replayed as one CUDA graph over static input buffers.

    Captured on the first call with that call's inputs (``graphs.capture``): a step is idempotent (run again, it
    writes the same k/v to the same cache slots), so the capture's warm-up runs change nothing. Later calls copy
    their inputs into the buffers and replay; each replay overwrites ``logits`` (callers clone it).
    """

    def __init__(self, dec: StaticDecoder):
        self.dec, self.graph = dec, None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, write_idx: torch.Tensor) -> torch.Tensor:
        args = (tokens, positions, write_idx)
        if self.graph is None:
            self.inputs = tuple(a.clone() for a in args)
            self.graph, self.logits = capture(lambda: self.dec(*self.inputs), tokens.device)
        else:
            for buf, a in zip(self.inputs, args):
                buf.copy_(a)
        self.graph.replay()
        return self.logits


CUDA_GRAPHS = True  # False: the decode step always runs eagerly (for comparisons and debugging)
# a capture costs about three eager steps (two warm-ups, then the replay of the captured step); it waits until a
# stop check has seen rows still running and at least this many steps are left, so short answers never pay it
CAPTURE_MIN_STEPS = 6


def _use_step(mode: str, step, j: int, steps_left: int, sync_every: int) -> bool:
    """Whether decode step ``j`` (``steps_left`` steps to go, this one included) runs through the compiled or
    captured ``step`` instead of eagerly: always when compiled or already captured (a graph kept from an earlier
    call of the same shape); a new capture once a stop check has passed (j >= sync_every - 1) and enough steps
    are left to pay for it."""
    if step is None:
        return False
    if mode == "compiled" or step.graph is not None:
        return True
    return j >= sync_every - 1 and steps_left >= CAPTURE_MIN_STEPS


# ---------------------------------------------------------------------------------------------- sampling
_M1, _M2 = -4658895280553007687, -7723592293110705685  # splitmix64 multipliers, as signed int64
_GOLDEN = -7046029254386353131


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (arithmetic mod 2**64; logical shifts by masking the sign extension)."""
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _M1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def uniforms(seeds: torch.Tensor, step: int, n: int) -> torch.Tensor:
    """(B, n) float64 uniforms in (0, 1), a pure function of (row seed, step, column): counter-based, so a row's
    draws do not depend on which other rows share its batch or how a batch is split. seeds: (B,) int64."""
    row = _mix64(seeds * _GOLDEN + step)  # (B,)
    cols = torch.arange(n, device=seeds.device, dtype=torch.int64) * _GOLDEN  # (n,)
    bits = _mix64(row[:, None] ^ cols)  # (B, n)
    return (((bits >> 11) & ((1 << 53) - 1)).double() + 0.5) / 2.0 ** 53


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, seeds: torch.Tensor | None,
           step: int = 0) -> torch.Tensor:
    """logits (B, V) fp32 -> tokens (B,). temperature 0 is greedy; top_k 0 / top_p 1 disable those filters.
    seeds (B,) int64: each row's randomness (see ``uniforms``); ``step`` the index of the token being drawn."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = (p.cumsum(-1) - p) >= top_p  # the mass before a token already reaches top_p (never the first)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    # Exponential race: argmax log p_i - log E_i with E_i = -log U_i ~ Exp(1) draws i with probability p_i.
    race = -torch.log(-torch.log(uniforms(seeds, step, logits.shape[-1])))
    return (logits.log_softmax(-1).double() + race).argmax(-1)


# ---------------------------------------------------------------------------------------------- the loop
def _decode_mode(model, compile: bool) -> str:
    """'compiled' (torch.compile, CUDA graphs on a GPU), 'graph' (the eager step captured when it pays: CUDA, one
    process) or 'eager'."""
    if compile:
        return "compiled"
    if CUDA_GRAPHS and model.device.type == "cuda" and model.tp is None:
        return "graph"
    return "eager"


def _decode_fns(model, batch: int, length: int, mode: str):
    """(eager StaticDecoder, the step to run: compiled / captured, or None for eager). The compiled and captured
    steps are kept in ``model.caches.decode`` with their cache and reused while (mode, batch, cache length, dtype,
    device) stay the same, so a graph is built once; a captured step whose cache would hold more than an eighth of
    the device's memory between calls is built for its call only."""
    cfg, caches = model.cfg.text, model.caches
    if mode != "eager":
        key = (mode, batch, length, model.dtype, str(model.device))
        kept = caches.decode
        if kept is not None and kept[0] == key:
            dec, step = kept[1], kept[2]
            for t in dec.cache.k + dec.cache.v:
                t.zero_()
            return dec, step
        caches.decode = None  # drop the old cache before allocating a new one
    n_kv = model.model.layers[0].self_attn.n_kv  # this rank's KV heads under tensor parallelism
    cache = KVCache(cfg.num_hidden_layers, batch, n_kv, length, cfg.head_dim, model.device, model.dtype)
    dec = StaticDecoder(model.model, model.lm_head, cache, caches.rope(model.device))
    if mode == "eager":
        return dec, None
    if mode == "graph":
        step = CapturedStep(dec)
        held = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
        if held > torch.cuda.get_device_properties(model.device).total_memory // 8:
            return dec, step
    else:
        for t in cache.k + cache.v:
            torch._dynamo.mark_static_address(t)
        step = torch.compile(dec, mode="reduce-overhead", fullgraph=True, dynamic=False)
    caches.decode = (key, dec, step)
    return dec, step


@torch.inference_mode()
def generate_tokens(model, embeds: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor, *,
                    lengths: list[int], max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                    eos_ids: Sequence[int], pad_id: int, seeds: torch.Tensor, compile: bool = False,
                    starts: list[int] | None = None,
                    sync_every: int = 1, prefill: Callable[[KVCache], torch.Tensor] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill then decode. embeds (B, L, D), position_ids (3, B, L), valid (B, L) bool, lengths: real tokens
    per row (host), starts: each row's first real column when no row has masked holes (host; see
    ``text.run_batch``), seeds (B,) int64 per-row sampling seeds. ``prefill(cache)``, if given, replaces the one
    padded prefill: it fills each row's n_b prompt tokens into cache slots [0, n_b) and returns the state at each
    row's last prompt token (B, D) (e.g. ``prefix.run_shared``).

    Returns sequences (B, max_new_tokens) (pad after a stop) and lengths (B,) (EOS included).
    """
    B, L, _ = embeds.shape
    dev = embeds.device
    S = L + max_new_tokens
    mode = _decode_mode(model, compile)
    if mode != "eager" or dev.type == "cuda":  # fewer distinct shapes -> fewer recompiles / captures (and on
        S = -(-S // 256) * 256                # CUDA the same attention length with or without a graph)
    dec, step_fn = _decode_fns(model, B, S, mode)
    cache = dec.cache
    if prefill is None:
        last_h, _ = run_batch(model.model, embeds, position_ids, valid, rope=model.caches.rope(dev),
                              backend=model.backend, lengths=lengths, starts=starts, sink=cache.prompt_sink(lengths))
    else:
        last_h = prefill(cache)
    logits = model.lm_head(last_h).float()  # (B, V)

    rows = torch.arange(B, device=dev)
    last = position_ids[:, rows, last_index(valid)]  # (3, B) position of each row's last prompt token
    n_prompt = torch.tensor(lengths, device=dev)  # (B,) compact write index of the first new token
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=dev)
    seqs = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    n_new = torch.zeros(B, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)

    for j in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, top_p, seeds, j)
        tok = tok.masked_fill(done, pad_id)
        seqs[:, j] = tok
        n_new += ~done
        done |= torch.isin(tok, eos)
        if j == max_new_tokens - 1 or ((j + 1) % sync_every == 0 and bool(done.all())):
            break
        args = (tok, last + 1 + j, n_prompt + j)  # new token j sits right after the prompt's last position
        if _use_step(mode, step_fn, j, max_new_tokens - 1 - j, sync_every):
            try:
                torch.compiler.cudagraph_mark_step_begin()
                logits = step_fn(*args).clone()
                continue
            except Exception as e:  # compile/graph failure: eager from here on (the step is idempotent)
                what = "torch.compile of" if mode == "compiled" else "CUDA graph capture of"
                warnings.warn(f"{what} the decode step failed ({type(e).__name__}: {e}); running eager")
                step_fn = None
                model.caches.decode = None
        logits = dec(*args)
    return seqs, n_new
