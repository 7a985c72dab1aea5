"""Batch jobs behind ``python -m qwen_batched answer|extract``: one process or ``torchrun``.

Pipeline (both jobs)
    read inputs -> estimate tokens per item (image sizes from file headers + ``smart_resize``) -> split the
    pending items over the ranks (balanced by estimated tokens) -> group each rank's items into batches of
    similar length (sorted by estimated tokens inside a window) -> decode + preprocess batches in background
    threads while the model runs the previous one -> write results in small shards -> rank 0 merges.

Resumability
    Every shard is written to a temporary name and ``os.replace``-d into place, so a shard file on disk is
    always complete. Results are keyed per item (``question_id``, or the input line when ids are missing or
    repeated); a rerun collects the keys found in existing shards and only processes the rest. A crash loses
    at most the items not yet flushed to a shard; nothing is ever duplicated, because the final file is
    assembled from the shards (the newest shard wins for a key that occurs twice) in input order.

Distributed
    Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank initialises ``torch.distributed`` (nccl on CUDA, gloo
    otherwise, plus a gloo group for the small control messages), takes its share of the pending items,
    writes its own shards, and after a barrier rank 0 merges everything. Ranks must see the same output
    directory (one machine, or a shared filesystem across nodes).

Answers (``answer``)
    One JSON line per question, LLaVA ``model_vqa`` style::

        {"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {...}}   (+ "error" on failure)

Features (``extract``)
    Per input (one image, or several for a ``.jsonl`` list, plus an optional text prompt), the hidden states
    of the requested decoder layers over **all non-pad tokens of that sample** (``--tokens image`` keeps only
    the image-token rows), stored as rows of safetensors shards: ``layer.<L>`` (rows, hidden),
    ``input_ids`` (rows,), ``image_mask`` (rows,) and ``position`` (rows,: index in the unpadded prompt).
    ``index.json`` maps each input, in input order, to ``{shard, offset, length, image_spans, ...}``;
    :func:`load_features` reads one input back.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import sys
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TMP_PREFIX = ".tmp-"
# <prefix>-run<N>-<random>-r<rank>-<seq>: N counts the runs on this output, so later runs sort (and win) last.
ANSWER_SHARD_RE = re.compile(r"^answers-run(\d{5})-([0-9a-f]{6})-r(\d{5})-(\d{6})\.jsonl$")
FEATURE_SHARD_RE = re.compile(r"^features-run(\d{5})-([0-9a-f]{6})-r(\d{5})-(\d{6})\.safetensors$")
INDEX_FORMAT = "qwen_batched.features/1"
# A chat prompt adds ~20 template tokens around the question; each image adds vision_start/end.
TEMPLATE_TOKENS = 24


# ====================================================================================================== items
@dataclass
class Item:
    """One unit of work: a question (answer job) or an input to embed (extract job)."""

    index: int                 # position in the input (output order)
    key: str                   # resume key, unique within the input
    qid: Any                   # the question_id / id as given
    images: list[str]          # absolute paths
    text: str
    error: str | None = None   # set when the input line itself is unusable


def _strip_image_placeholder(text: str) -> str:
    # LLaVA question files sometimes carry "<image>\n": the processor places the image tokens itself.
    return text.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip("\n")


def _resolve(path: str, folder: str | None) -> str:
    path = os.path.expanduser(str(path))
    if folder and not os.path.isabs(path):
        path = os.path.join(folder, path)
    return os.path.abspath(path)


def _finalize_keys(items: list[Item]) -> list[Item]:
    """Keys: the given id where ids are present and unique, the input line otherwise."""
    seen: dict[str, int] = {}
    for it in items:
        if it.qid is not None:
            k = str(it.qid)
            seen[k] = seen.get(k, 0) + 1
    for it in items:
        k = str(it.qid) if it.qid is not None else None
        it.key = f"id:{k}" if k is not None and seen[k] == 1 else f"line:{it.index}"
    return items


def read_questions(path: str, image_folder: str | None = None, limit: int | None = None) -> list[Item]:
    """Question lines ``{"question_id", "image" (path or list, relative to image_folder), "text"}``.

    Blank lines are skipped; an unparsable line becomes an item with ``error`` set (it gets an error answer).
    """
    items: list[Item] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f):
            if not line.strip():
                continue
            if limit is not None and len(items) >= limit:
                break
            idx = len(items)
            try:
                d = json.loads(line)
                if not isinstance(d, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                items.append(Item(idx, "", None, [], "", error=f"line {lineno + 1}: invalid question line ({e})"))
                continue
            qid = d.get("question_id", d.get("id"))
            img = d.get("image", d.get("images"))
            imgs = [] if img is None else ([img] if isinstance(img, str) else list(img))
            text = d.get("text", d.get("question", d.get("prompt", "")))
            err = None
            if not isinstance(text, str):
                err, text = f"line {lineno + 1}: 'text' must be a string", str(text)
            if not all(isinstance(p, str) for p in imgs):
                err, imgs = f"line {lineno + 1}: 'image' must be a path or a list of paths", []
            items.append(Item(idx, "", qid, [_resolve(p, image_folder) for p in imgs],
                              _strip_image_placeholder(text), error=err))
    return _finalize_keys(items)


def read_image_inputs(spec: str, image_folder: str | None = None, text: str = "",
                      limit: int | None = None) -> list[Item]:
    """Inputs of the extract job.

    ``spec`` is a directory (every image file below it, sorted; id = relative path), a ``.jsonl`` file
    (``{"id", "image" (path or list), "text"?}``) or a text file with one image path per line (id = the path
    as written). Relative paths resolve against ``image_folder`` (default: the list file's directory).
    """
    items: list[Item] = []
    if os.path.isdir(spec):
        root = os.path.abspath(spec)
        rels = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in filenames:
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    rels.append(os.path.relpath(os.path.join(dirpath, fn), root))
        for rel in sorted(rels):
            items.append(Item(len(items), "", rel, [os.path.join(root, rel)], text))
    elif spec.endswith(".jsonl"):
        folder = image_folder or os.path.dirname(os.path.abspath(spec))
        for q in read_questions(spec, folder):
            q.text = q.text or text
            items.append(q)
    else:
        folder = image_folder or os.path.dirname(os.path.abspath(spec))
        with open(spec, encoding="utf-8") as f:
            for line in f:
                p = line.strip()
                if p and not p.startswith("#"):
                    items.append(Item(len(items), "", p, [_resolve(p, folder)], text))
    if limit is not None:
        items = items[:limit]
    return _finalize_keys(items)


# ================================================================================================= estimation
def image_size_from_header(path: str) -> tuple[int, int]:
    """(height, width) as the image will be decoded (EXIF rotation applied), reading only the header."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - malformed EXIF: ignore it, as decoding does
            orientation = 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


class TokenEstimator:
    """Estimated prompt tokens of an item: image tokens after ``smart_resize`` plus text and template tokens.

    Only image headers are read. The resize bounds are the processor's (``min_pixels``/``max_pixels``).
    """

    def __init__(self, processor=None, cfg=None):
        v = getattr(cfg, "vision", None)
        self.factor = int(getattr(processor, "factor", 0) or
                          ((v.patch_size * v.spatial_merge_size) if v is not None else 28))
        self.min_pixels = int(getattr(processor, "min_pixels", 0) or 3136)
        self.max_pixels = int(getattr(processor, "max_pixels", 0) or 12845056)
        self.tokenizer = getattr(processor, "tokenizer", None)

    def resized(self, h: int, w: int) -> tuple[int, int]:
        from .processor import smart_resize

        return smart_resize(h, w, self.factor, self.min_pixels, self.max_pixels)

    def image_tokens(self, path: str) -> int:
        h, w = image_size_from_header(path)
        rh, rw = self.resized(h, w)
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


# ================================================================================================== planning
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


# ================================================================================================ distributed
class Dist:
    """Rank/world from the ``torchrun`` environment, with object collectives over a gloo group."""

    def __init__(self, timeout_s: float = 6 * 3600):
        env = os.environ
        self.world = int(env.get("WORLD_SIZE", "1"))
        self.rank = int(env.get("RANK", "0"))
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
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

    def init(self, device: torch.device) -> None:
        if not self.enabled or self.initialized:
            return
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=self.timeout_s)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kwargs = {"device_id": device} if backend == "nccl" else {}
            dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
            self.owns = True
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.group = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
        self.initialized = True

    def barrier(self) -> None:
        if self.initialized:
            import torch.distributed as dist
            dist.barrier(group=self.group)

    def broadcast(self, obj):
        if not self.initialized:
            return obj
        import torch.distributed as dist
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_gather(self, obj) -> list:
        if not self.initialized:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def close(self) -> None:
        if self.initialized:
            import torch.distributed as dist
            if self.owns and dist.is_initialized():
                dist.destroy_process_group()
            self.initialized = False


