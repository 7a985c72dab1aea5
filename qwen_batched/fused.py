"""Fused Triton kernels on CUDA, with the torch reference everywhere else.

The processor's resize + patchify kernels (``kernels/patchify.py``) share the switch below. RMSNorm, the vision
rotary and the decoder's M-RoPE are memory-bound chains of small ops in eager torch (several temporaries and
launches per call, which bound a small batch's latency); on CUDA with triton each runs as one kernel with the
reference's roundings. Under ``torch.compile`` the torch reference is used (the compiler fuses it itself). A
kernel that fails to build or launch (``LAUNCH_ERRORS``) switches the Triton path off for the process, with a
warning; a kernel's own argument checks (ValueError/TypeError) and out-of-memory errors reach the caller.
``QWEN_BATCHED_TRITON=0`` switches the kernels off up front. The kernels are imported as ``qwen_batched.kernels``
only (installed from ``kernels/``).
"""
from __future__ import annotations

import os
import warnings

import torch

from qwen_batched.kernels import HAS_TRITON, LAUNCH_ERRORS, rmsnorm, rotary, swiglu
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


# ---------------------------------------------------------------------------------------------- MLP and residual
# The SwiGLU activation (silu, then mul: two launches and a temporary in eager torch) and the residual add in
# front of a layer's second norm (add, then the norm kernel) each run as one kernel with torch's roundings.
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (..., H), silu rounded to the dtype before the product, as in eager torch."""
    if _use_kernel(gate):
        try:
            return swiglu.silu_mul(_waited(gate), _waited(up))
        except LAUNCH_ERRORS as e:
            give_up("silu_mul", e)
    return swiglu.silu_mul_reference(gate, up)


def add_rms_norm(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, y) = (x + r, rms_norm(x + r)) for x, r (..., D): s is the residual stream, the same tensor values as
    the plain add."""
    if _use_kernel(x):
        try:
            return rmsnorm.add_rms_norm(_waited(x), _waited(r), weight, eps)
        except LAUNCH_ERRORS as e:
            give_up("add_rms_norm", e)
    return rmsnorm.add_rms_norm_reference(x, r, weight, eps)


def _waited(t: torch.Tensor) -> torch.Tensor:
    """``t``, or the waited result if it is tensor parallelism's all-reduce output (an AsyncCollectiveTensor: a
    wrapper without storage, data_ptr 0, that waits only when a torch op reads it; a kernel reads memory)."""
    if type(t) is torch.Tensor or not torch.distributed.is_available():
        return t
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return t.wait() if isinstance(t, AsyncCollectiveTensor) else t


# ---------------------------------------------------------------------------------------------- norm and rotary
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: normalise in fp32, cast to x's dtype, scale by the weight."""
    if _use_kernel(x):
        try:
            return rmsnorm.rms_norm(x, weight, eps)
        except LAUNCH_ERRORS as e:  # build/launch failure on an unusual GPU or triton version
            give_up("rms_norm", e)
    return rmsnorm.rms_norm_reference(x, weight, eps)


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               copy_v: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (N, 3, H, hd), cos/sin (N, hd) fp32 -> q, k (rotated in fp32, dense), v, each (N, H, hd).

    ``copy_v``: v dense too (the CUDA varlen kernels want it; the kernel copies it in the same launch), else a
    view of qkv (SDPA takes it as is).
    """
    if _use_kernel(qkv):
        try:
            return rotary.rotary_qkv(qkv, cos, sin, copy_v)
        except LAUNCH_ERRORS as e:
            give_up("rotary", e)
    return rotary.rotary_qkv_reference(qkv, cos, sin, copy_v)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE of q (..., T, H, hd) and k (..., T, Hkv, hd) with cos/sin (..., T, hd) in their dtype: one kernel
    on CUDA, bit for bit ``apply_rope`` of each (which the compiler fuses itself under torch.compile)."""
    if _use_kernel(q):
        try:
            return rotary.rope_qk(q, k, cos, sin)
        except LAUNCH_ERRORS as e:
            give_up("rope", e)
    return rotary.rope_qk_reference(q, k, cos, sin)
