"""Which items go where: split over the ranks by estimated tokens, then length-sorted batches within budgets."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

from .dist import Dist
from .inputs import Item


def split_balanced(costs: Sequence[float], world: int) -> list[list[int]]:
    """Split item positions into ``world`` parts of near-equal total cost (longest-first greedy).

    Deterministic (ties by position), so every rank computes the same split. Each part is in input order.
    """
    import heapq

    heap = [(0.0, 0, r) for r in range(world)]  # (load, items, rank): the least loaded rank pops first
    parts: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, n, r = heapq.heappop(heap)
        parts[r].append(i)
        heapq.heappush(heap, (load + costs[i], n + 1, r))
    return [sorted(p) for p in parts]


def plan_batches(order: Sequence[int], tokens: Sequence[int], *, batch_size: int, max_batch_tokens: int | None = None,
                 window: int = 1024, extra_tokens: int = 0) -> list[list[int]]:
    """Group positions into batches of similar length.

    ``order`` is walked in windows of ``window`` items; inside a window items are sorted by estimated tokens
    (longest first, so a memory problem shows up early) and cut into batches of at most ``batch_size`` items
    whose padded size ``len(batch) * (max tokens + extra_tokens)`` stays within ``max_batch_tokens`` (an item
    over the budget on its own forms a batch of one).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    window = max(1, int(window))
    batches: list[list[int]] = []
    order = list(order)
    for s in range(0, len(order), window):
        chunk = sorted(order[s:s + window], key=lambda i: (-tokens[i], i))
        cur: list[int] = []
        cur_max = 0
        for i in chunk:
            t = tokens[i] + extra_tokens
            new_max = max(cur_max, t)
            if cur and (len(cur) >= batch_size or
                        (max_batch_tokens is not None and (len(cur) + 1) * new_max > max_batch_tokens)):
                batches.append(cur)
                cur, new_max = [], t
            cur.append(i)
            cur_max = new_max
        if cur:
            batches.append(cur)
    return batches


@dataclass
class Plan:
    pending: list[int]        # positions still to do (all ranks)
    mine: list[int]           # this rank's positions
    batches: list[list[int]]  # this rank's batches
    n_done: int               # items already finished by earlier runs


def make_plan(items: list[Item], done_keys: set[str], estimator: Callable[[Item], tuple[int, int]], dist: Dist, *,
              batch_size: int, max_batch_tokens: int | None, window: int, extra_tokens: int,
              threads: int = 4) -> Plan:
    """The same plan on every rank: header reads are split over the ranks (and threads) and all-gathered."""
    pending = [i for i, it in enumerate(items) if it.key not in done_keys]
    share = pending[dist.rank::dist.world]
    if threads > 1 and len(share) > 64:
        with ThreadPoolExecutor(threads, thread_name_prefix="qwen-batched-estimate") as pool:
            est = list(pool.map(lambda i: estimator(items[i])[0], share, chunksize=64))
    else:
        est = [estimator(items[i])[0] for i in share]
    local = dict(zip(share, est))
    tokens = [0] * len(items)
    for part in dist.all_gather(local):
        for i, t in part.items():
            tokens[int(i)] = int(t)
    parts = split_balanced([tokens[i] + extra_tokens for i in pending], dist.world)
    mine = [pending[j] for j in parts[dist.rank]]
    batches = plan_batches(mine, tokens, batch_size=batch_size, max_batch_tokens=max_batch_tokens, window=window,
                           extra_tokens=extra_tokens)
    return Plan(pending, mine, batches, len(items) - len(pending))