def resolve_device(spec: str, dist: Dist) -> torch.device:
    spec = (spec or "auto").lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


# ===================================================================================================== shards
def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, fsync it, then ``os.replace`` it into ``path``."""
    d, name = os.path.split(path)
    tmp = os.path.join(d, f"{TMP_PREFIX}{name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def new_run_id(directory: str, pattern: re.Pattern) -> str:
    """One more than the highest run number among the shards present, plus a random tag."""
    runs = [int(pattern.match(fn).group(1)) for fn in list_shards(directory, pattern)]
    return f"run{max(runs, default=0) + 1:05d}-{uuid.uuid4().hex[:6]}"


def remove_stale_tmp(directory: str) -> None:
    for fn in os.listdir(directory):
        if fn.startswith(TMP_PREFIX):
            try:
                os.remove(os.path.join(directory, fn))
            except FileNotFoundError:
                pass


def list_shards(directory: str, pattern: re.Pattern) -> list[str]:
    """Complete shard files, oldest run first (temporary files are never listed)."""
    if not os.path.isdir(directory):
        return []
    names = [fn for fn in os.listdir(directory) if pattern.match(fn)]
    return sorted(names, key=lambda fn: tuple(int(g) if g.isdigit() else g for g in pattern.match(fn).groups()))


def check_settings(directory: str, settings: dict, overwrite: bool, pattern: re.Pattern) -> None:
    """Refuse to mix results made with different settings in one output (rank 0 only)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "settings.json")
    if overwrite:
        for fn in list_shards(directory, pattern):
            os.remove(os.path.join(directory, fn))
    elif os.path.isfile(path) and list_shards(directory, pattern):
        with open(path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise SystemExit(f"error: {directory} holds results made with other settings "
                             f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); "
                             f"pass --overwrite to discard them or choose another output")
    remove_stale_tmp(directory)
    atomic_write_bytes(path, (json.dumps(settings, indent=1, sort_keys=True) + "\n").encode())


