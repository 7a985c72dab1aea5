"""What the answer and extract jobs share: setup, resume state, plan, the batch loop, rank-0 merge."""
from __future__ import annotations

import os
import re
import sys
import time

import torch

from .batch_inputs import _slice_inputs
from .dist import Dist, resolve_device
from .estimate import TokenEstimator
from .inputs import Item
from .io import ShardWriter, check_settings, new_run_id
from .model import is_preset, load_model, model_id_of
from .progress import Progress
from .results import FailureGuard, Result, _err, run_split
from .schedule import make_plan
from .workers import BatchLoader, prefetch


def _log(dist: Dist, msg: str) -> None:
    if dist.is_main:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()


class Job:
    """What the answer and extract jobs share: setup, resume state, plan, the batch loop, merge."""

    kind = ""
    shard_re: re.Pattern
    shard_prefix = ""
    shard_ext = ""
    extra_tokens = 0

    def __init__(self, args, model=None):
        self.args = args
        self.dist = Dist(args.dist_timeout)
        self.device = model.device if model is not None else resolve_device(args.device, self.dist)
        self.model = model

    # to implement
    def read_items(self) -> list[Item]: ...
    def settings(self) -> dict: ...
    def read_done(self) -> dict[str, tuple]: ...                   # key -> (record, retry, ...)
    def encode(self, results: list[Result]) -> bytes: ...
    def run_batch(self, inputs, positions: list[int]) -> list[Result]: ...
    def error_result(self, pos: int, msg: str, retry: bool) -> Result: ...
    def merge(self, stats: list[dict]) -> str: ...

    def run(self) -> int:
        self.dist.init(self.device)
        try:
            return self._run()
        finally:
            self.dist.close()

    def _run(self) -> int:
        args, dist = self.args, self.dist
        t0 = time.perf_counter()
        self.items = self.read_items()
        failure = done_keys = run_id = None
        if dist.is_main:
            try:
                check_settings(self.out_dir, self.settings(), args.overwrite, self.shard_re)
                done = self.read_done()
                done_keys = {k for k, (rec, retry, *_) in done.items()
                             if not retry and not (args.retry_errors and "error" in rec)}
                run_id = new_run_id(self.out_dir, self.shard_re)
            except BaseException as e:  # tell the other ranks before failing, so that they do not wait
                dist.broadcast((None, None, str(e)))
                raise
        done_keys, run_id, failure = dist.broadcast((done_keys, run_id, failure))
        if failure is not None:
            raise SystemExit(f"rank 0 failed: {failure}")
        self.model_id = model_id_of(args.model)
        if self.model is not None:
            self.check_model(self.model)
        if all(it.key in done_keys for it in self.items):  # nothing left: no model needed, just (re)merge
            _log(dist, f"{self.kind}: all {len(self.items)} inputs already done")
            return self._finish([{"n": 0, "errors": 0, "shards": [], "seconds": 0.0, "extra": self.rank_stats()}], t0)

        if self.model is None:
            self.model = load_model(args.model, self.device, args.dtype, args.weights_seed)
        if is_preset(args.model):
            _log(dist, f"note: --model {args.model} is a preset with RANDOM weights: its output is meaningless, "
                       f"for tests and demos")
        self.check_model(self.model)
        self.processor = self.model.processor
        if self.processor is None or getattr(self.processor, "tokenizer", None) is None:
            raise SystemExit(f"error: model {args.model!r} has no tokenizer (prompts need the checkpoint's "
                             f"tokenizer.json); random-weight presets other than 'tiny' have none")
        plan = make_plan(self.items, done_keys, TokenEstimator(self.processor, self.model.cfg), dist,
                         batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, window=args.sort_window,
                         extra_tokens=self.extra_tokens, threads=max(1, args.workers))
        _log(dist, f"{self.kind}: {len(self.items)} inputs, {plan.n_done} already done, {len(plan.pending)} to do"
                   f"{f' on {dist.world} ranks' if dist.enabled else ''}; model {self.model_id} on {self.device}")

        writer = ShardWriter(self.out_dir, self.shard_prefix, run_id, dist.rank, args.shard_size, self.shard_ext,
                             self.encode)
        loader = BatchLoader(self.items, self.processor, chat_template=args.conv_mode == "chat",
                             pin=self.device.type == "cuda")
        progress = Progress(len(plan.mine), self.kind + (f" (rank {dist.rank}/{dist.world})" if dist.enabled else ""),
                            enabled=not args.no_progress and (dist.is_main or args.progress_all_ranks))
        guard = FailureGuard(args.max_model_failures)
        cfg = self.model.cfg
        split = lambda inputs, rows: _slice_inputs(inputs, list(rows), cfg.image_token_id,  # noqa: E731
                                                   cfg.vision.merge_unit)
        on_fail = lambda pos, e: self.error_result(pos, _err(e), retry=True)  # noqa: E731
        n_err = 0
        t_loop = time.perf_counter()
        try:
            with torch.inference_mode():
                for lb in prefetch(plan.batches, loader, args.workers, args.prefetch):
                    self.sizes = lb.sizes
                    results = [self.error_result(pos, msg, retry=False) for pos, msg in lb.errors.items()]
                    if lb.positions:
                        results += run_split(lb.inputs, lb.positions, self.run_batch, split, on_fail, guard,
                                             self.device)
                    results.sort(key=lambda r: r.pos)
                    n_err += sum("error" in r.record for r in results)
                    writer.add(results)
                    progress.update(len(results))
        except BaseException:
            try:  # keep what is finished (Ctrl-C, a failing item streak ...); never mask the original error
                writer.close()
            except Exception:  # noqa: BLE001
                pass
            raise
        writer.close()
        progress.close()

        stats = dist.all_gather({"n": len(plan.mine), "errors": n_err, "shards": writer.written,
                                 "seconds": time.perf_counter() - t_loop, "extra": self.rank_stats()})
        return self._finish(stats, t0)

    def _finish(self, stats: list[dict], t0: float) -> int:
        dist = self.dist
        dist.barrier()
        if not dist.is_main:
            return 0
        unseen = [s for st in stats for s in st["shards"] if not os.path.isfile(os.path.join(self.out_dir, s))]
        if unseen:
            raise RuntimeError(f"rank 0 cannot see {len(unseen)} shard(s) that other ranks wrote (e.g. {unseen[0]}): "
                               f"the output must be on a filesystem all ranks share")
        where = self.merge(stats)
        total_new, busy = sum(st["n"] for st in stats), max(st["seconds"] for st in stats)
        _log(dist, f"{self.kind}: {len(self.items)} inputs -> {where} ({total_new} new, "
                   f"{sum(st['errors'] for st in stats)} errors); {total_new / max(busy, 1e-9):.2f} items/s "
                   f"({busy:.1f} s processing, {time.perf_counter() - t0:.1f} s in all)")
        return 0

    def rank_stats(self) -> dict:
        return {}

    def check_model(self, model) -> None:
        """Fail before any work when the options do not fit the model."""
