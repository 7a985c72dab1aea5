"""Triton kernels (optional: every kernel has a torch reference used when triton or CUDA is missing)."""
from ._triton import HAS_TRITON, LAUNCH_ERRORS
from .patchify import patchify, patchify_reference, resize_patchify
from .rmsnorm import rms_norm, rms_norm_reference
from .rotary import rope_qk, rope_qk_reference, rotary_qkv, rotary_qkv_reference

__all__ = ["HAS_TRITON", "LAUNCH_ERRORS", "patchify", "patchify_reference", "resize_patchify", "rms_norm", "rms_norm_reference",
           "rope_qk", "rope_qk_reference", "rotary_qkv", "rotary_qkv_reference"]