class ShardWriter:
    """Buffers finished records and writes them ``shard_size`` at a time as atomically replaced files.

    Encoding and writing happen on one background thread (so the model does not wait for the disk); at most
    two shards are in flight, and a write error is raised in the caller at the next ``add`` or ``flush``.
    """

    def __init__(self, directory: str, prefix: str, run_id: str, rank: int, shard_size: int, ext: str,
                 encode: Callable[[list], bytes], background: bool = True):
        self.directory, self.prefix, self.run_id, self.rank = directory, prefix, run_id, rank
        self.shard_size, self.ext, self.encode = max(1, shard_size), ext, encode
        self.buffer: list = []
        self.seq = 0
        self.written: list[str] = []
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="qwen-batched-write") if background else None
        self.pending: deque = deque()

    def add(self, records: Iterable) -> None:
        self.buffer.extend(records)
        while len(self.buffer) >= self.shard_size:
            self._write(self.buffer[:self.shard_size])
            self.buffer = self.buffer[self.shard_size:]

    def flush(self) -> None:
        """Write what is buffered and wait for every write to finish."""
        if self.buffer:
            self._write(self.buffer)
            self.buffer = []
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        self.flush()
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def _write(self, records: list) -> None:
        name = f"{self.prefix}-{self.run_id}-r{self.rank:05d}-{self.seq:06d}{self.ext}"
        self.seq += 1
        if self.pool is None:
            self._save(name, records)
            return
        while self.pending and (self.pending[0].done() or len(self.pending) >= 2):
            self.pending.popleft().result()  # re-raises a failed write
        self.pending.append(self.pool.submit(self._save, name, records))

    def _save(self, name: str, records: list) -> None:
        atomic_write_bytes(os.path.join(self.directory, name), self.encode(records))
        self.written.append(name)


# =================================================================================================== progress
class Progress:
    """A dependency-free progress line on stderr: done/total, items/s, ETA (``\\r`` on a tty, lines otherwise)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, interval: float | None = None, stream=None):
        self.total, self.desc, self.enabled = total, desc, enabled and total > 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.done = 0
        self.start = time.perf_counter()
        self.last = 0.0

    def rate(self) -> float:
        dt = time.perf_counter() - self.start
        return self.done / dt if dt > 0 else 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.interval and self.done < self.total:
            self.last = now
            self._print(final=False)

    def _print(self, final: bool) -> None:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        el = time.perf_counter() - self.start
        msg = (f"{self.desc}: {self.done}/{self.total} [{100.0 * self.done / max(1, self.total):5.1f}%] "
               f"{rate:.2f} it/s, {_fmt_s(el)} elapsed" + ("" if final else f", eta {_fmt_s(eta)}"))
        if self.tty:
            self.stream.write("\r" + msg + ("\n" if final else "\x1b[K"))
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._print(final=True)


def _fmt_s(s: float) -> str:
    if s != s:  # nan
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# ============================================================================================ loading / prefetch
def decode_image(path: str) -> torch.Tensor:
    """Decode to a (3, H, W) uint8 tensor (EXIF rotation applied, converted to RGB)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im = im.convert("RGB")
        arr = np.asarray(im, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


@dataclass
class LoadedBatch:
    positions: list[int]                 # the batch, in the order the model sees it (errors removed)
    inputs: Any                          # processor output for ``positions`` (None when empty)
    errors: dict[int, str]               # position -> error message
    sizes: dict[int, list]               # position -> [[h, w], ...] decoded image sizes


def _to_device(obj, device: torch.device, non_blocking: bool):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to_device(getattr(obj, f.name), device, non_blocking)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to_device(v, device, non_blocking) for v in obj))
    if isinstance(obj, dict):
        return {k: _to_device(v, device, non_blocking) for k, v in obj.items()}
    return obj


