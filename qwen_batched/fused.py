"""Fused Triton kernels on CUDA, with the torch reference everywhere else.

The processor's resize + patchify kernels (``kernels/patchify.py``) share the switch below. RMSNorm and the vision
rotary are memory-bound chains of small ops in eager torch (several float32 temporaries
per call); on CUDA with triton each runs as one kernel with the reference's roundings. Under ``torch.compile``
the torch reference is used (the compiler fuses it itself). A kernel that fails to build or launch
(``LAUNCH_ERRORS``) switches the Triton path off for the process, with a warning; a kernel's own argument
checks (ValueError/TypeError) and out-of-memory errors reach the caller. ``QWEN_BATCHED_TRITON=0`` switches the
kernels off up front. The kernels are imported as ``qwen_batched.kernels`` only (installed from ``kernels/``).
"""
from __future__ import annotations

import os
import warnings

import torch

from qwen_batched.kernels import HAS_TRITON, LAUNCH_ERRORS, rmsnorm, rotary
from qwen_batched.kernels.patchify import patchify_reference, resize_patchify  # noqa: F401 (the processor's)

_state = {"on": os.environ.get("QWEN_BATCHED_TRITON", "1") != "0"}


def kernels_enabled() -> bool:
    """Whether the Triton kernels may run (triton imports, not switched off, none has failed yet)."""
    return HAS_TRITON and _state["on"]


def _use_kernel(x: torch.Tensor) -> bool:
    return kernels_enabled() and x.is_cuda and not torch.compiler.is_compiling()


def give_up(name: str, err: Exception) -> None:
    """A kernel failed to build or launch: switch the Triton path off for the process, with a warning.
    Anything else (an argument check's ValueError, out of memory) is re-raised."""
    if not isinstance(err, LAUNCH_ERRORS) or isinstance(err, torch.cuda.OutOfMemoryError):
        raise err
    _state["on"] = False
    warnings.warn(f"Triton {name} kernel failed ({type(err).__name__}: {err}); using the torch path from now on")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: normalise in fp32, cast to x's dtype, scale by the weight."""
    if _use_kernel(x):
        try:
            return rmsnorm.rms_norm(x, weight, eps)
        except LAUNCH_ERRORS as e:  # build/launch failure on an unusual GPU or triton version
            give_up("rms_norm", e)
    return rmsnorm.rms_norm_reference(x, weight, eps)


def rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """qkv (N, 3, H, hd), cos/sin (N, hd) fp32 -> rotated q and k, (N, 2H, hd), rotation in fp32."""
    if _use_kernel(qkv):
        try:
            return rotary.rotary_qk(qkv, cos, sin)
        except LAUNCH_ERRORS as e:
            give_up("rotary", e)
    return rotary.rotary_qk_reference(qkv, cos, sin)
