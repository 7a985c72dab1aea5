"""The progress line on stderr."""
from __future__ import annotations

import sys
import time


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
