"""Triton patchify / resize+patchify kernels == the torch path (CPU under TRITON_INTERPRET=1, or CUDA)."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from qwen_batched.processor import CLIP_MEAN, CLIP_STD  # noqa: E402
from qwen_batched.resize import ResizeTables, resize_float  # noqa: E402

from qwen_batched.kernels.patchify import patchify, patchify_reference, resize_patchify  # noqa: E402

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


def _torch_path(frames, size, mean, std):
    """What the processor does without Triton: torchvision-style resize, then the reference patchify."""
    n, f, c, h, w = frames.shape
    uint8 = frames.dtype == torch.uint8
    x = resize_float(frames.reshape(n * f, c, h, w).cpu(), size, round_uint8=uint8).view(n, f, c, *size)
    return patchify_reference(x, mean, std)


@pytest.mark.parametrize("shape, size", [
    ((2, 1, 3, 60, 90), (56, 84)),  # both axes, downscale
    ((1, 1, 3, 56, 40), (56, 56)),  # width only, upscale
    ((1, 3, 3, 30, 28), (56, 28)),  # height only, odd clip
    ((1, 1, 3, 100, 33), (28, 28)),  # strong downscale: wide support
])
def test_resize_patchify_matches_torch_path(shape, size):
    x = _frames(shape, torch.uint8, seed=3)
    taps = [ResizeTables().taps(a, b, DEVICE) if a != b else None for a, b in zip(shape[-2:], size)]
    ours = resize_patchify(x, MEAN255, STD255, height_taps=taps[0], width_taps=taps[1], round_uint8=True).cpu()
    ref = _torch_path(x, size, MEAN255, STD255)
    diff = (ours - ref).abs()
    step = 1 / (255 * min(CLIP_STD))
    # float sums agree to ~1e-6 of a step, so only exact .5 ties may round the other way
    assert diff.max() <= step + 1e-5 and (diff > 1e-5).float().mean() <= 1e-3
    xf = _frames(shape, torch.float32, seed=4)
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    ours_f = resize_patchify(xf, mean, std, height_taps=taps[0], width_taps=taps[1]).cpu()
    assert (ours_f - _torch_path(xf, size, mean, std)).abs().max() <= 1e-5


def test_resize_patchify_rounds_half_to_even_and_clamps():
    vals = torch.tensor([-3.0, 0.5, 1.5, 2.5, 2.49, 2.51, 254.5, 255.5, 300.0, 7.0])
    x = vals.repeat(3 * 28 * 28 // 10 + 1)[: 3 * 28 * 28].view(1, 1, 3, 28, 28).to(DEVICE)
    zeros, ones = torch.zeros(3), torch.ones(3)
    out = resize_patchify(x, zeros, ones, round_uint8=True).cpu()
    assert out.equal(patchify_reference(x.cpu().clamp(0, 255).round(), zeros, ones))


def test_processor_triton_path_matches_torch_path():
    from qwen_batched.processor import BatchedImageProcessor

    imgs = [[_frames((3, 60, 90), torch.uint8, 5), _frames((3, 56, 56), torch.float32, 6)], None,
            [_frames((3, 56, 84), torch.uint8, 7)]]
    fast = BatchedImageProcessor(use_triton=True).preprocess_images(imgs)
    ref = BatchedImageProcessor(use_triton=False).preprocess_images([[x.cpu() for x in s] if s else s for s in imgs])
    assert fast.image_grid_thw.cpu().equal(ref.image_grid_thw) and fast.images_per_sample == (2, 0, 1)
    diff = (fast.pixel_values.cpu() - ref.pixel_values).abs()
    assert (diff > 1e-5).float().mean() <= 1e-3 and diff.max() <= 1 / (255 * min(CLIP_STD)) + 1e-5
