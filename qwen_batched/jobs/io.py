"""What a job reads and writes: input lines -> :class:`Item` (a bad line gets an error, never a guess), images,
atomic files and shards, the manifest that keeps one output to one model and one set of settings, progress."""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import sys
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from ..config import read_json  # noqa: F401 (the jobs' JSON files: settings.json, index.json)
from ..image_inputs import pil_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TMP_PREFIX = ".tmp-"
# <prefix>-run<N>-<random>-r<rank>-<seq>: N counts the runs on this output, so later runs sort (and win) last.
ANSWER_SHARD_RE = re.compile(r"^answers-run(\d{5})-([0-9a-f]{6})-r(\d{5})-(\d{6})\.jsonl$")
FEATURE_SHARD_RE = re.compile(r"^features-run(\d{5})-([0-9a-f]{6})-r(\d{5})-(\d{6})\.safetensors$")


# ============================================================================================== inputs
@dataclass
class Item:
    """One unit of work: a question (answer job) or an input to embed (extract job)."""

    index: int                 # position in the input (output order)
    key: str                   # identity across runs: "id:<json id>", or "content:<digest>#<occurrence>"
    digest: str                # hash of what the model sees: prompt, image paths, image files' size + mtime
    qid: Any                   # the question_id / id as given (None when absent)
    images: list[str]          # absolute paths
    text: str
    error: str | None = None   # the input line itself is unusable: it never reaches the model


@dataclass(frozen=True)
class LineSchema:
    """The keys an input line may carry."""

    id_key: str                # "question_id" (answer) or "id" (extract)
    text_required: bool
    default_text: str = ""
    extra_keys: tuple[str, ...] = ()  # accepted and ignored

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.id_key, "image", "text")


def _resolve(path: str, folder: str | None) -> str:
    path = os.path.expanduser(path)
    if folder and not os.path.isabs(path):
        path = os.path.join(folder, path)
    return os.path.abspath(path)


def _strip_image_placeholder(text: str) -> str:
    # LLaVA question files carry "<image>\n": the processor places the image tokens itself.
    return text.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip("\n")


def _parse_line(line: str, lineno: int, schema: LineSchema, folder: str | None) -> tuple[Any, list[str], str, str | None]:
    """(id, image paths, text, error) of one input line; the id is kept when only the rest is bad."""
    where = f"line {lineno}"
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        return None, [], "", f"{where}: not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(d, dict):
        return None, [], "", f"{where}: expected a JSON object with keys {', '.join(schema.keys)}, got a " \
                             f"JSON {type(d).__name__}"
    qid = d.get(schema.id_key)
    if qid is not None and (isinstance(qid, bool) or not isinstance(qid, (str, int))):
        return None, [], "", f"{where}: {schema.id_key!r} must be a string or an integer, got {qid!r}"
    unknown = [k for k in d if k not in schema.keys and k not in schema.extra_keys]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, schema.keys, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return qid, [], "", (f"{where}: unknown key {', '.join(hints)}; a line has {', '.join(schema.keys)} "
                             f"(pass --extra-keys {','.join(unknown)} to accept and ignore such keys)")
    img = d.get("image")
    imgs = [] if img is None else [img] if isinstance(img, str) else img
    if not isinstance(imgs, list) or not all(isinstance(p, str) and p for p in imgs):
        return qid, [], "", f"{where}: 'image' must be a path or a list of paths, got {img!r}"
    if "text" not in d and schema.text_required:
        return qid, [], "", f"{where}: no 'text' (the question to ask)"
    text = d.get("text", schema.default_text)
    if not isinstance(text, str):
        return qid, [], "", f"{where}: 'text' must be a string, got {text!r}"
    return qid, [_resolve(p, folder) for p in imgs], _strip_image_placeholder(text), None


