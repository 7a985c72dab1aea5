"""Background preprocessing: worker threads decode images and run the processor for upcoming batches."""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .batch_inputs import _pin
from .inputs import Item, decode_image
from .results import _err


@dataclass
class LoadedBatch:
    positions: list[int]                 # the batch, in the order the model sees it (errors removed)
    inputs: Any                          # processor output for ``positions`` (None when empty)
    errors: dict[int, str]               # position -> error message
    sizes: dict[int, list]               # position -> [[h, w], ...] decoded image sizes


class BatchLoader:
    """Decodes images and runs the processor for one batch (called from worker threads)."""

    def __init__(self, items: list[Item], processor, chat_template: bool, pin: bool = False):
        self.items, self.processor, self.chat_template, self.pin = items, processor, chat_template, pin

    def _prepare(self, images: list[list[torch.Tensor]], texts: list[str]):
        return self.processor.prepare(images, texts, chat_template=self.chat_template, padding_side="left")

    def __call__(self, batch: list[int]) -> LoadedBatch:
        errors: dict[int, str] = {}
        sizes: dict[int, list] = {}
        decoded: dict[int, list[torch.Tensor]] = {}
        for pos in batch:
            it = self.items[pos]
            if it.error:
                errors[pos] = it.error
                continue
            try:
                imgs = [decode_image(p) for p in it.images]
            except Exception as e:  # noqa: BLE001 - a bad file fails its item, not the run
                errors[pos] = _err(e)
                continue
            decoded[pos] = imgs
            sizes[pos] = [[int(t.shape[1]), int(t.shape[2])] for t in imgs]
        ok = [p for p in batch if p in decoded]
        inputs = None
        if ok:
            try:
                inputs = self._prepare([decoded[p] for p in ok], [self.items[p].text for p in ok])
            except Exception:  # noqa: BLE001 - find the item that breaks the processor
                good = []
                for p in ok:
                    try:
                        self._prepare([decoded[p]], [self.items[p].text])
                        good.append(p)
                    except Exception as e:  # noqa: BLE001
                        errors[p] = _err(e)
                ok = good
                inputs = self._prepare([decoded[p] for p in ok], [self.items[p].text for p in ok]) if ok else None
        if inputs is not None and self.pin:
            inputs = _pin(inputs)
        return LoadedBatch(ok, inputs, errors, sizes)


def prefetch(batches: list[list[int]], load: Callable[[list[int]], LoadedBatch], workers: int,
             depth: int) -> Iterator[LoadedBatch]:
    """Yield ``load(batch)`` in order, keeping up to ``depth`` batches being prepared by ``workers`` threads."""
    if workers <= 0:
        for b in batches:
            yield load(b)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qwen-batched-load")
    pending: deque = deque()
    it = iter(batches)
    try:
        for b in it:
            pending.append(pool.submit(load, b))
            if len(pending) >= max(1, depth):
                break
        while pending:
            fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(load, nxt))
            yield fut.result()
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
