"""Splitting a batch that would not fit: token budgets, row slicing with images, OOM halving.

A batch is cut into contiguous row ranges (original order) whose padded size ``rows x longest row`` stays under
``max_batch_tokens``. Each sub-batch carries its own images and videos and drops the pad columns all its rows share, so
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
    pixel_values_videos: torch.Tensor | None = None  # (sum t*h*w, C*T*P*P)
    video_grid_thw: torch.Tensor | None = None  # (n_videos, 3)
    second_per_grid_ts: torch.Tensor | None = None  # (n_videos,)
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


def item_bounds(tokens_per_row: list[int], grid_thw: torch.Tensor | None, merge_unit: int,
                 kind: str) -> tuple[list[int], list[int]]:
    """Items (images or videos) belong to rows in (batch, sequence) order: the item index and the pixel-row offset
    at each row boundary, both (B + 1) lists. A row whose tokens do not add up to whole items raises."""
    if grid_thw is None:
        return [0] * (len(tokens_per_row) + 1), [0] * (len(tokens_per_row) + 1)
    grids = grid_thw.tolist()
    tok = [t * h * w // merge_unit for t, h, w in grids]
    bounds, k = [0], 0
    for r, n in enumerate(tokens_per_row):
        got = 0
        while got < n and k < len(tok):
            got += tok[k]
            k += 1
        if got != n:
            raise ValueError(f"row {r} of input_ids holds {n} {kind} tokens, which is not a whole number of {kind}s "
                             f"of {kind}_grid_thw taken in (batch, sequence) order (each {kind} has t*h*w/"
                             f"{merge_unit} tokens, all in one row)")
        bounds.append(k)
    patches = [0]
    for t, h, w in grids:
        patches.append(patches[-1] + t * h * w)
    return bounds, [patches[k] for k in bounds]


class RowSlicer:
    """Cuts a validated batch into row ranges, each with its own images and videos, trimmed of shared pad columns."""

    def __init__(self, batch: Rows, image_token_id: int, merge_unit: int, video_token_id: int | None = None):
        self.batch = batch
        mask = batch.attention_mask
        # one host transfer: per-row real-token span and image/video-token counts
        cols = torch.arange(mask.shape[1], device=mask.device)
        real = mask.bool()
        first = torch.where(real, cols, mask.shape[1]).min(1).values
        last = torch.where(real, cols, -1).max(1).values
        n_img_tok = (batch.input_ids == image_token_id).sum(1)
        rows = [first, last, n_img_tok]
        if batch.video_grid_thw is not None:
            rows.append((batch.input_ids == video_token_id).sum(1))
        stats = torch.stack(rows).tolist()
        self.first, self.last, img_tok = stats[:3]
        self.lengths = [b - a + 1 for a, b in zip(self.first, self.last)]
        # image / video index range and pixel row range of each row
        self.img_start, self.patch_start = item_bounds(img_tok, batch.image_grid_thw, merge_unit, "image")
        vid_tok = stats[3] if batch.video_grid_thw is not None else [0] * len(img_tok)
        self.vid_start, self.vpatch_start = item_bounds(vid_tok, batch.video_grid_thw, merge_unit, "video")

    def __call__(self, start: int, end: int) -> Rows:
        b = self.batch
        left = min(self.first[start:end])
        right_col = max(self.last[start:end]) + 1
        pv = grid = None
        i0, i1 = self.img_start[start], self.img_start[end]
        if b.image_grid_thw is not None and i1 > i0:
            grid = b.image_grid_thw[i0:i1]
            pv = b.pixel_values[self.patch_start[start]:self.patch_start[end]]
        pvv = vgrid = spg = None
        v0, v1 = self.vid_start[start], self.vid_start[end]
        if b.video_grid_thw is not None and v1 > v0:
            vgrid = b.video_grid_thw[v0:v1]
            pvv = b.pixel_values_videos[self.vpatch_start[start]:self.vpatch_start[end]]
            spg = None if b.second_per_grid_ts is None else b.second_per_grid_ts[v0:v1]
        return Rows(b.input_ids[start:end, left:right_col], b.attention_mask[start:end, left:right_col], pv, grid,
                    pvv, vgrid, spg, left=left, right=b.input_ids.shape[1] - right_col)


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
