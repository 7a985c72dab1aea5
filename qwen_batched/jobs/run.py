"""The loop both jobs share: the model and its identity, torchrun ranks, the plan (rank split, length-sorted
batches), background batch preparation, failure isolation, resume state and the rank-0 merge."""
from __future__ import annotations

import datetime
import hashlib
import heapq
import os
import re
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..inputs import ModelInputs
from .io import (Item, Progress, ShardWriter, check_manifest, decode_image, image_size_from_header, new_run_id)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# ============================================================================================== torchrun
class Dist:
    """Rank/world from the ``torchrun`` environment, with object collectives over a gloo group.

    With ``tp_size`` N the world is replicas x N: ranks [k*N, (k+1)*N) hold one tensor-parallel model (replica k),
    take one share of the items together, and the replica's first rank writes its results.
    """

    def __init__(self, timeout_s: float = 6 * 3600, tp_size: int = 1):
        env = os.environ
        self.world, self.rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        if tp_size < 1 or self.world % tp_size:
            raise SystemExit(f"error: --tp-size {tp_size} must be >= 1 and divide the number of ranks {self.world} "
                             f"(torchrun --nproc-per-node x --nnodes = replicas x tp_size)")
        self.tp_size = tp_size
        self.timeout_s = timeout_s
        self.group = None
        self.initialized = False
        self.owns = False  # whether we created the process group (and so destroy it)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def replicas(self) -> int:
        """Model replicas: the item shares."""
        return self.world // self.tp_size

    @property
    def replica(self) -> int:
        return self.rank // self.tp_size

    @property
    def writes(self) -> bool:
        """Whether this rank writes its replica's results (its first rank)."""
        return self.rank % self.tp_size == 0

    def init(self, device: torch.device) -> None:
        """nccl on CUDA, gloo otherwise, plus a gloo group for the small control messages."""
        if not self.enabled or self.initialized:
            return
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=self.timeout_s)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, timeout=timeout,
                                    **({"device_id": device} if backend == "nccl" else {}))
            self.owns = True
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.group = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
        self.initialized = True

    def barrier(self) -> None:
        if self.initialized:
            torch.distributed.barrier(group=self.group)

    def broadcast(self, obj):
        if not self.initialized:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_gather(self, obj) -> list:
        if not self.initialized:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out

    def close(self) -> None:
        if self.initialized:
            if self.owns and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            self.initialized = False


