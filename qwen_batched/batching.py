"""Splitting a batch that would not fit: token budgets, row slicing with images, OOM halving.

A batch is cut into contiguous row ranges (original order) whose padded size ``rows x longest row`` stays under
``max_batch_tokens``. Each sub-batch carries its own images and drops the pad columns all its rows share, so
results are the same as the whole batch run at once. A sub-batch that runs out of device memory is halved and
retried; a single row that does not fit raises.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Rows:
    """A batch (or a slice of one) ready for the decoder."""
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    pixel_values: torch.Tensor | None  # (sum t*h*w, C*T*P*P)
    image_grid_thw: torch.Tensor | None  # (n_images, 3)
    left: int = 0  # pad columns dropped on the left / right of the parent batch
    right: int = 0


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def check_budget(max_batch_tokens) -> int | None:
    if max_batch_tokens is None:
        return None
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be a positive int or None, got {max_batch_tokens!r}")
    return max_batch_tokens


def plan_ranges(lengths: list[int], budget: int | None, extra: int = 0) -> list[tuple[int, int]]:
    """Contiguous row ranges with ``rows * (longest + extra) <= budget`` (a row longer than that runs alone)."""
    n = len(lengths)
    if budget is None:
        return [(0, n)]
    ranges, start, longest = [], 0, 0
    for i, L in enumerate(lengths):
        new_longest = max(longest, L + extra)
        if i > start and (i - start + 1) * new_longest > budget:
            ranges.append((start, i))
            start, new_longest = i, L + extra
        longest = new_longest
    ranges.append((start, n))
    return ranges


class RowSlicer:
    """Cuts a validated batch into row ranges, each with its own images, trimmed of shared pad columns."""

    def __init__(self, batch: Rows, image_token_id: int, merge_unit: int):
        self.batch = batch
        mask = batch.attention_mask
        # one host transfer: per-row real-token span and image-token counts
        cols = torch.arange(mask.shape[1], device=mask.device)
        real = mask.bool()
        first = torch.where(real, cols, mask.shape[1]).min(1).values
        last = torch.where(real, cols, -1).max(1).values
        n_img_tok = (batch.input_ids == image_token_id).sum(1)
        stats = torch.stack([first, last, n_img_tok]).tolist()
        self.first, self.last, img_tok = stats
        self.lengths = [b - a + 1 for a, b in zip(self.first, self.last)]
        self.img_start = [0]  # image index range of each row
        self.patch_start = [0]  # pixel row range of each row
        if batch.image_grid_thw is not None:
            grids = batch.image_grid_thw.tolist()
            tok = [t * h * w // merge_unit for t, h, w in grids]
            k = 0
            for n in img_tok:  # images belong to rows in (batch, sequence) order
                got = 0
                while got < n:
                    got += tok[k]
                    k += 1
                self.img_start.append(k)
            patches = [0]
            for t, h, w in grids:
                patches.append(patches[-1] + t * h * w)
            self.patch_start = [patches[k] for k in self.img_start]
        else:
            self.img_start = [0] * (len(img_tok) + 1)
            self.patch_start = [0] * (len(img_tok) + 1)

    def __call__(self, start: int, end: int) -> Rows:
        b = self.batch
        left = min(self.first[start:end])
        right_col = max(self.last[start:end]) + 1
        pv = grid = None
        i0, i1 = self.img_start[start], self.img_start[end]
        if b.image_grid_thw is not None and i1 > i0:
            grid = b.image_grid_thw[i0:i1]
            pv = b.pixel_values[self.patch_start[start]:self.patch_start[end]]
        return Rows(b.input_ids[start:end, left:right_col], b.attention_mask[start:end, left:right_col], pv, grid,
                    left=left, right=b.input_ids.shape[1] - right_col)


def run_ranges(ranges: list[tuple[int, int]], fn: Callable[[int, int], object],
               on_oom: Callable[[], None] | None = None) -> list[tuple[tuple[int, int], object]]:
    """Run ``fn(start, end)`` per range in order; on out-of-memory halve the range and retry."""
    todo = list(reversed(ranges))
    done = []
    while todo:
        s, e = todo.pop()
        try:
            done.append(((s, e), fn(s, e)))
        except Exception as err:
            if not is_oom(err) or e - s == 1:
                raise
            if on_oom is not None:
                on_oom()
            mid = (s + e) // 2
            todo += [(mid, e), (s, mid)]
    return done
