"""Rows whose prompts start alike: find them, encode their images and prefill their common prefix once.

Evaluation sets ask several questions about one image, so the rows of a batch often begin with the same
tokens and the same images (system prompt, image block) and differ only in the question, which is a few
tokens against the image's hundreds. ``find_groups`` groups such rows wherever they sit in the batch, comparing
token ids and image contents (fingerprints: not positions, not tensor identity); a group's prefix ends right
after one of its image blocks (the block's <|vision_end|>), before any video and before the row's last token.
``run_shared`` is the decoder pass for a batch with groups: one fresh prefill of every group prefix and of every
row that shares nothing (a prefix's k/v copied into each member's cache row), then every member's own suffix on
top of its cache (``generation.prefill_on_cache``). It returns what ``run_batch`` returns, equal up to rounding.

Groups are one level deep: a row joins the group of the longest prefix it has in common with another row;
a shorter prefix common to several groups is prefilled once per group.
"""
from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig
from .generation import KVCache, prefill_on_cache
from .inputs import BatchLayout, Grid
from .text import TextModel, run_batch

PROBES = 64  # pixel values per image compared before a full content fingerprint


@dataclass(frozen=True)
class PrefixGroups:
    """Which rows of a batch share a prefix.

    group: (B,) group of each row, -1 for a row that shares nothing; groups numbered by their first row.
    prefix: (B,) real tokens of the row's shared prefix (0 for -1 rows).
    image_keys: content key of each image of the batch (row-major), None where none was computed.
    images_per_row: (B,) images of each row (to map rows to their images).
    """
    group: tuple[int, ...]
    prefix: tuple[int, ...]
    image_keys: tuple[bytes | None, ...]
    images_per_row: tuple[int, ...]

    @property
    def any(self) -> bool:
        return any(g >= 0 for g in self.group)

    def order(self) -> list[int]:
        """All rows, each group's members moved next to its first row (to keep groups in one sub-batch)."""
        members: dict[int, list[int]] = {}
        for r, g in enumerate(self.group):
            members.setdefault(g, []).append(r)
        out = []
        for r, g in enumerate(self.group):
            if g < 0:
                out.append(r)
            elif members[g][0] == r:
                out += members[g]
        return out

    def restrict(self, rows: Sequence[int]) -> tuple[list[int], "PrefixGroups"]:
        """(local order, groups of the sub-batch in that order) for the batch rows ``rows``: the members of the
        groups with two or more rows among them first, group by group, then the other rows. A group split over
        sub-batches is a group in each part that holds two of its rows."""
        size = Counter(self.group[r] for r in rows)
        kept = [g for g in dict.fromkeys(self.group[r] for r in rows) if g >= 0 and size[g] >= 2]
        local = [r for g in kept for r in rows if self.group[r] == g]
        local += [r for r in rows if self.group[r] not in kept]
        renum = {g: i for i, g in enumerate(kept)}
        starts = [0, *itertools.accumulate(self.images_per_row)]
        return local, PrefixGroups(
            group=tuple(renum.get(self.group[r], -1) for r in local),
            prefix=tuple(self.prefix[r] if self.group[r] in renum else 0 for r in local),
            image_keys=tuple(k for r in local for k in self.image_keys[starts[r]:starts[r + 1]]),
            images_per_row=tuple(self.images_per_row[r] for r in local))


# ---------------------------------------------------------------------------------------------- grouping
def _prefix_ends(row: np.ndarray, n_tokens: list[int], cfg: ModelConfig) -> list[int]:
    """Candidate prefix lengths of one row's real ids: after each image block (its <|vision_end|> included),
    stopping at the first video token and leaving at least one token after the prefix. k-th entry: the prefix
    holding the row's first k + 1 images."""
    img = np.flatnonzero(row == cfg.image_token_id)
    vid = np.flatnonzero(row == cfg.video_token_id)
    limit = int(vid[0]) if len(vid) else len(row)
    out = []
    for e in img[np.cumsum(n_tokens) - 1].tolist():  # last token of each image
        p = e + 1 + int(e + 1 < len(row) and row[e + 1] == cfg.vision_end_token_id)
        if p >= len(row) or p > limit:
            break
        out.append(p)
    return out


