"""A finished item (:class:`Result`), and how model failures become results: halve-and-retry, failure streaks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


@dataclass
class Result:
    """One finished item: its record, plus tensors for the extract job. ``retry``: redo on the next run."""

    pos: int
    key: str
    record: dict
    retry: bool = False
    tensors: dict | None = None


class FailureGuard:
    """Model errors on single items become error results (retried by the next run); a streak aborts the run."""

    def __init__(self, limit: int):
        self.limit, self.streak = max(1, int(limit)), 0

    def ok(self) -> None:
        self.streak = 0

    def failed(self, e: BaseException) -> None:
        self.streak += 1
        if self.streak >= self.limit:
            raise RuntimeError(f"the model failed on {self.streak} items in a row (last: {_err(e)}); "
                               f"stopping (finished shards are kept, rerun to resume)") from e


def run_split(inputs, positions: list[int], call: Callable, split: Callable, on_fail: Callable,
              guard: FailureGuard, device: torch.device) -> list[Result]:
    """``call(inputs, positions)``; when it raises (e.g. out of memory), halve the batch and retry each half.

    A single item that still fails gets ``on_fail(pos, exc)``.
    """
    try:
        res = call(inputs, positions)
        guard.ok()
        return res
    except Exception as e:  # noqa: BLE001 - isolate the failure to the items that cause it
        e.__traceback__ = None  # drop the failed call's frames (and the activations they hold) before retrying
        failure = e
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if len(positions) == 1:
        guard.failed(failure)
        return [on_fail(positions[0], failure)]
    h = len(positions) // 2
    return (run_split(split(inputs, range(h)), positions[:h], call, split, on_fail, guard, device) +
            run_split(split(inputs, range(h, len(positions))), positions[h:], call, split, on_fail, guard, device))
