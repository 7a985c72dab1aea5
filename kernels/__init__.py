"""Triton kernels (optional: every kernel has a torch reference used when triton or CUDA is missing)."""
from .patchify import HAS_TRITON, patchify, patchify_reference, resize_patchify

__all__ = ["HAS_TRITON", "patchify", "patchify_reference", "resize_patchify"]
