"""Output files: atomic writes (temporary file + ``os.replace``), shard names and listing, the settings check
that guards a resumed output, and the background shard writer."""
from __future__ import annotations

import json
import os
import re
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

TMP_PREFIX = ".tmp-"
# <prefix>-run<N>-<random>-r<rank>-<seq>: N counts the runs on this output, so later runs sort (and win) last.
ANSWER_SHARD_RE = re.compile(r"^answers-run(\d{5})-([0-9a-f]{6})-r(\d{5})-(\d{6})\.jsonl$")
FEATURE_SHARD_RE = re.compile(r"^features-run(\d{5})-([0-9a-f]{6})-r(\d{5})-(\d{6})\.safetensors$")


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

    def flush(self) -> None:
        """Write what is buffered and wait for every write to finish."""
        if self.buffer:
            self._write(self.buffer)
            self.buffer = []
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        self.flush()
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
