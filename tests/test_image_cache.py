"""Per-image embedding cache: hits skip the vision tower, results equal the uncached path, LRU by bytes."""
import pytest
import torch

from qwen_batched import QwenBatchedVL
from qwen_batched.image_cache import ImageEmbeddingCache
from tests.helpers import count_vision_rows, rel_err


@pytest.fixture()
def model():
    return QwenBatchedVL.from_config("tiny", seed=0)


def _images(grids, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t * h * w, 1176, generator=g) for t, h, w in grids]


def test_hits_skip_vision_and_match_uncached(model):
    grids = [(1, 8, 8), (1, 6, 4), (2, 4, 4)]
    imgs = _images(grids, 0)
    pv, g = torch.cat(imgs), torch.tensor(grids)
    ref = model.encode_images(pv, g)
    model.enable_image_cache(max_bytes=1 << 20)
    calls = count_vision_rows(model)
    first = model.encode_images(pv, g)
    assert calls == [pv.shape[0]]
    second = model.encode_images(pv, g)
    assert calls == [pv.shape[0]], "a full hit must not run the vision tower"
    assert torch.equal(first, second) and rel_err(first, ref) <= 1e-6
    assert model.image_cache.hits == 3 and model.image_cache.misses == 3
    # a new batch mixing a cached image and a new one encodes only the new one
    new = _images([(1, 4, 6)], 9)[0]
    out = model.encode_images(torch.cat([imgs[1], new]), torch.tensor([grids[1], (1, 4, 6)]))
    assert calls[-1] == new.shape[0]
    model.disable_image_cache()
    ref2 = model.encode_images(torch.cat([imgs[1], new]), torch.tensor([grids[1], (1, 4, 6)]))
    assert rel_err(out, ref2) <= 1e-6


def test_duplicates_in_one_batch_encoded_once(model):
    model.enable_image_cache(max_bytes=1 << 20)
    calls = count_vision_rows(model)
    a, b = _images([(1, 8, 8), (1, 4, 4)], 1)
    pv = torch.cat([a, b, a, a, b])
    grids = torch.tensor([(1, 8, 8), (1, 4, 4)] * 1 + [(1, 8, 8), (1, 8, 8), (1, 4, 4)])
    out = model.encode_images(pv, grids)
    assert calls == [a.shape[0] + b.shape[0]]
    assert out.shape[0] == (3 * 64 + 2 * 16) // 4
    assert torch.equal(out[:16], out[20:36]) and torch.equal(out[16:20], out[52:56])


def test_same_pixels_other_grid_is_a_miss(model):
    model.enable_image_cache(max_bytes=1 << 20)
    pv = _images([(1, 8, 8)], 2)[0]
    a = model.encode_images(pv, torch.tensor([(1, 8, 8)]))
    b = model.encode_images(pv, torch.tensor([(1, 4, 16)]))
    assert model.image_cache.misses == 2 and not torch.allclose(a, b)


def test_eviction_respects_byte_budget(model):
    per_image = 16 * 128 * 4  # (1,8,8) -> 16 tokens x 128 dims fp32
    model.enable_image_cache(max_bytes=3 * per_image)
    imgs = _images([(1, 8, 8)] * 5, 3)
    for im in imgs:
        model.encode_images(im, torch.tensor([(1, 8, 8)]))
        assert model.image_cache.bytes <= 3 * per_image
    assert len(model.image_cache) == 3
    calls = count_vision_rows(model)
    model.encode_images(imgs[-1], torch.tensor([(1, 8, 8)]))  # most recent: hit
    assert calls == []
    model.encode_images(imgs[0], torch.tensor([(1, 8, 8)]))  # evicted first: miss
    assert calls == [64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_fingerprint_separates_near_duplicates(dtype):
    cache = ImageEmbeddingCache(1 << 20, "m")
    x = torch.rand(64, 1176).to(dtype)
    y = x.clone()
    y[10, 5] += 1 / 255  # one uint8 step in one value
    z = x.flip(0)  # same rows, other order
    fp = cache._device_fingerprints(torch.cat([x, y, z, x]), [64, 64, 64, 64], chunk=50)
    assert fp.dtype == torch.int64 and fp.shape == (4, 2)
    assert not torch.equal(fp[0], fp[1]) and not torch.equal(fp[0], fp[2]) and torch.equal(fp[0], fp[3])
    # exact integer arithmetic: the same image gets the same key alone, elsewhere in a batch, in other chunks
    alone = cache._device_fingerprints(x, [64])
    other = cache._device_fingerprints(torch.cat([torch.rand(30, 1176).to(dtype), x]), [30, 64], chunk=7)
    assert torch.equal(alone[0], fp[0]) and torch.equal(other[1], fp[0])


def test_bad_budget(model):
    with pytest.raises(ValueError, match="max_bytes"):
        model.enable_image_cache(max_bytes=0)


def test_what_the_cache_returns_is_not_what_it_keeps(model):
    """Writing into the features encode_images returned must not change what a later hit returns."""
    pv, g = _images([(1, 4, 4)], 3)[0], torch.tensor([(1, 4, 4)])
    model.enable_image_cache(max_bytes=1 << 20)
    first = model.encode_images(pv, g)
    ref = first.clone()
    with torch.inference_mode():  # (the features are inference tensors)
        first.mul_(0)
    assert torch.equal(model.encode_images(pv, g), ref)


def test_moving_the_model_empties_the_cache(model):
    """Features made in one dtype (or on one device) are not hits after .to(): they would be of the old kind."""
    pv, g = _images([(1, 4, 4)], 4)[0], torch.tensor([(1, 4, 4)])
    model.enable_image_cache(max_bytes=1 << 20)
    model.encode_images(pv, g)
    assert len(model.image_cache) == 1
    model.to(torch.float64)
    assert len(model.image_cache) == 0
    assert model.encode_images(pv, g).dtype == torch.float64
