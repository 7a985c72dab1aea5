"""Triton kernels (optional: every kernel has a torch reference used when triton or CUDA is missing)."""
from ._triton import HAS_TRITON, LAUNCH_ERRORS
from .patchify import patchify, patchify_reference, resize_patchify
from .rmsnorm import rms_norm, rms_norm_reference
from .rotary import rope_qk, rope_qk_reference, rotary_qkv, rotary_qkv_reference

__all__ = ["HAS_TRITON", "LAUNCH_ERRORS", "patchify", "patchify_reference", "resize_patchify", "rms_norm", "rms_norm_reference",
           "rope_qk", "rope_qk_reference", "rotary_qkv", "rotary_qkv_reference"]

# the MLP's activation, and the residual add fused into the norm after it
from .rmsnorm import add_rms_norm, add_rms_norm_reference  # noqa: E402
from .swiglu import silu_mul, silu_mul_reference  # noqa: E402

__all__ += ["add_rms_norm", "add_rms_norm_reference", "silu_mul", "silu_mul_reference"]