def probe_index(grids: Sequence[Grid], patch_dim: int, n: int = PROBES) -> np.ndarray:
    """(n_images, n) indices into the flattened pixel rows: ``n`` values spread evenly over each image."""
    sizes = np.array([t * h * w * patch_dim for t, h, w in grids], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return starts[:, None] + (np.arange(n)[None, :] * (sizes[:, None] - 1)) // max(n - 1, 1)


def find_groups(ids: np.ndarray, layout: BatchLayout, cfg: ModelConfig, probes: np.ndarray,
                fingerprint: Callable[[list[int]], list[bytes]],
                known_keys: Sequence[bytes] | None = None) -> PrefixGroups:
    """Group the rows of a validated batch by shared prefix.

    ids: (B, L) host token ids. probes: (n_images, k) host values of each image at ``probe_index``: images
    with other probes differ, equal ones are then compared in full by ``fingerprint(images)`` (content keys of
    the given images, ``image_cache.ImageFingerprints.keys``), only where the ids of two rows agree up to an
    image block and their probes agree too. ``known_keys``: content keys of all images when the caller has them
    already (then the probes are not used).
    """
    B = len(layout.first)
    mu = cfg.vision.merge_unit
    n_tok = [t * h * w // mu for t, h, w in layout.image_grids]
    starts = [0, *itertools.accumulate(layout.images_per_row)]
    cands: list[list[tuple[int, bytes]]] = []  # per row: (prefix length, id bytes) for k = 0, 1, ...
    for b in range(B):
        k0, k1 = starts[b], starts[b + 1]
        if k1 == k0:
            cands.append([])
            continue
        row = ids[b, layout.first[b]:layout.last[b] + 1]
        cands.append([(p, row[:p].tobytes()) for p in _prefix_ends(row, n_tok[k0:k1], cfg)])

    keys: list[bytes | None] = list(known_keys) if known_keys is not None else [None] * len(n_tok)

    def keep_shared(stage: Callable[[int, int], bytes]) -> list[list[bytes]]:
        """Truncate each row's candidates to those whose ``stage`` key another row has too (a leading run: two
        rows that share a prefix share its shorter candidates). Returns the kept keys per row."""
        table = [[stage(b, k) for k in range(len(c))] for b, c in enumerate(cands)]
        count = Counter(x for row in table for x in row)
        for b, row in enumerate(table):
            n = sum(count[x] >= 2 for x in row)
            cands[b], table[b] = cands[b][:n], row[:n]
        return table

    def with_images(table: list) -> Callable[[int, int], bytes]:  # ids of the prefix + keys of its images
        return lambda b, k: b"|".join([cands[b][k][1], *(table[starts[b] + i] for i in range(k + 1))])

    def images_in_candidates() -> list[int]:
        return [starts[b] + i for b, c in enumerate(cands) for i in range(len(c))]

    keep_shared(lambda b, k: cands[b][k][1])
    if known_keys is None and any(cands):
        keep_shared(with_images([repr(g).encode() + p.tobytes() for g, p in zip(layout.image_grids, probes)]))
        need = images_in_candidates()
        for i, key in zip(need, fingerprint(need) if need else []):
            keys[i] = key
    table = keep_shared(with_images(keys))

    # each row takes its longest shared candidate; rows left alone by that try again among themselves
    choice = {b: len(row) - 1 for b, row in enumerate(table) if row}  # row -> candidate index
    for _ in range(2):
        sizes = Counter(table[b][k] for b, k in choice.items())
        alone = [b for b, k in choice.items() if sizes[table[b][k]] < 2]
        pool = Counter(x for b in alone for x in table[b])
        for b in alone:
            mine = [k for k, x in enumerate(table[b]) if pool[x] >= 2]
            if mine:
                choice[b] = mine[-1]
            else:
                del choice[b]
    sizes = Counter(table[b][k] for b, k in choice.items())
    number: dict[bytes, int] = {}
    group, prefix = [-1] * B, [0] * B
    for b in range(B):
        k = choice.get(b)
        if k is not None and sizes[table[b][k]] >= 2:
            group[b] = number.setdefault(table[b][k], len(number))
            prefix[b] = cands[b][k][0]
    return PrefixGroups(tuple(group), tuple(prefix), tuple(keys), layout.images_per_row)


# ---------------------------------------------------------------------------------------------- the decoder pass
def run_shared(text: TextModel, h: torch.Tensor, position_ids: torch.Tensor, groups: PrefixGroups,
               first: Sequence[int], lengths: Sequence[int], *, rope: tuple[torch.Tensor, torch.Tensor],
               backend: str = "sdpa", depth: int | None = None, keep: Iterable[int] = (), final_norm: bool = True,
               cache: KVCache | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """``run_batch`` for a batch with prefix groups: each group prefix prefilled once.

    h: (B, L, D) embeddings and position_ids (3, B, L) of the whole batch (its positions are the suffixes' too);
    first / lengths: (B,) host first real column and real tokens of each row; groups: of these rows.
    cache: the generation cache (B rows; row b's prompt ends up in slots [0, lengths[b])), or None to use a
    temporary one for the members only (features).
    Pass 1, from scratch: the group prefixes (one row each) and the rows outside any group, in one batch
    (packed varlen on CUDA); a prefix's k/v go to the cache rows of all its members. Pass 2: each member's suffix
    on top of its cache row (``prefill_on_cache``). Returns (last (B, D), {index: (B, L, D), zero at pads}).
    """
    B, L, D = h.shape
    dev = h.device
    members = [b for b in range(B) if groups.group[b] >= 0]
    solo = [b for b in range(B) if groups.group[b] < 0]
    reps: dict[int, int] = {}  # group -> its first row
    for b in members:
        reps.setdefault(groups.group[b], b)
    G, M = len(reps), len(members)
    if cache is None:
        n_layers = len(text.layers) if depth is None else depth
        cfg = text.cfg
        n_kv = text.layers[0].self_attn.n_kv  # this rank's KV heads under tensor parallelism
        cache = KVCache(n_layers, M, n_kv, max(lengths[b] for b in members), cfg.head_dim, dev, h.dtype)
        cache_row = {b: i for i, b in enumerate(members)}
    else:
        cache_row = {b: b for b in range(B)}

    # ---- pass 1: (source row, first column, tokens, cache rows to fill) per fresh row
    fresh = [(b, first[b], groups.prefix[b], [cache_row[m] for m in members if groups.group[m] == g])
             for g, b in reps.items()]
    fresh += [(b, first[b], lengths[b], [cache_row[b]] if b in cache_row else []) for b in solo]
    n1 = [n for _, _, n, _ in fresh]
    off1 = [0, *itertools.accumulate(n1)]
    src, dst_rows, dst_cols = [], [], []
    for f, (_, _, n, targets) in enumerate(fresh):
        for r in targets:
            src.append(np.arange(off1[f], off1[f] + n))
            dst_rows.append(np.full(n, r))
            dst_cols.append(np.arange(n))
    sink = None
    if src:
        sink = cache.scatter_sink(*(torch.from_numpy(np.concatenate(x)).to(dev) for x in (src, dst_rows, dst_cols)))
    h1, pos1, valid1 = _gather(h, position_ids, [(b, c, n) for b, c, n, _ in fresh])
    last1, states1 = run_batch(text, h1, pos1, valid1, rope=rope, backend=backend, lengths=n1,
                               starts=[0] * len(fresh), depth=depth, keep=keep, final_norm=final_norm,
                               sink=sink)  # (_gather left-aligns every row)

    # ---- pass 2: each member's suffix on top of its cache row
    suffix = [(b, first[b] + groups.prefix[b], lengths[b] - groups.prefix[b]) for b in members]
    h2, pos2, valid2 = _gather(h, position_ids, suffix)
    rows = [cache_row[b] for b in members]
    rows_arg = (range(rows[0], rows[0] + M) if rows == list(range(rows[0], rows[0] + M))
                else torch.tensor(rows, device=dev))
    cached = torch.tensor([groups.prefix[b] for b in members], device=dev)
    last2, states2 = prefill_on_cache(text, cache, h2, pos2, valid2, rows=rows_arg, cached=cached, rope=rope,
                                      kv_len=max(lengths[b] for b in members), depth=depth, keep=keep,
                                      final_norm=final_norm, lengths=[n for _, _, n in suffix], starts=[0] * M)

    # ---- back to the batch's rows and columns
    last = last1.new_empty(B, last1.shape[-1])
    last[torch.tensor(solo + members, device=dev)] = torch.cat([last1[G:], last2])
    if not states1:
        return last, {}
    L1, L2 = h1.shape[1], h2.shape[1]
    into, take = [], []  # flat (B*L) destination, flat index into [pass-1 states, pass-2 states]
    row_of_fresh = {b: f for f, (b, _, _, _) in enumerate(fresh)}
    for b in range(B):
        g = groups.group[b]
        f = row_of_fresh[reps[g]] if g >= 0 else row_of_fresh[b]
        n = groups.prefix[b] if g >= 0 else lengths[b]
        into.append(b * L + first[b] + np.arange(n))
        take.append(f * L1 + np.arange(n))
    for m, (b, c, n) in enumerate(suffix):
        into.append(b * L + c + np.arange(n))
        take.append(len(fresh) * L1 + m * L2 + np.arange(n))
    into_t = torch.from_numpy(np.concatenate(into)).to(dev)
    take_t = torch.from_numpy(np.concatenate(take)).to(dev)
    states = {}
    for i, s1 in states1.items():
        both = torch.cat([s1.flatten(0, 1), states2[i].flatten(0, 1)])
        states[i] = both.new_zeros(B * L, D).index_copy_(0, into_t, both.index_select(0, take_t)).view(B, L, D)
    return last, states


def _gather(h: torch.Tensor, position_ids: torch.Tensor, spans: list[tuple[int, int, int]]):
    """Rows cut from a padded batch: spans (row, first column, tokens) -> left-aligned h (R, T, D), positions
    (3, R, T) and valid (R, T) (pad slots repeat the span's first column)."""
    T = max(n for _, _, n in spans)
    j = np.arange(T)
    n = np.array([n for _, _, n in spans])
    cols = np.array([c for _, c, _ in spans])[:, None] + np.where(j < n[:, None], j, 0)  # (R, T)
    dev = h.device
    rows_t = torch.tensor([b for b, _, _ in spans], device=dev)[:, None]
    cols_t = torch.from_numpy(cols).to(dev)
    valid = torch.from_numpy(j[None, :] < n[:, None]).to(dev)
    return h[rows_t, cols_t], position_ids[:, rows_t, cols_t], valid

