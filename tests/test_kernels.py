"""Triton patchify kernel == its torch reference (CPU under TRITON_INTERPRET=1, or CUDA)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from qwen_batched.processor import CLIP_MEAN, CLIP_STD  # noqa: E402

try:  # noqa: E402
    from qwen_batched.kernels.patchify import patchify, patchify_reference
except ImportError:
    from kernels.patchify import patchify, patchify_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MEAN255 = torch.tensor(CLIP_MEAN) * 255.0
STD255 = torch.tensor(CLIP_STD) * 255.0


def _frames(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(DEVICE)
    return torch.rand(shape, generator=g).to(DEVICE)


@pytest.mark.parametrize("shape", [(2, 1, 3, 28, 56), (1, 4, 3, 56, 28), (1, 3, 3, 28, 28)])
def test_patchify_kernel_matches_reference_uint8(shape):
    x = _frames(shape, torch.uint8)
    ours = patchify(x, MEAN255, STD255)
    ref = patchify_reference(x, MEAN255.to(DEVICE), STD255.to(DEVICE))
    assert ours.shape == ref.shape == (shape[0] * -(-shape[1] // 2) * (shape[3] // 14) * (shape[4] // 14), 1176)
    assert (ours - ref).abs().max().item() == 0.0  # IEEE division: the same bits


def test_patchify_kernel_strided_float_input():
    x = _frames((2, 1, 3, 56, 28), torch.float32, seed=1)
    strided = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, column-major planes
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    ours = patchify(strided, mean, std)
    ref = patchify_reference(x, mean.to(DEVICE), std.to(DEVICE))
    assert (ours - ref).abs().max().item() == 0.0


def test_patchify_kernel_expanded_frames():
    """A stride-0 frame axis (an image repeated in time) reads the same memory for both temporal slots."""
    img = _frames((2, 1, 3, 28, 28), torch.uint8, seed=2)
    ours = patchify(img.expand(2, 2, 3, 28, 28), MEAN255, STD255)
    assert ours.equal(patchify(img, MEAN255, STD255))
    assert ours[:, :196].equal(ours[:, 196:392])  # channel 0: slot t=0 == slot t=1