def _pin(obj):
    if isinstance(obj, torch.Tensor):
        return obj.pin_memory() if obj.device.type == "cpu" else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _pin(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_pin(v) for v in obj))
    if isinstance(obj, dict):
        return {k: _pin(v) for k, v in obj.items()}
    return obj


def _field(obj, name):
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


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


# ================================================================================================ model / args
def is_preset(name: str) -> bool:
    from .config import PRESETS

    return not os.path.exists(name) and name.lower() in PRESETS


def load_model(spec: str, device: torch.device, dtype: str | None, seed: int = 0):
    """A checkpoint directory, or a preset name (``tiny``, ``3b`` ...) for a random-weight model."""
    from .api import QwenBatchedVL

    dt = None if dtype in (None, "auto") else dtype
    if is_preset(spec):
        return QwenBatchedVL.from_config(spec.lower(), device=device, dtype=dt, seed=seed)
    return QwenBatchedVL.from_pretrained(spec, device=device, dtype=dt)


def model_id_of(spec: str) -> str:
    return spec.lower() if is_preset(spec) else os.path.basename(os.path.normpath(spec))


def _log(dist: Dist, msg: str) -> None:
    if dist.is_main:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()


@dataclass
class Plan:
    pending: list[int]        # positions still to do (all ranks)
    mine: list[int]           # this rank's positions
    batches: list[list[int]]  # this rank's batches
    tokens: list[int]         # estimated prompt tokens per position (0 for finished items)
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
    return Plan(pending, mine, batches, tokens, len(items) - len(pending))


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