def _file_identity(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _digest(text: str, images: list[str]) -> str:
    blob = json.dumps([text, [[p, _file_identity(p)] for p in images]], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _keyed(rows: list[tuple[int, Any, list[str], str, str | None]], id_key: str) -> list[Item]:
    """Items from (line, id, images, text, error) rows: a repeated id is an error from its second line on; an item
    without id is keyed by its content and occurrence, so inserting lines never shifts another item's key."""
    first: dict[str, int] = {}
    seen: dict[str, int] = {}
    items = []
    for index, (lineno, qid, images, text, err) in enumerate(rows):
        jid = None if qid is None else json.dumps(qid)
        if jid is not None:
            if jid in first and err is None:
                err = (f"line {lineno}: duplicate {id_key} {qid!r} (first on line {first[jid]}); results are "
                       f"keyed by id, so only the first line is processed")
            first.setdefault(jid, lineno)
        if err is not None:
            items.append(Item(index, f"error:{index}", "", qid, images, text, err))
            continue
        digest = _digest(text, images)
        if jid is not None:
            key = "id:" + jid
        else:
            n = seen.get(digest, 0)
            seen[digest] = n + 1
            key = f"content:{digest}#{n}"
        items.append(Item(index, key, digest, qid, images, text))
    return items


def _jsonl_rows(path: str, schema: LineSchema, folder: str | None, limit: int | None) -> list:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if limit is not None and len(rows) >= limit:
                break
            rows.append((lineno, *_parse_line(line, lineno, schema, folder)))
    return rows


def read_questions(path: str, image_folder: str | None = None, limit: int | None = None,
                   extra_keys: tuple[str, ...] = ()) -> list[Item]:
    """Question lines ``{"question_id"?, "image"? (path or list, relative to image_folder), "text"}``.

    Blank lines are skipped; a line that is not JSON, lacks "text", carries an unknown key or repeats an earlier
    question_id becomes an item with ``error`` set (its answer line says why).
    """
    schema = LineSchema("question_id", text_required=True, extra_keys=tuple(extra_keys))
    return _keyed(_jsonl_rows(path, schema, image_folder, limit), "question_id")


def read_image_inputs(spec: str, image_folder: str | None = None, text: str = "", limit: int | None = None,
                      extra_keys: tuple[str, ...] = ()) -> list[Item]:
    """Inputs of the extract job.

    ``spec`` is a directory (every image file below it, sorted; id = relative path), a ``.jsonl`` file
    (``{"id"?, "image" (path or list), "text"?}``, text defaulting to ``text``) or a text file with one image path
    per line (id = the path as written). Relative paths resolve against ``image_folder`` (default: the list
    file's directory).
    """
    if os.path.isdir(spec):
        root = os.path.abspath(spec)
        rels = sorted(os.path.relpath(os.path.join(d, fn), root) for d, _, fns in os.walk(root) for fn in fns
                      if fn.lower().endswith(IMAGE_EXTENSIONS))
        rows = [(0, rel, [os.path.join(root, rel)], text, None) for rel in rels[:limit]]
        return _keyed(rows, "id")
    folder = image_folder or os.path.dirname(os.path.abspath(spec))
    if spec.endswith(".jsonl"):
        schema = LineSchema("id", text_required=False, default_text=text, extra_keys=tuple(extra_keys))
        return _keyed(_jsonl_rows(spec, schema, folder, limit), "id")
    rows = []
    with open(spec, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            p = line.strip()
            if p and not p.startswith("#") and (limit is None or len(rows) < limit):
                rows.append((lineno, p, [_resolve(p, folder)], text, None))
    return _keyed(rows, "id")


def decode_image(path: str) -> torch.Tensor:
    """Decode to a (3, H, W) uint8 tensor (EXIF rotation applied, converted to RGB with transparency on white as
    the reference does); errors name the file."""
    import numpy as np
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            arr = np.asarray(pil_rgb(ImageOps.exif_transpose(im)), dtype=np.uint8).copy()
    except Exception as e:  # noqa: BLE001 - missing, truncated, not an image: one message naming the file
        raise ValueError(f"unreadable image {path}: {type(e).__name__}: {e}") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


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


# ============================================================================================== output files
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


def list_shards(directory: str, pattern: re.Pattern) -> list[str]:
    """Complete shard files, oldest run first (temporary files are never listed)."""
    if not os.path.isdir(directory):
        return []
    names = [fn for fn in os.listdir(directory) if pattern.match(fn)]
    return sorted(names, key=lambda fn: tuple(int(g) if g.isdigit() else g for g in pattern.match(fn).groups()))


def new_run_id(directory: str, pattern: re.Pattern) -> str:
    """One more than the highest run number among the shards present, plus a random tag."""
    runs = [int(pattern.match(fn).group(1)) for fn in list_shards(directory, pattern)]
    return f"run{max(runs, default=0) + 1:05d}-{uuid.uuid4().hex[:6]}"


def _model_change(old: dict, new: dict) -> str:
    a, b = old.get("fingerprint") or {}, new["fingerprint"]
    def source(fp):
        return {k: v for k, v in fp.items() if k != "weights_in_memory"}
    if source(a) == source(b):  # only the weights of a model passed to jobs.main differ
        return "model: other weights in memory (the model passed to jobs.main, whatever --model names)"
    made = f"--model {new['source']!r}" if old.get("source") == new["source"] else \
        f"these results were made with --model {old.get('source')!r}, this run has {new['source']!r}"
    if "files" in a and "files" in b:
        names = sorted(set(a["files"]) | set(b["files"]))
        what = [f"{n} {'added' if n not in a['files'] else 'removed' if n not in b['files'] else 'differs'}"
                for n in names if a["files"].get(n) != b["files"].get(n)]
        return f"model: another checkpoint ({', '.join(what)}; {made})"

    def desc(fp):
        return f"random-weight preset {fp['preset']!r} (weights seed {fp['weights_seed']})" if "preset" in fp \
            else "a checkpoint"
    return f"model: {desc(a)} -> {desc(b)} ({made})"


def manifest_changes(old: dict | None, new: dict) -> list[str]:
    """What differs between the manifest of the results on disk and this run's, in words."""
    if not isinstance(old, dict) or old.get("format") != new["format"]:
        got = "no settings.json" if old is None else (old.get("format") if isinstance(old, dict) else "unreadable")
        return [f"format: {got} -> {new['format']} (results of another version of the job)"]
    out = []
    if old.get("model", {}).get("fingerprint") != new["model"]["fingerprint"]:
        out.append(_model_change(old.get("model", {}), new["model"]))
    a, b = old.get("settings", {}), new["settings"]
    out += [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return out


def check_manifest(directory: str, manifest: dict, pattern: re.Pattern, overwrite: bool, elsewhere: str) -> None:
    """Keep an output to one model and one set of settings (rank 0): with earlier shards made otherwise, refuse
    (or, with ``overwrite``, delete them); then record ``manifest`` as ``settings.json``."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "settings.json")
    shards = list_shards(directory, pattern)
    if overwrite:
        for fn in shards:
            os.remove(os.path.join(directory, fn))
    elif shards:
        try:
            old = read_json(path)
        except ValueError:
            old = "unreadable"
        changes = manifest_changes(old, manifest)
        if changes:
            raise SystemExit(f"error: {directory} holds results made with another model or other settings:\n"
                             + "".join(f"  - {c}\n" for c in changes)
                             + f"Mixing them would give an output that no single run produced. Pass --overwrite to "
                               f"discard those results, or write to {elsewhere}.")
    for fn in os.listdir(directory):
        if fn.startswith(TMP_PREFIX):  # a write cut short by a crash
            try:
                os.remove(os.path.join(directory, fn))
            except FileNotFoundError:
                pass
    atomic_write_bytes(path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


class ShardWriter:
    """Buffers finished records and writes them ``shard_size`` at a time as atomically replaced files.

    Encoding and writing happen on one background thread (so the model does not wait for the disk); at most
    two shards are in flight, and a write error is raised in the caller at the next ``add`` or ``flush``.
    """

    def __init__(self, directory: str, prefix: str, run_id: str, rank: int, shard_size: int, ext: str,
                 encode: Callable[[list], bytes]):
        self.directory, self.prefix, self.run_id, self.rank = directory, prefix, run_id, rank
        self.shard_size, self.ext, self.encode = max(1, shard_size), ext, encode
        self.buffer: list = []
        self.seq = 0
        self.written: list[str] = []
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="qwen-batched-write")
        self.pending: deque = deque()

    def add(self, records: Iterable) -> None:
        self.buffer.extend(records)
        while len(self.buffer) >= self.shard_size:
            self._write(self.buffer[:self.shard_size])
            self.buffer = self.buffer[self.shard_size:]

    def close(self) -> None:
        """Write what is buffered and wait for every write to finish."""
        if self.buffer:
            self._write(self.buffer)
            self.buffer = []
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True)

    def _write(self, records: list) -> None:
        name = f"{self.prefix}-{self.run_id}-r{self.rank:05d}-{self.seq:06d}{self.ext}"
        self.seq += 1
        while self.pending and (self.pending[0].done() or len(self.pending) >= 2):
            self.pending.popleft().result()  # re-raises a failed write
        self.pending.append(self.pool.submit(self._save, name, records))

    def _save(self, name: str, records: list) -> None:
        atomic_write_bytes(os.path.join(self.directory, name), self.encode(records))
        self.written.append(name)


# ============================================================================================== progress
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

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.interval and self.done < self.total:
            self.last = now
            self._print(final=False)

    def _print(self, final: bool) -> None:
        el = time.perf_counter() - self.start
        rate = self.done / el if el > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        msg = (f"{self.desc}: {self.done}/{self.total} [{100.0 * self.done / max(1, self.total):5.1f}%] "
               f"{rate:.2f} it/s, {_fmt_s(el)} elapsed" + ("" if final else f", eta {_fmt_s(eta)}"))
        self.stream.write(("\r" + msg + ("\n" if final else "\x1b[K")) if self.tty else msg + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._print(final=True)


def _fmt_s(s: float) -> str:
    if s != s:  # nan
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
