"""Fused Triton kernels on CUDA, with the torch reference everywhere else.

The processor's resize + patchify kernels (``kernels/patchify.py``) share the switch below. RMSNorm (alone and
with the residual add before it), the vision rotary, the decoder's M-RoPE and the SwiGLU activation are
memory-bound chains of small ops in eager torch (several temporaries and launches per call, which bound a small
batch's latency); on CUDA with triton each runs as one kernel with the reference's roundings. Under
``torch.compile`` the torch reference is used (the compiler fuses it itself). A kernel that fails to build or
launch (``LAUNCH_ERRORS``) is switched off for the process, with a warning (the other kernels stay on); a kernel's
own argument checks (ValueError/TypeError) and out-of-memory errors reach the caller.
``QWEN_BATCHED_TRITON=0`` switches the kernels off up front. The kernels are imported as ``qwen_batched.kernels``
only (installed from ``kernels/``).
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from qwen_batched.kernels import HAS_TRITON, LAUNCH_ERRORS, rmsnorm, rotary, swiglu
from qwen_batched.kernels.patchify import patchify_reference, resize_patchify  # noqa: F401 (the processor's)

_state = {"on": os.environ.get("QWEN_BATCHED_TRITON", "1") != "0", "failed": set()}


def kernels_enabled(name: str | None = None) -> bool:
    """Whether the Triton kernels may run (triton imports, not switched off); with ``name``, whether that kernel
    has not failed in this process."""
    return HAS_TRITON and _state["on"] and name not in _state["failed"]


def _use_kernel(x: torch.Tensor) -> bool:
    return kernels_enabled() and x.is_cuda and not torch.compiler.is_compiling()


def give_up(name: str, err: Exception) -> None:
    """Kernel ``name`` failed to build or launch: switch it off for the process, with a warning (one kernel that
    a GPU or triton version cannot build costs only its own speed). Anything else (an argument check's
    ValueError, out of memory) is re-raised."""
    if not isinstance(err, LAUNCH_ERRORS) or isinstance(err, torch.cuda.OutOfMemoryError):
        raise err
    _state["failed"].add(name)
    warnings.warn(f"Triton {name} kernel failed ({type(err).__name__}: {err}); using the torch path for it from "
                  "now on")


def on_device(t: torch.Tensor):
    """A context making ``t``'s GPU the current one when it is not: Triton launches on the current device and its
    stream, whatever device the pointers it is given live on."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _run(name: str, module, fn: str, *args):
    """``module.<fn>`` (the Triton kernel) on CUDA when the kernels are on, else ``module.<fn>_reference``. A
    kernel that cannot build or launch is switched off (``give_up``) and the reference runs instead."""
    if name not in _state["failed"] and _use_kernel(args[0]):
        try:
            with on_device(args[0]):
                return getattr(module, fn)(*(_waited(a) for a in args))
        except LAUNCH_ERRORS as e:  # build/launch failure on an unusual GPU or triton version
            give_up(name, e)
    return getattr(module, fn + "_reference")(*args)


def _waited(t):
    """``t``, or the waited result if it is tensor parallelism's all-reduce output (an AsyncCollectiveTensor: a
    wrapper without storage, data_ptr 0, that waits only when a torch op reads it; a kernel reads memory)."""
    if type(t) is not torch.Tensor and isinstance(t, torch.Tensor) and torch.distributed.is_available():
        from torch.distributed._functional_collectives import AsyncCollectiveTensor

        if isinstance(t, AsyncCollectiveTensor):
            return t.wait()
    return t


# ---------------------------------------------------------------------------------------------- norm and rotary
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: normalise in fp32, cast to x's dtype, scale by the weight."""
    return _run("rms_norm", rmsnorm, "rms_norm", x, weight, eps)


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               copy_v: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (N, 3, H, hd), cos/sin (N, hd) fp32 -> q, k (rotated in fp32, dense), v, each (N, H, hd).

    ``copy_v``: v dense too (the CUDA varlen kernels want it; the kernel copies it in the same launch), else a
    view of qkv (SDPA takes it as is).
    """
    return _run("rotary", rotary, "rotary_qkv", qkv, cos, sin, copy_v)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE of q (..., T, H, hd) and k (..., T, Hkv, hd) with cos/sin (..., T, hd) in their dtype: one kernel
    on CUDA, bit for bit ``apply_rope`` of each (which the compiler fuses itself under torch.compile)."""
    return _run("rope", rotary, "rope_qk", q, k, cos, sin)


# ---------------------------------------------------------------------------------------------- MLP and residual
# The SwiGLU activation (silu, then mul: two launches and a temporary in eager torch) and the residual add in
# front of a layer's second norm (add, then the norm kernel) each run as one kernel with torch's roundings.
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (..., H), silu rounded to the dtype before the product, as in eager torch."""
    return _run("silu_mul", swiglu, "silu_mul", gate, up)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y) = (x + r, rms_norm(x + r)) for x, r (..., D): s is the residual stream, the same tensor values as
    the plain add."""
    return _run("add_rms_norm", rmsnorm, "add_rms_norm", x, r, weight, eps)
