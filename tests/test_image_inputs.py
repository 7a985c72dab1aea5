"""Inputs are never guessed at: value ranges, per-image names in errors, channels-last hints; checks before work."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_batched import QwenBatchedVL
from qwen_batched import processor as processor_module
from qwen_batched.config import tiny_config
from qwen_batched.processor import BatchedImageProcessor, load_processor
from tests.host_reads import count_host_reads


def frames(n=2, h=56, w=84, seed=0) -> torch.Tensor:
    """(n, 3, h, w) uint8 camera-like frames."""
    return torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.fixture(scope="module")
def proc():
    return BatchedImageProcessor()


@pytest.fixture
def no_work(monkeypatch):
    """Make any resize or patchify fail: the checks under test must come first."""
    def fail(*a, **k):
        raise AssertionError("processed pixels before checking every input")

    monkeypatch.setattr(processor_module, "resize_float", fail)
    monkeypatch.setattr(processor_module, "patchify_reference", fail)
    monkeypatch.setattr(processor_module, "resize_patchify", fail)


# ------------------------------------------------------------------------------------------- value ranges
def test_float_0_255_frames_are_an_error_with_the_fix(proc, no_work):
    x = frames().float()  # the commonest mistake: uint8 camera frames cast with .float()
    with pytest.raises(ValueError) as e:
        proc.preprocess_images(x[None])  # (B=1, N=2, 3, H, W)
    msg = str(e.value)
    assert msg.startswith("images[0][0]: floating-point images are read as 0..1")
    assert "uint8" in msg and "rescale=True" in msg and "rescale=False" in msg and "values in [0, 255]" in msg
    with pytest.raises(ValueError, match=r"videos\[1\]: floating-point images are read as 0\.\.1"):
        proc.preprocess_videos([frames(seed=1).float() / 255, frames(seed=2).float()])
    tiny = load_processor(None, tiny_config())
    with pytest.raises(ValueError, match=r"images\[1\]\[0\]: floating-point images are read as 0\.\.1"):
        tiny.prepare([[frames(1)[0].float() / 255], [frames(1)[0].float()]], ["a", "b"])


def test_slightly_out_of_range_and_negative_floats_are_errors(proc):
    x = frames(1).float() / 255
    with pytest.raises(ValueError, match=r"images\[0\]: .*values in \[-0\.5, "):
        proc.preprocess_images([x[0] - 0.5])
    with pytest.raises(ValueError, match=r"images\[0\]: .*values in \[0, 1\.01\]"):
        proc.preprocess_images([x[0].clamp(0, 1).index_fill(2, torch.tensor([0]), 1.01)])


def test_float_0_1_and_uint8_agree(proc):
    x = frames()
    ref = proc.preprocess_images(x).pixel_values
    assert (proc.preprocess_images(x.float() / 255).pixel_values - ref).abs().max() <= 1e-5


def test_rescale_true_takes_0_255_and_checks_that_range(proc, no_work):
    x = frames().float()
    x[1] *= 2  # the second image only
    with pytest.raises(ValueError, match=r"images\[1\]: rescale=True reads images as 0\.\.255, .*\[0, 510\]"):
        proc.preprocess_images(x, rescale=True)
    with pytest.raises(ValueError, match="rescale=True reads images as 0..255"):
        proc.preprocess_images([frames(1)[0].float() - 1], rescale=True)


def test_rescale_true_and_false_accept_their_data(proc):
    x = frames()
    ref = proc.preprocess_images(x).pixel_values
    assert (proc.preprocess_images(x.float(), rescale=True).pixel_values - ref).abs().max() <= 1e-6
    # rescale=False: values as given (here already divided by 255 and shifted: no range applies), no error
    shifted = x.float() / 255 - 0.5
    raw = proc.preprocess_images(shifted, rescale=False).pixel_values
    assert (raw - proc.preprocess_images(x.float() / 255).pixel_values).abs().max() > 1  # the shift went through
    big = proc.preprocess_images(x.float(), rescale=False).pixel_values  # 0..255 as given: huge but accepted
    assert big.abs().max() > 100


def test_rescale_must_be_none_or_bool(proc):
    with pytest.raises(TypeError, match="rescale must be None"):
        proc.preprocess_images(frames(), rescale=1)


def test_nan_is_still_reported_per_image(proc):
    x = frames(3).float() / 255
    x[2, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"images\[2\]: floating-point images must be finite"):
        proc.preprocess_images(list(x), rescale=False)


def test_value_check_is_one_host_read_for_all_groups(proc):
    """Finiteness and range of every floating image: one reduction per group, one read for the batch."""
    imgs = [[frames(1, 56, 56)[0], frames(1, 84, 56, 1)[0]], [frames(1, 56, 56, 2)[0]], [frames(1, 112, 56, 3)[0]]]
    as_float = [[im.float() / 255 for im in s] for s in imgs]
    with count_host_reads() as u8:
        proc.preprocess_images(imgs)
    with count_host_reads() as f32:
        proc.preprocess_images(as_float)
    assert f32.count - u8.count == 1, (u8.calls, f32.calls)


def test_extract_features_rejects_float_0_255_frames():
    model = QwenBatchedVL.from_config("tiny")
    x = frames(2)[:, None]  # (B=2, cameras=1, 3, H, W)
    with pytest.raises(ValueError, match=r"images\[0\]\[0\]: floating-point images are read as 0\.\.1"):
        model.extract_features(images=x.float(), texts=["a", "b"])
    out = model.extract_features(images=x.float() / 255, texts=["a", "b"], layers=[-1])
    ref = model.extract_features(images=x, texts=["a", "b"], layers=[-1])
    assert (out.hidden_states[0] - ref.hidden_states[0]).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------------- named errors
def test_aspect_ratio_error_names_the_image(proc, no_work):
    bad = torch.zeros(3, 10, 3000, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"^images\[1\]\[2\]: aspect ratio 300 > 200 \(image 10x3000\)"):
        proc.preprocess_images([[frames(1)[0]], [frames(1)[0], frames(1, 60, 60)[0], bad]])
    with pytest.raises(ValueError, match=r"^images\[0\]\[0\]: aspect ratio .* \(and 3 more of this size\)"):
        proc.preprocess_images(torch.zeros(2, 2, 3, 5, 1100, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"^videos\[0\]\[1\]: aspect ratio"):
        proc.preprocess_videos([[frames(2), torch.zeros(2, 3, 2000, 8, dtype=torch.uint8)]])


def test_other_errors_name_the_image(proc):
    with pytest.raises(ValueError, match=r"images\[1\]\[1\]: expected 3 channels"):
        proc.preprocess_images([[frames(1)[0]], [frames(1)[0], torch.zeros(1, 56, 56, dtype=torch.uint8)]])
    with pytest.raises(TypeError, match=r"images\[1\]\[2\]: images must be uint8"):
        proc.preprocess_images([[], list(frames(2)) + [frames(1)[0].to(torch.int16)]])
    with pytest.raises(ValueError, match=r"videos\[0\]\[1\]: the frames of a clip"):
        proc.preprocess_videos([[frames(2), [frames(1)[0], frames(1, 84, 84)[0]]]])


# ------------------------------------------------------------------------------------------- channels-last hints
def test_channels_last_tensors_get_a_permute_hint(proc):
    with pytest.raises(ValueError, match=r"channels-last .* pass x\.permute\(0, 3, 1, 2\)"):
        proc.preprocess_images(torch.zeros(2, 56, 56, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"images\[0\]: .*channels-last .* x\.permute\(2, 0, 1\)"):
        proc.preprocess_images([torch.zeros(56, 84, 3, dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"x\.permute\(0, 1, 4, 2, 3\)"):
        proc.preprocess_images(torch.zeros(2, 2, 56, 56, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"videos\[0\]: .*x\.permute\(0, 3, 1, 2\)"):
        proc.preprocess_videos([torch.zeros(4, 56, 56, 3, dtype=torch.uint8)])


def test_numpy_layouts_get_a_transpose_hint(proc):
    with pytest.raises(ValueError, match=r"images\[0\]\[0\]: .*channels-first.* a\.transpose\(1, 2, 0\)"):
        proc.preprocess_images([[np.zeros((3, 56, 84), dtype=np.uint8)]])
    with pytest.raises(ValueError, match=r"images\[0\]: .*pass a list of \(H, W, 3\) arrays"):
        proc.preprocess_images([np.zeros((2, 56, 84, 3), dtype=np.uint8)])
    with pytest.raises(TypeError, match=r"numpy array of shape \(2, 56, 84, 3\).*permute\(0, 3, 1, 2\)"):
        proc.preprocess_images(np.zeros((2, 56, 84, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"videos\[0\]: .*a\.transpose\(0, 2, 3, 1\)"):
        proc.preprocess_videos([np.zeros((4, 3, 56, 56), dtype=np.uint8)])


def test_channels_last_numpy_is_read_correctly(proc):
    x = frames(2)
    ref = proc.preprocess_images(x)
    arrays = [im.permute(1, 2, 0).numpy() for im in x]
    assert proc.preprocess_images(arrays).pixel_values.equal(ref.pixel_values)
    assert proc.preprocess_images(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)).pixel_values.equal(
        ref.pixel_values)