def resolve_device(spec: str, dist: Dist) -> torch.device:
    spec = (spec or "auto").lower()
    dev = torch.device("cuda" if spec == "auto" and torch.cuda.is_available() else "cpu" if spec == "auto" else spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


# ============================================================================================== the model
def is_preset(name: str) -> bool:
    from ..config import PRESETS

    return not os.path.exists(name) and name.lower() in PRESETS


def model_source(spec: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """A preset name, or the checkpoint directory of a directory or hub id (downloaded when missing and online)."""
    from ..hub import resolve_checkpoint

    if is_preset(spec):
        return spec.lower()
    try:
        return resolve_checkpoint(spec, revision=revision, cache_dir=cache_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"error: --model: {e}") from None


def model_name(spec: str) -> str:
    """``model_id`` of the answers: a preset's or directory's name, or the hub id as given."""
    if is_preset(spec):
        return spec.lower()
    return os.path.basename(os.path.normpath(spec)) if os.path.exists(spec) else spec


# Small files that change what the model sees or says: hashed whole. Weights: see _safetensors_fingerprint.
_MODEL_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
                "chat_template.jinja", "model.safetensors.index.json")


def _safetensors_fingerprint(path: str, samples: int = 16, chunk: int = 4096) -> str:
    """Size, header (names, shapes, dtypes, offsets) and ``samples`` chunks of tensor bytes spread over the file:
    a fine-tune with the same shapes differs in the sampled bytes, and nothing near the whole file is read."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        h.update(f.read(min(n, size)))
        start = 8 + n
        for i in range(samples):
            f.seek(start + max(0, size - start - chunk) * i // max(1, samples - 1))
            h.update(f.read(chunk))
    return h.hexdigest()[:20]


def model_fingerprint(source: str, weights_seed: int) -> dict:
    """What identifies the model's answers: a preset and its weights seed, or the checkpoint's files."""
    if not os.path.isdir(source):
        return {"preset": source, "weights_seed": int(weights_seed)}
    files = {}
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if name in _MODEL_FILES:
            with open(path, "rb") as f:
                files[name] = hashlib.sha256(f.read()).hexdigest()[:20]
        elif name.endswith(".safetensors"):
            files[name] = _safetensors_fingerprint(path)
    return {"files": files}


def weights_fingerprint(model, samples: int = 64) -> str:
    """What identifies a model passed in by the caller (``jobs.main(argv, model=M)``), whose weights need not be
    what ``--model`` names: its config and ``samples`` evenly spaced values of every parameter as held (one device
    read), hashed."""
    state = dict(model.named_parameters())  # as held (no copies; the device and dtype are in the manifest)
    h = hashlib.sha256(repr(model.cfg).encode())
    picks = []
    for name in sorted(state):
        t = state[name].detach().reshape(-1)
        h.update(f"{name}{tuple(state[name].shape)}{t.dtype}".encode())
        if t.numel():
            idx = torch.linspace(0, t.numel() - 1, min(samples, t.numel()), device=t.device).long()
            picks.append(t[idx].float())
    if picks:
        h.update(torch.cat(picks).cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def resolved_dtype(source: str, device: torch.device, dtype: str, model=None) -> str:
    """The dtype the model runs in ('auto' resolved as loading resolves it)."""
    if dtype != "auto":
        return dtype
    if model is not None and isinstance(getattr(model, "dtype", None), torch.dtype):
        return str(model.dtype).replace("torch.", "")
    from ..api import _default_dtype

    return str(_default_dtype(device, source_config(source))).replace("torch.", "")


def source_config(source: str):
    """The ModelConfig of a checkpoint directory or preset (``model_source``'s answer), without loading weights."""
    from ..config import ModelConfig

    return ModelConfig.from_json(source) if os.path.isdir(source) else ModelConfig.from_name(source)


def load_model(source: str, device: torch.device, dtype: str, weights_seed: int = 0, tp_size: int = 1):
    from ..api import QwenBatchedVL

    dt = None if dtype == "auto" else dtype
    if os.path.isdir(source):
        return QwenBatchedVL.from_pretrained(source, device=device, dtype=dt, tp_size=tp_size)
    return QwenBatchedVL.from_config(source, device=device, dtype=dt, seed=weights_seed, tp_size=tp_size)


# ============================================================================================== the plan
# A chat prompt adds ~20 template tokens around the question; each image adds vision_start/end.
TEMPLATE_TOKENS = 24


class TokenEstimator:
    """Estimated prompt tokens of an item: image tokens after ``smart_resize`` (from image headers only) plus text
    and template tokens, within the processor's (or the job's) ``min_pixels``/``max_pixels``."""

    def __init__(self, processor=None, cfg=None, min_pixels: int | None = None, max_pixels: int | None = None):
        v = getattr(cfg, "vision", None)
        self.factor = int(getattr(processor, "factor", 0) or (v.patch_size * v.spatial_merge_size if v else 28))
        self.min_pixels = int(min_pixels or getattr(processor, "min_pixels", 0) or 3136)
        self.max_pixels = int(max_pixels or getattr(processor, "max_pixels", 0) or 12845056)
        self.tokenizer = getattr(processor, "tokenizer", None)

    def image_tokens(self, path: str) -> int:
        from ..processor import smart_resize

        rh, rw = smart_resize(*image_size_from_header(path), self.factor, self.min_pixels, self.max_pixels)
        return (rh // self.factor) * (rw // self.factor)

    def text_tokens(self, text: str) -> int:
        if self.tokenizer is not None and hasattr(self.tokenizer, "encode"):
            try:
                return len(self.tokenizer.encode(text))
            except Exception:  # noqa: BLE001 - an estimate only
                pass
        return len(text.encode("utf-8")) // 3 + 1

    def __call__(self, item: Item) -> tuple[int, int]:
        """(estimated prompt tokens, estimated image tokens); unreadable images count as 0 (they will error)."""
        img = 0
        for p in item.images:
            try:
                img += self.image_tokens(p) + 2
            except Exception:  # noqa: BLE001 - reported when the item is decoded
                pass
        return img + self.text_tokens(item.text) + TEMPLATE_TOKENS, img


def split_balanced(costs: Sequence[float], world: int) -> list[list[int]]:
    """Split item positions into ``world`` parts of near-equal total cost (longest-first greedy).

    Deterministic (ties by position), so every rank computes the same split. Each part is in input order.
    """
    heap = [(0.0, 0, r) for r in range(world)]  # (load, items, rank): the least loaded rank pops first
    parts: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, n, r = heapq.heappop(heap)
        parts[r].append(i)
        heapq.heappush(heap, (load + costs[i], n + 1, r))
    return [sorted(p) for p in parts]


def plan_batches(order: Sequence[int], tokens: Sequence[int], *, batch_size: int, max_batch_tokens: int | None = None,
                 window: int = 1024, extra_tokens: int = 0, unit: Sequence[int] | None = None) -> list[list[int]]:
    """Group positions into batches of similar length.

    ``order`` is walked in windows of about ``window`` items; inside a window items are sorted by estimated
    tokens (longest first, so a memory problem shows up early) and cut into batches of at most ``batch_size``
    items whose padded size ``len(batch) * (max tokens + extra_tokens)`` stays within ``max_batch_tokens`` (an
    item over the budget on its own forms a batch of one).
    ``unit`` (position -> group id, e.g. the questions about one image set): a group's items stay together, in
    one window and next to each other (groups sorted by their longest item, items by length inside), so they
    share batches; a window ends only at the end of a group.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order, window = list(order), max(1, int(window))
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(i if unit is None else unit[i], []).append(i)
    windows: list[list[list[int]]] = [[]]
    n = 0
    for g in groups.values():
        if n >= window:
            windows.append([])
            n = 0
        windows[-1].append(g)
        n += len(g)
    batches: list[list[int]] = []
    for win in windows:
        cur: list[int] = []
        cur_max = 0
        ranked = sorted((sorted(g, key=lambda i: (-tokens[i], i)) for g in win), key=lambda g: (-tokens[g[0]], g[0]))
        for i in (i for g in ranked for i in g):
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


def make_plan(items: list[Item], pending: list[int], estimator: Callable[[Item], tuple[int, int]], dist: Dist, *,
              batch_size: int, max_batch_tokens: int | None, window: int, extra_tokens: int,
              threads: int = 4, together: Callable[[Item], object] | None = None) -> tuple[list[int], list[list[int]]]:
    """(this rank's positions, its batches), the same split on every rank: header reads are shared out over the
    ranks (and threads) and all-gathered, then the pending items are split over the model replicas by estimated
    tokens (the ranks of a tensor-parallel replica get the same share).
    ``together(item)``: a key (None: none); items with equal keys go to one replica and into neighbouring batches
    (``plan_batches``' units), so that the questions about one image share its encoding and prefill."""
    share = pending[dist.rank::dist.world]
    if threads > 1 and len(share) > 64:
        with ThreadPoolExecutor(threads, thread_name_prefix="qwen-batched-estimate") as pool:
            est = list(pool.map(lambda i: estimator(items[i])[0], share, chunksize=64))
    else:
        est = [estimator(items[i])[0] for i in share]
    tokens = [0] * len(items)
    for part in dist.all_gather(dict(zip(share, est))):
        for i, t in part.items():
            tokens[int(i)] = int(t)
    unit = None
    members: dict[object, list[int]] = {}
    for i in pending:
        key = together(items[i]) if together is not None else None
        members.setdefault(("item", i) if key is None else ("key", key), []).append(i)
    groups = list(members.values())  # in order of their first pending item
    if together is not None:
        unit = [0] * len(items)
        for u, g in enumerate(groups):
            for i in g:
                unit[i] = u
    parts = split_balanced([sum(tokens[i] + extra_tokens for i in g) for g in groups], dist.replicas)
    mine = sorted(i for j in parts[dist.replica] for i in groups[j])
    return mine, plan_batches(mine, tokens, batch_size=batch_size, max_batch_tokens=max_batch_tokens, window=window,
                              extra_tokens=extra_tokens, unit=unit)


# ============================================================================================== batches
@dataclass
class LoadedBatch:
    positions: list[int]                 # the batch, in the order the model sees it (failed items removed)
    inputs: ModelInputs | None           # processor output for ``positions``; None when empty
    errors: dict[int, str]               # position -> error message
    sizes: dict[int, list]               # position -> [[h, w], ...] decoded image sizes


class BatchLoader:
    """Decodes images and runs the processor for one batch (called from worker threads)."""

    def __init__(self, items: list[Item], processor, chat_template: bool, pin: bool = False,
                 min_pixels: int | None = None, max_pixels: int | None = None):
        self.items, self.processor, self.chat_template, self.pin = items, processor, chat_template, pin
        self.pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}

    def _prepare(self, positions: list[int], decoded: dict[int, list[torch.Tensor]]):
        return self.processor.prepare([decoded[p] for p in positions], [self.items[p].text for p in positions],
                                      chat_template=self.chat_template, padding_side="left", **self.pixels)

    def __call__(self, batch: list[int]) -> LoadedBatch:
        errors: dict[int, str] = {}
        sizes: dict[int, list] = {}
        decoded: dict[int, list[torch.Tensor]] = {}
        for pos in batch:
            try:
                decoded[pos] = [decode_image(p) for p in self.items[pos].images]
            except Exception as e:  # noqa: BLE001 - a bad file fails its item, not the run
                errors[pos] = str(e)
                continue
            sizes[pos] = [[int(t.shape[1]), int(t.shape[2])] for t in decoded[pos]]
        ok = [p for p in batch if p in decoded]
        try:
            inputs = self._prepare(ok, decoded) if ok else None
        except Exception:  # noqa: BLE001 - find the items that break the processor
            good = []
            for p in ok:
                try:
                    self._prepare([p], decoded)
                    good.append(p)
                except Exception as e:  # noqa: BLE001
                    errors[p] = _err(e)
            ok = good
            inputs = self._prepare(ok, decoded) if ok else None
        if inputs is not None and self.pin:
            inputs = inputs.pin_memory()
        return LoadedBatch(ok, inputs, errors, sizes)


def prefetch(batches: list[list[int]], load: Callable[[list[int]], LoadedBatch], workers: int,
             depth: int) -> Iterator[LoadedBatch]:
    """Yield ``load(batch)`` in order, keeping up to ``depth`` batches being prepared by ``workers`` threads."""
    if workers <= 0:
        yield from map(load, batches)
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


# ============================================================================================== failures
@dataclass
class Result:
    """One finished item: its record (with ``error`` when it failed), plus tensors for the extract job."""

    pos: int
    record: dict
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


def run_isolated(call: Callable, inputs, positions: list[int], on_fail: Callable, guard: FailureGuard) -> list[Result]:
    """``call(inputs, positions)``; when it raises, each item runs alone, so that only the items that make the
    model raise get ``on_fail(pos, exc)`` and the rest still get results. Out of memory is not retried here:
    the model halves a sub-batch that runs out of memory itself; what escapes it is one row too large alone."""
    try:
        res = call(inputs, positions)
        guard.ok()
        return res
    except Exception as e:  # noqa: BLE001 - isolate the failure to the items that cause it
        if len(positions) == 1:
            guard.failed(e)
            return [on_fail(positions[0], e)]
        e.__traceback__ = None  # drop the failed call's frames (and the activations they hold)
    out: list[Result] = []
    for j, pos in enumerate(positions):
        try:
            out += call(inputs.select_rows([j]), [pos])
            guard.ok()
        except Exception as e:  # noqa: BLE001
            e.__traceback__ = None
            guard.failed(e)
            out.append(on_fail(pos, e))
    return out


# ============================================================================================== the job
def log(dist: Dist, msg: str) -> None:
    if dist.is_main:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()


def _finished(result: tuple[str, dict] | None, digest: str) -> bool:
    """A result on disk counts when it was made from the item as it is now and did not fail."""
    return result is not None and result[0] == digest and "error" not in result[1]


class Job:
    """What the answer and extract jobs share: setup, resume state, plan, the batch loop, merge.

    Resume: every result on disk carries its item's key and content digest; an item is done when the newest
    result for its key has the item's current digest and no error. Everything else (new, changed, failed) is
    computed again; the output's manifest (model fingerprint + settings) must match this run's.
    """

    kind = ""
    format = ""
    shard_re: re.Pattern
    shard_prefix = ""
    shard_ext = ""
    extra_tokens = 0
    out_dir = ""
    elsewhere = ""  # how to name another output, for the refusal message
    together: Callable[[Item], object] | None = None  # items with equal keys: one rank, neighbouring batches
    image_cache_bytes = 0  # > 0: the model keeps image embeddings for later batches (its image cache) meanwhile

    def __init__(self, args, model=None):
        self.args = args
        tp = getattr(model, "tp", None)
        self.dist = Dist(args.dist_timeout, tp.size if tp is not None else getattr(args, "tp_size", 1))
        self.device = model.device if model is not None else resolve_device(args.device, self.dist)
        self.model = model
        self.model_id = model_name(args.model)
        self.image_sizes: dict[int, list] = {}

    # --- what each job provides
    def read_items(self) -> list[Item]: ...
    def settings(self) -> dict: ...
    def read_done(self) -> dict[str, tuple[str, dict]]: ...      # key -> (digest, record) of the newest results
    def discard(self) -> None: ...                                # --overwrite: remove the merged output
    def encode(self, key_digest: list[tuple[str, str]], results: list[Result]) -> bytes: ...
    def run_batch(self, inputs, positions: list[int]) -> list[Result]: ...
    def error_result(self, pos: int, msg: str) -> Result: ...
    def merge(self, stats: list[dict]) -> tuple[str, int]: ...  # (where, error lines in the output)
    def check_model(self, model) -> None: ...                     # fail before any work on options the model can't do
    def check_source(self, source: str) -> None: ...              # the same from the config alone, before loading

    def rank_stats(self) -> dict:
        return {}

    def run(self) -> int:
        self.dist.init(self.device)
        try:
            return self._run()
        finally:
            self.dist.close()

    def _setup(self) -> tuple[list[Item], list[int], str, str]:
        """Rank 0: items, pending positions, run id and model source; the output checked against this run."""
        a = self.args
        items = self.read_items()
        source = model_source(a.model, a.revision, a.cache_dir)
        if self.model is None:
            self.check_source(source)
        else:  # a model passed in need not be what --model names; checked before --overwrite discards anything
            self.check_model(self.model)
        manifest = {"format": self.format,
                    "model": {"source": a.model, "fingerprint": model_fingerprint(source, a.weights_seed)},
                    "settings": {**self.settings(), "dtype": resolved_dtype(source, self.device, a.dtype, self.model),
                                 "device": self.device.type,  # CPU and GPU kernels round differently
                                 "min_pixels": a.min_pixels, "max_pixels": a.max_pixels}}
        if isinstance(self.model, torch.nn.Module):  # passed in: its own weights, whatever --model names
            manifest["model"]["fingerprint"]["weights_in_memory"] = weights_fingerprint(self.model)
        if a.overwrite:
            self.discard()
        check_manifest(self.out_dir, manifest, self.shard_re, a.overwrite, self.elsewhere)
        done = self.read_done()
        pending = [i for i, it in enumerate(items)
                   if it.error is None and not _finished(done.get(it.key), it.digest)]
        return items, pending, new_run_id(self.out_dir, self.shard_re), source

    def _run(self) -> int:
        args, dist = self.args, self.dist
        t0 = time.perf_counter()
        setup = failure = None
        if dist.is_main:
            try:
                setup = self._setup()
            except BaseException as e:  # tell the other ranks before failing, so that they do not wait
                dist.broadcast((None, str(e)))
                raise
        setup, failure = dist.broadcast((setup, None))
        if failure is not None:
            raise SystemExit(f"rank 0 failed: {failure}")
        self.items, pending, run_id, source = setup
        n_done = sum(it.error is None for it in self.items) - len(pending)
        if self.model is not None:
            self.check_model(self.model)
        if not pending:  # nothing left: no model needed, just (re)merge
            log(dist, f"{self.kind}: all {len(self.items)} inputs already done")
            return self._finish([{"n": 0, "errors": 0, "shards": [], "seconds": 0.0, "extra": self.rank_stats()}], t0)

        if self.model is None:
            if not os.path.isdir(source) and not is_preset(source):  # another node: its own cache
                source = model_source(args.model, args.revision, args.cache_dir)
            self.model = load_model(source, self.device, args.dtype, args.weights_seed, dist.tp_size)
            self.check_model(self.model)  # a model passed in was checked above
        if is_preset(args.model):
            log(dist, f"note: --model {args.model} is a preset with RANDOM weights: its output is meaningless, "
                      f"for tests and demos")
        processor = self.model.processor
        if processor is None or getattr(processor, "tokenizer", None) is None:
            raise SystemExit(f"error: model {args.model!r} has no tokenizer (prompts need the checkpoint's "
                             f"tokenizer.json); random-weight presets other than 'tiny' have none")
        estimator = TokenEstimator(processor, self.model.cfg, args.min_pixels, args.max_pixels)
        mine, batches = make_plan(self.items, pending, estimator, dist, batch_size=args.batch_size,
                                  max_batch_tokens=args.max_batch_tokens, window=args.sort_window,
                                  extra_tokens=self.extra_tokens, threads=max(1, args.workers),
                                  together=self.together)
        log(dist, f"{self.kind}: {len(self.items)} inputs, {n_done} already done, {len(pending)} to do"
                  f"{f' on {dist.world} ranks' if dist.enabled else ''}"
                  f"{f' ({dist.replicas} replicas x tp_size {dist.tp_size})' if dist.tp_size > 1 else ''}; "
                  f"model {self.model_id} on {self.device}")

        writer = ShardWriter(self.out_dir, self.shard_prefix, run_id, dist.rank, args.shard_size, self.shard_ext,
                             lambda results: self.encode([(self.items[r.pos].key, self.items[r.pos].digest)
                                                          for r in results], results))
        loader = BatchLoader(self.items, processor, chat_template=args.conv_mode == "chat",
                             pin=self.device.type == "cuda", min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        progress = Progress(len(mine), self.kind + (f" (rank {dist.rank}/{dist.world})" if dist.enabled else ""),
                            enabled=not args.no_progress and (dist.is_main or args.progress_all_ranks))
        guard = FailureGuard(args.max_model_failures)
        n_err = 0
        t_loop = time.perf_counter()
        kept_cache = getattr(self.model, "image_cache", None)
        if self.image_cache_bytes > 0 and kept_cache is None and hasattr(self.model, "enable_image_cache"):
            self.model.enable_image_cache(self.image_cache_bytes)  # for this run only (restored below)
        try:
            with torch.inference_mode():
                for lb in prefetch(batches, loader, args.workers, args.prefetch):
                    self.image_sizes = lb.sizes
                    results = [self.error_result(pos, msg) for pos, msg in lb.errors.items()]
                    if lb.positions:
                        results += run_isolated(self.run_batch, lb.inputs, lb.positions,
                                                lambda pos, e: self.error_result(pos, _err(e)), guard)
                    results.sort(key=lambda r: r.pos)
                    n_err += sum("error" in r.record for r in results)
                    if dist.writes:  # the other ranks of a tensor-parallel replica computed the same results
                        writer.add(results)
                    progress.update(len(results))
        except BaseException:
            try:  # keep what is finished (Ctrl-C, a failing item streak ...); never mask the original error
                writer.close()
            except Exception:  # noqa: BLE001
                pass
            raise
        finally:
            if hasattr(self.model, "image_cache"):
                self.model.image_cache = kept_cache
        writer.close()
        progress.close()
        counted = dist.writes  # a replica's results count once
        stats = dist.all_gather({"n": len(mine) if counted else 0, "errors": n_err if counted else 0,
                                 "shards": writer.written,
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
        where, n_errors = self.merge(stats)
        new, busy = sum(st["n"] for st in stats), max(st["seconds"] for st in stats)
        log(dist, f"{self.kind}: {len(self.items)} inputs -> {where}; {n_errors} with an error in it "
                  f"({sum(st['errors'] for st in stats)} failed in this run; a rerun retries failed items); {new} "
                  f"processed in this run, {new / max(busy, 1e-9):.2f} items/s ({busy:.1f} s processing, "
                  f"{time.perf_counter() - t0:.1f} s in all)")
        return 0

