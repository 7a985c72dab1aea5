"""Triton kernels (optional: every kernel has a torch reference used when triton or CUDA is missing)."""
from ._triton import HAS_TRITON, LAUNCH_ERRORS
from .patchify import patchify, patchify_reference, resize_patchify
from .rmsnorm import rms_norm, rms_norm_reference
from .rotary import rotary_qk, rotary_qk_reference

__all__ = ["HAS_TRITON", "LAUNCH_ERRORS", "patchify", "patchify_reference", "resize_patchify", "rms_norm", "rms_norm_reference",
           "rotary_qk", "rotary_qk_reference"]