# ====================================================================================================== answer
def _slice_inputs(inputs, idx: list[int], image_token_id: int, merge_unit: int = 4) -> dict:
    """Rows ``idx`` of a prepared batch (with their images), re-trimmed to their own left padding."""
    full_ids, full_mask = _field(inputs, "input_ids"), _field(inputs, "attention_mask")
    grid, pv = _field(inputs, "image_grid_thw"), _field(inputs, "pixel_values")
    sel = torch.tensor(idx, device=full_ids.device)
    ids, mask = full_ids[sel], full_mask[sel]
    keep = mask.bool().any(0)
    first = int(keep.nonzero()[0]) if keep.any() else 0
    out = {"input_ids": ids[:, first:], "attention_mask": mask[:, first:], "pixel_values": None,
           "image_grid_thw": None}
    mm = _field(inputs, "mm_token_type_ids")
    if mm is not None:
        out["mm_token_type_ids"] = mm[sel][:, first:]
    if grid is not None and grid.numel():
        # the images of each row, in order: from images_per_sample, else from the rows' image-token counts
        per_row = _field(inputs, "images_per_sample")
        if not per_row:
            tokens_per_img = (grid.prod(-1) // merge_unit).tolist()
            per_row, k = [], 0
            for c in (full_ids == image_token_id).sum(-1).tolist():
                n = 0
                while c > 0 and k < len(tokens_per_img):
                    c -= tokens_per_img[k]
                    k, n = k + 1, n + 1
                per_row.append(n)
        first_img = [0]
        for n in per_row:
            first_img.append(first_img[-1] + n)
        pstart = [0]
        for p in grid.prod(-1).tolist():
            pstart.append(pstart[-1] + p)
        ks = [k for r in idx for k in range(first_img[r], first_img[r + 1])]
        out["images_per_sample"] = tuple(per_row[r] for r in idx)
        if ks:
            out["image_grid_thw"] = grid[torch.tensor(ks, device=grid.device)]
            out["pixel_values"] = torch.cat([pv[pstart[k]:pstart[k + 1]] for k in ks])
    return out


def _model_inputs(inputs, device: torch.device) -> dict:
    return {k: _to_device(_field(inputs, k), device, True)
            for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}


def read_answer_shards(directory: str) -> dict[str, tuple[dict, bool]]:
    """key -> (answer record, retry flag), from every complete shard (the newest run wins)."""
    out: dict[str, tuple[dict, bool]] = {}
    for fn in list_shards(directory, ANSWER_SHARD_RE):
        with open(os.path.join(directory, fn), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    out[d["key"]] = (d["answer"], bool(d.get("retry", False)))
    return out


class AnswerJob(Job):
    """``answer``: one LLaVA-style answer line per question, in input order."""

    kind = "answer"
    shard_re = ANSWER_SHARD_RE
    shard_prefix = "answers"
    shard_ext = ".jsonl"

    def __init__(self, args, model=None):
        super().__init__(args, model)
        self.answers = os.path.abspath(args.answers)
        self.out_dir = os.path.abspath(args.shard_dir or self.answers + ".parts")
        self.extra_tokens = args.max_new_tokens

    def read_items(self) -> list[Item]:
        return read_questions(self.args.questions, self.args.image_folder, self.args.limit)

    def settings(self) -> dict:
        a = self.args
        return {"job": "answer", "model": model_id_of(a.model), "conv_mode": a.conv_mode, "temperature": a.temperature,
                "top_k": a.top_k, "top_p": a.top_p, "max_new_tokens": a.max_new_tokens,
                "seed": a.seed if a.temperature > 0 else None}

    def read_done(self):
        return read_answer_shards(self.out_dir)

    def encode(self, results: list[Result]) -> bytes:
        return "".join(json.dumps({"key": r.key, "answer": r.record, **({"retry": True} if r.retry else {})},
                                  ensure_ascii=False) + "\n" for r in results).encode("utf-8")

    def _record(self, pos: int, text: str, meta: dict, error: str | None = None) -> dict:
        it, a = self.items[pos], self.args
        rec = {"question_id": it.qid, "prompt": it.text, "text": text, "answer_id": uuid.uuid4().hex[:22],
               "model_id": self.model_id,
               "metadata": {"n_images": len(it.images), **meta, "conv_mode": a.conv_mode,
                            "temperature": a.temperature, "max_new_tokens": a.max_new_tokens}}
        if error is not None:
            rec["error"] = error
        return rec

    def error_result(self, pos: int, msg: str, retry: bool) -> Result:
        return Result(pos, self.items[pos].key, self._record(pos, "", {"finish_reason": "error"}, error=msg), retry)

    def run_batch(self, inputs, positions: list[int]) -> list[Result]:
        a, cfg = self.args, self.model.cfg
        eos = list(cfg.eos_token_ids)
        seed = None if a.temperature <= 0 else a.seed + positions[0]
        out = self.model.generate(**_model_inputs(inputs, self.device), max_new_tokens=a.max_new_tokens,
                                  temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, eos_token_id=eos, seed=seed)
        mask = _field(inputs, "attention_mask")
        n_prompt = mask.sum(-1).tolist()
        seqs, lengths, texts = (_field(out, k) for k in ("sequences", "lengths", "texts"))
        seqs, lengths = seqs.tolist(), lengths.tolist()
        results = []
        for b, pos in enumerate(positions):
            gen = seqs[b][:int(lengths[b])]
            stop = bool(gen) and gen[-1] in eos
            text = texts[b] if texts is not None else self.processor.tokenizer.decode(gen)
            meta = {"image_sizes": self.sizes.get(pos, []), "n_prompt_tokens": int(n_prompt[b]),
                    "n_new_tokens": len(gen) - int(stop), "finish_reason": "stop" if stop else "length"}
            results.append(Result(pos, self.items[pos].key, self._record(pos, text.strip(), meta)))
        return results

    def merge(self, stats) -> str:
        merge_answers(self.items, self.out_dir, self.answers)
        return self.answers


def merge_answers(items: list[Item], shard_dir: str, answers: str) -> int:
    """Assemble the final answers file, in input order, from the shards (written atomically)."""
    done = read_answer_shards(shard_dir)
    missing = [it for it in items if it.key not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} question(s) have no answer in {shard_dir} (e.g. "
                           f"{missing[0].qid!r}); rerun the same command to finish them")
    os.makedirs(os.path.dirname(answers) or ".", exist_ok=True)
    data = "".join(json.dumps(done[it.key][0], ensure_ascii=False) + "\n" for it in items)
    atomic_write_bytes(answers, data.encode("utf-8"))
    return len(items)


def run_answer(args, model=None) -> int:
    """The ``answer`` job for parsed ``args``; ``model`` reuses a loaded model (its device wins)."""
    return AnswerJob(args, model).run()


# ===================================================================================================== extract
def parse_layers(spec: str) -> list[int]:
    try:
        layers = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        layers = []
    if not layers:
        raise SystemExit(f"error: --layers must be comma-separated integers, got {spec!r}")
    return layers


def read_feature_shards(directory: str) -> dict[str, tuple[dict, bool, str]]:
    """key -> (index entry, retry flag, shard file), from every complete shard (the newest run wins).

    Entries of inputs that have rows carry ``shard``; failed inputs carry ``error`` instead.
    """
    from safetensors import safe_open

    out: dict[str, tuple[dict, bool, str]] = {}
    for fn in list_shards(directory, FEATURE_SHARD_RE):
        with safe_open(os.path.join(directory, fn), framework="pt") as f:
            entries = json.loads(f.metadata()["entries"])
        for e in entries:
            key, retry = e.pop("key"), bool(e.pop("retry", False))
            if "error" not in e:
                e["shard"] = fn
            out[key] = (e, retry, fn)
    return out


def _spans(mask: list[bool]) -> list[list[int]]:
    """[start, end) runs of True."""
    spans, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append([start, i])
            start = None
    return spans


class ExtractJob(Job):
    """``extract``: hidden states of chosen layers per input, as safetensors shards plus ``index.json``."""

    kind = "extract"
    shard_re = FEATURE_SHARD_RE
    shard_prefix = "features"
    shard_ext = ".safetensors"

    def __init__(self, args, model=None):
        super().__init__(args, model)
        self.out_dir = os.path.abspath(args.out)
        self.layers = parse_layers(args.layers)
        self.save_dtype = None if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
        self.resolved_layers: list[int] | None = None

    def read_items(self) -> list[Item]:
        return read_image_inputs(self.args.images, self.args.image_folder, self.args.text, self.args.limit)

    def settings(self) -> dict:
        a = self.args
        return {"job": "extract", "model": model_id_of(a.model), "layers": self.layers, "tokens": a.tokens,
                "text": a.text, "conv_mode": a.conv_mode, "final_norm": not a.no_final_norm,
                "save_dtype": a.save_dtype, "save_vision": a.save_vision}

    def read_done(self):
        return read_feature_shards(self.out_dir)

    def encode(self, results: list[Result]) -> bytes:
        """Tensors concatenated row-wise over the shard's inputs; the entries go in the header metadata."""
        from safetensors.torch import save

        entries, cols = [], {}
        offset = voffset = 0
        for r in results:
            e = dict(r.record, key=r.key)
            if r.retry:
                e["retry"] = True
            if r.tensors:
                n = int(r.tensors["input_ids"].shape[0])
                e["offset"], e["length"] = offset, n
                offset += n
                if "vision_embeds" in r.tensors:
                    nv = int(r.tensors["vision_embeds"].shape[0])
                    e["vision_offset"], e["vision_length"] = voffset, nv
                    voffset += nv
                for name, t in r.tensors.items():
                    cols.setdefault(name, []).append(t)
            entries.append(e)
        tensors = {name: torch.cat(ts).contiguous() for name, ts in cols.items()}
        return save(tensors, metadata={"format": INDEX_FORMAT, "entries": json.dumps(entries, ensure_ascii=False)})

    def _entry(self, pos: int, **kw) -> dict:
        it = self.items[pos]
        return {"id": it.qid, "images": it.images, "text": it.text, **kw}

    def error_result(self, pos: int, msg: str, retry: bool) -> Result:
        return Result(pos, self.items[pos].key, self._entry(pos, error=msg), retry)

    def run_batch(self, inputs, positions: list[int]) -> list[Result]:
        a, cfg = self.args, self.model.cfg
        out = self.model.extract_features(**_model_inputs(inputs, self.device), layers=self.layers,
                                          final_norm=not a.no_final_norm)
        hs = _field(out, "hidden_states")
        layers = [int(x) for x in (_field(out, "layers") or self.layers)]
        self.resolved_layers = layers
        ids = _field(inputs, "input_ids").cpu()
        mask = _field(out, "attention_mask")
        mask = (mask if mask is not None else _field(inputs, "attention_mask")).cpu().bool()
        img_mask = _field(out, "image_mask")
        img_mask = (img_mask.cpu() if img_mask is not None else ids == cfg.image_token_id).bool()
        vis = _field(out, "vision_embeds") if a.save_vision else None
        hs = [h.to(self.save_dtype).cpu() if self.save_dtype is not None else h.cpu() for h in hs]
        if vis is not None:
            vis = vis.to(self.save_dtype).cpu() if self.save_dtype is not None else vis.cpu()
        results, vstart = [], 0
        for b, pos in enumerate(positions):
            valid = mask[b]
            keep = valid & img_mask[b] if a.tokens == "image" else valid
            t = {f"layer.{L}": h[b][keep].contiguous() for L, h in zip(layers, hs)}
            t["input_ids"] = ids[b][keep].to(torch.int32)
            t["image_mask"] = img_mask[b][keep]
            t["position"] = (torch.cumsum(valid.long(), 0) - 1)[keep].to(torch.int32)
            n_img = int(img_mask[b][valid].sum())
            if vis is not None:
                t["vision_embeds"] = vis[vstart:vstart + n_img].contiguous()
                vstart += n_img
            entry = self._entry(pos, image_sizes=self.sizes.get(pos, []), n_prompt_tokens=int(valid.sum()),
                                n_image_tokens=n_img, image_spans=_spans(t["image_mask"].tolist()))
            results.append(Result(pos, self.items[pos].key, entry, tensors=t))
        return results

    def rank_stats(self) -> dict:
        return {"layers": self.resolved_layers}

    def check_model(self, model) -> None:
        n = model.cfg.text.num_hidden_layers
        bad = [L for L in self.layers if not -(n + 1) <= L <= n]
        if bad:
            raise SystemExit(f"error: --layers {bad} out of range: this model has hidden states 0..{n} "
                             f"(0 embeddings, {n} after the final norm; negative counts from the end)")

    def merge(self, stats) -> str:
        resolved = next((st["extra"]["layers"] for st in stats if st["extra"].get("layers")), None)
        merge_features(self.items, self.out_dir, self.settings(), self.model_id, resolved)
        return os.path.join(self.out_dir, "index.json")


def merge_features(items: list[Item], out_dir: str, settings: dict, model_id: str,
                   resolved_layers: list[int] | None) -> int:
    """Write ``index.json``: every input, in input order, with its shard and rows; drop superseded shards."""
    done = read_feature_shards(out_dir)
    missing = [it for it in items if it.key not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} input(s) have no features in {out_dir} (e.g. {missing[0].qid!r}); "
                           f"rerun the same command to finish them")
    old = _read_json(os.path.join(out_dir, "index.json")) or {}
    entries = [done[it.key][0] for it in items]
    used = sorted({e["shard"] for e in entries if "shard" in e})
    layers = resolved_layers or old.get("layers") or settings["layers"]
    index = {
        "format": INDEX_FORMAT, "model_id": model_id, "layers": layers, "requested_layers": settings["layers"],
        "tokens": settings["tokens"], "text": settings["text"], "conv_mode": settings["conv_mode"],
        "final_norm": settings["final_norm"],
        "tensors": {
            "layer.<L>": "(rows, hidden) hidden state L: 0 embeddings, i output of decoder layer i, num_layers "
                         "after the final norm (-1 requests that one)",
            "input_ids": "(rows,) int32 token ids", "image_mask": "(rows,) bool, True on image-token rows",
            "position": "(rows,) int32, index of the row's token in the input's unpadded prompt",
            **({"vision_embeds": "(image tokens, hidden) vision tower output (vision_offset/vision_length)"}
               if settings["save_vision"] else {})},
        "rows": "all non-pad tokens of each input" if settings["tokens"] == "all" else "image tokens only",
        "shards": used, "items": entries}
    atomic_write_bytes(os.path.join(out_dir, "index.json"), (json.dumps(index, ensure_ascii=False) + "\n").encode())
    winners = {fn for _, _, fn in done.values()}
    for fn in list_shards(out_dir, FEATURE_SHARD_RE):  # every entry superseded by a later run
        if fn not in winners:
            os.remove(os.path.join(out_dir, fn))
    return len(entries)


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_features(out_dir: str, which: int | str) -> dict[str, torch.Tensor]:
    """Tensors of one input of an ``extract`` output, by position in the input or by id."""
    from safetensors import safe_open

    index = _read_json(os.path.join(out_dir, "index.json"))
    if index is None:
        raise FileNotFoundError(f"no index.json in {out_dir}")
    entries = index["items"]
    if isinstance(which, int):
        e = entries[which]
    else:
        e = next((x for x in entries if str(x["id"]) == str(which)), None)
        if e is None:
            raise KeyError(f"no input with id {which!r} in {out_dir}")
    if "error" in e:
        raise ValueError(f"input {e['id']!r} failed: {e['error']}")
    out = {}
    with safe_open(os.path.join(out_dir, e["shard"]), framework="pt") as f:
        for name in f.keys():
            if name == "vision_embeds":
                lo, n = e["vision_offset"], e["vision_length"]
            else:
                lo, n = e["offset"], e["length"]
            out[name] = f.get_slice(name)[lo:lo + n]
    return out


def run_extract(args, model=None) -> int:
    """The ``extract`` job for parsed ``args``; ``model`` reuses a loaded model (its device wins)."""
    return ExtractJob(args, model).run()


# ========================================================================================================= CLI
def _common_args(p: argparse.ArgumentParser, shard_size: int) -> None:
    p.add_argument("--model", "--model-path", dest="model", required=True,
                   help="checkpoint directory, or a preset name ('tiny', '3b', ...) for RANDOM weights")
    p.add_argument("--image-folder", default=None, help="base directory of relative image paths")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--conv-mode", default="chat", choices=["chat", "raw"],
                   help="chat: the model's chat template; raw: the text as is, images in front")
    p.add_argument("--batch-size", type=int, default=8, help="most items per batch")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="cap on batch size x longest (estimated) sequence, generated tokens included")
    p.add_argument("--sort-window", type=int, default=1024, help="items sorted by length within windows of this")
    p.add_argument("--shard-size", type=int, default=shard_size, help="items per shard file (resume granularity)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="threads decoding/preprocessing upcoming batches (0: inline)")
    p.add_argument("--prefetch", type=int, default=None,
                   help="batches prepared ahead, each held in (pinned) memory (default: workers + 1)")
    p.add_argument("--limit", type=int, default=None, help="only the first N inputs")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results in the output")
    p.add_argument("--retry-errors", action="store_true", help="redo items that failed in an earlier run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--progress-all-ranks", action="store_true", help="a progress line from every rank")
    p.add_argument("--max-model-failures", type=int, default=8,
                   help="stop after this many items in a row fail inside the model (they are retried next run)")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of a preset's random weights")
    p.add_argument("--dist-timeout", type=float, default=6 * 3600, help="torch.distributed timeout (s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qwen_batched", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Batched Qwen2.5-VL jobs (single process or torchrun).",
        epilog="""examples:
  python -m qwen_batched answer --model /ckpt/Qwen2.5-VL-7B-Instruct --questions q.jsonl \\
      --image-folder images/ --answers answers.jsonl --batch-size 32
  torchrun --nproc-per-node=8 -m qwen_batched answer --model /ckpt/Qwen2.5-VL-7B-Instruct ...   (same flags)
  python -m qwen_batched extract --model /ckpt/Qwen2.5-VL-3B-Instruct --images images/ --out feats/ \\
      --layers -1,12 --text "Describe the image."
  python -m qwen_batched answer --model tiny ...   (random weights: for trying the pipeline out)

Rerunning the same command resumes: finished items are kept, the rest is done, the output is rebuilt.""")
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser("answer", help="answer a question file (LLaVA model_vqa-style answers jsonl)")
    a.add_argument("--questions", "--question-file", dest="questions", required=True,
                   help='jsonl: {"question_id", "image": path or list, "text"}')
    a.add_argument("--answers", "--answers-file", dest="answers", required=True, help="output jsonl")
    a.add_argument("--shard-dir", default=None, help="where shards go (default: ANSWERS.parts)")
    a.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=128)
    a.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    a.add_argument("--top-k", type=int, default=0)
    a.add_argument("--top-p", type=float, default=1.0)
    a.add_argument("--seed", type=int, default=0, help="sampling seed (per batch: seed + first position)")
    _common_args(a, shard_size=64)
    a.set_defaults(func=run_answer)

    e = sub.add_parser("extract", help="write hidden states of chosen layers as safetensors shards + index.json")
    e.add_argument("--images", required=True, help="a directory, a .txt list of paths, or a .jsonl of inputs")
    e.add_argument("--out", required=True, help="output directory (shards and index.json)")
    e.add_argument("--layers", default="-1", help="comma-separated decoder layers, e.g. -1,12")
    e.add_argument("--text", default="", help="prompt text that goes with every image")
    e.add_argument("--tokens", default="all", choices=["all", "image"],
                   help="rows stored per input: all non-pad tokens, or only image tokens")
    e.add_argument("--save-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    e.add_argument("--save-vision", action="store_true", help="also store the vision tower's image embeddings")
    e.add_argument("--no-final-norm", action="store_true", help="last layer without the final RMSNorm")
    _common_args(e, shard_size=32)
    e.set_defaults(func=run_extract)
    return parser


def _join_layers(argv: list) -> list:
    """``--layers -1,12`` -> ``--layers=-1,12`` (argparse would take "-1,12" for an option)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--layers" and i + 1 < len(argv) and re.fullmatch(r"\s*-?\d+(\s*,\s*-?\d+)*\s*", str(argv[i + 1])):
            out.append(f"--layers={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: Sequence[str] | None = None, model=None) -> int:
    """CLI entry point; ``model`` (optional) is used instead of loading ``--model`` (in-process callers)."""
    args = build_parser().parse_args(_join_layers(list(sys.argv[1:] if argv is None else argv)))
    if args.prefetch is None:
        args.prefetch = max(2, args.workers + 1)
    if args.batch_size < 1 or args.shard_size < 1:
        raise SystemExit("error: --batch-size and --shard-size must be >= 1")
    src = args.questions if args.command == "answer" else args.images
    if not os.path.exists(src):
        raise SystemExit(f"error: {src} does not exist")
    return int(args.func(args, model=model) or 0)
