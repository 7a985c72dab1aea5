"""Splitting a batch that would not fit: token budgets and OOM halving.

A batch is cut into contiguous row ranges (original order) whose padded size ``rows x longest row`` stays under
``max_batch_tokens``; each range runs as ``ModelInputs.select_rows(range)``, which carries its own images and
videos and drops the pad columns its rows share, so results are the same as the whole batch run at once. A
sub-batch that runs out of device memory is halved and retried; a single row that does not fit raises.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


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
            err.__traceback__ = None  # drop the failed call's frames (and the activations they hold)
            if on_oom is not None:
                on_oom()
            mid = (s + e) // 2
            todo += [(mid, e), (s, mid)]
    return done
