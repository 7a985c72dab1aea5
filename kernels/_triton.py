"""The one place that imports triton: ``HAS_TRITON`` for every kernel, and the errors that mean "cannot build or
launch here" (as opposed to a kernel's own argument checks, which raise ValueError/TypeError)."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
    from triton.errors import TritonError

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    triton = tl = None
    TritonError = None
    HAS_TRITON = False

# compile errors, out-of-resources, PTX assembly failures (TritonError), driver/launch failures (RuntimeError),
# a backend that is missing on this platform (NotImplementedError)
LAUNCH_ERRORS: tuple[type[BaseException], ...] = tuple(
    e for e in (TritonError, RuntimeError, NotImplementedError) if e is not None)
