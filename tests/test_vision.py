"""Vision tower parity against transformers' Qwen2.5-VL (fp32, CPU) and batch invariance."""
import pytest
import torch

from qwen_batched.attention import VarlenPlan, varlen_attention
from qwen_batched.geometry import build_geometry, window_layout
from tests.helpers import rel_err

TOL = 1e-5

CASES = {
    "392x392 (windows of 4 and 2)": [(1, 28, 28)],
    "280x200 -> 280x196 (unequal windows)": [(1, 20, 14)],
    "28x28 single": [(1, 2, 2)],
    "video t=2": [(2, 8, 12)],
    "mixed sizes": [(1, 28, 28), (1, 20, 14), (1, 2, 2), (2, 8, 12), (1, 16, 16), (1, 16, 14)],
}


def _mixed32():
    g = torch.Generator().manual_seed(3)
    grids = []
    for _ in range(32):
        t = 2 if torch.rand(1, generator=g) < 0.15 else 1
        h = 2 * int(torch.randint(1, 15, (1,), generator=g))
        w = 2 * int(torch.randint(1, 15, (1,), generator=g))
        grids.append((t, h, w))
    return grids


CASES["32-image mixed batch"] = _mixed32()




def _inputs(grids, seed=0):
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 1176, generator=torch.Generator().manual_seed(seed)), torch.tensor(grids)


@pytest.mark.parametrize("name", list(CASES))
def test_vision_parity(models, name):
    hf, ours = models
    grids = CASES[name]
    pv, g = _inputs(grids)
    with torch.no_grad():
        ref = hf.model.visual(pv, grid_thw=g)
    merged = ours.encode_images(pv, g)
    assert merged.shape == ref.pooler_output.shape
    assert rel_err(merged, ref.pooler_output) <= TOL
    # HF's get_image_features gives the same tensor, split per image
    with torch.no_grad():
        feats = hf.model.get_image_features(pixel_values=pv, image_grid_thw=g).pooler_output
    assert rel_err(merged, torch.cat(list(feats))) <= TOL
    # pre-merger output: HF's last_hidden_state is in window order; bring it to patch order
    pre = ours.encode_images(pv, g, return_pre_merger=True)
    geo = build_geometry(tuple(grids), ours.cfg.vision, torch.device("cpu"), "sdpa")
    D = pre.shape[1]
    ref_pre = ref.last_hidden_state.view(-1, 4, D)[geo.reverse_index].view(-1, D)
    assert rel_err(pre, ref_pre) <= TOL


def test_batch_invariance(models):
    _, ours = models
    grids = CASES["32-image mixed batch"]
    pv, g = _inputs(grids, seed=1)
    batch = ours.encode_images(pv, g)
    rows, toks = 0, 0
    for grid in grids:
        n = grid[0] * grid[1] * grid[2]
        alone = ours.encode_images(pv[rows:rows + n], torch.tensor([grid]))
        assert rel_err(alone, batch[toks:toks + n // 4]) <= TOL
        rows, toks = rows + n, toks + n // 4
    assert toks == batch.shape[0]


def test_images_do_not_attend_to_each_other(models):
    _, ours = models
    grids = [(1, 8, 8), (1, 8, 8)]
    pv, g = _inputs(grids)
    a = ours.encode_images(pv, g)
    pv2 = pv.clone()
    pv2[64:] = torch.randn(64, 1176)  # change the second image only
    b = ours.encode_images(pv2, g)
    assert torch.equal(a[:16], b[:16])
    assert not torch.allclose(a[16:], b[16:])


@pytest.mark.parametrize("grids", [[(1, 28, 28)], [(1, 20, 14), (2, 8, 12), (1, 2, 2)], CASES["32-image mixed batch"]])
def test_window_index_matches_reference(grids):
    from transformers.vision_utils import get_vision_window_index

    ref_idx, ref_cu = get_vision_window_index(torch.tensor(grids), spatial_merge_size=2, window_size=112, patch_size=14)
    idx, sizes, _, _ = window_layout(torch.tensor(grids), 2, 4)
    assert torch.equal(idx, ref_idx)
    cu = torch.nn.functional.pad((sizes * 4).cumsum(0), (1, 0))
    assert torch.equal(cu.to(torch.int32), ref_cu)


def test_geometry_is_cached(models):
    _, ours = models
    pv, g = _inputs([(1, 4, 4), (1, 6, 8)])
    ours.encode_images(pv, g)
    cache = ours.caches
    n = len(cache._geometry)
    geo = cache.geometry(((1, 4, 4), (1, 6, 8)), torch.device("cpu"), "sdpa")
    ours.encode_images(pv, g)
    assert len(cache._geometry) == n
    assert cache.geometry(((1, 4, 4), (1, 6, 8)), torch.device("cpu"), "sdpa") is geo


@pytest.mark.parametrize("lengths", [[64] * 5, [64, 32, 64, 16, 48, 64], [7, 9, 8, 100, 90, 3, 1], [5]])
def test_sdpa_buckets_match_per_segment_attention(lengths):
    g = torch.Generator().manual_seed(0)
    N, H, D = sum(lengths), 3, 8
    q, k, v = (torch.randn(N, H, D, generator=g) for _ in range(3))
    plan = VarlenPlan.build(lengths, torch.device("cpu"), "sdpa")
    out = varlen_attention(q, k, v, plan, "sdpa")
    ref, s = [], 0
    for L in lengths:
        qs, ks, vs = (x[s:s + L].transpose(0, 1) for x in (q, k, v))
        att = torch.softmax(qs @ ks.transpose(-1, -2) / D**0.5, -1) @ vs
        ref.append(att.transpose(0, 1))
        s += L
    assert rel_err(out, torch.cat(ref)) <= 1e-6


def test_bad_inputs(models):
    _, ours = models
    pv, g = _inputs([(1, 4, 4)])
    with pytest.raises(ValueError, match="patch rows"):
        ours.encode_images(pv[:-4], g)
    with pytest.raises(ValueError, match=r"\(n_patches, 1176\)"):
        ours.encode_images(pv[:, :100], g)
    with pytest.raises(ValueError, match="multiples of"):
        ours.encode_images(torch.randn(15, 1176), torch.tensor([[1, 3, 5]]))
    with pytest.raises(TypeError, match="integer"):
        ours.encode_images(pv, g.float())
    with pytest.raises(ValueError, match=r"\(n_images >= 1, 3\)"):
        ours.encode_images(pv, g[:, :2])
    with pytest.raises(TypeError, match="pixel_values"):
        ours.encode_images(pv.numpy(), g)


def test_mlp_alignment_adds_exact_zeros(models):
    """align_mlp widens the MLPs with zero units (on CUDA in fp16/bf16, to 64-unit multiples): the tower's output
    is unchanged; moving the model (``_apply``) on the CPU trims them back to the config's width."""
    from qwen_batched.vision import VisionTransformer, align_mlp

    _, ours = models
    pv, g = _inputs([(1, 28, 28), (1, 20, 14)])
    ref = ours.encode_images(pv, g)
    before = {k: v.clone() for k, v in ours.visual.state_dict().items()}
    width = ours.cfg.vision.intermediate_size
    align_mlp(ours.visual, 96)  # 128 -> 192
    mlp = ours.visual.blocks[0].mlp
    assert mlp.gate_proj.weight.shape[0] == mlp.up_proj.bias.shape[0] == mlp.down_proj.weight.shape[1] == 192
    assert rel_err(ours.encode_images(pv, g), ref) <= 1e-6
    saved = ours.visual.state_dict()  # the config's width: loadable by any model of this config
    assert all(torch.equal(before[k], saved[k]) for k in before)
    fresh = VisionTransformer(ours.cfg.vision)
    fresh.load_state_dict(saved)
    align_mlp(fresh, 96)
    fresh.load_state_dict(before)  # and a checkpoint of the config's width loads into an aligned tower, zero-padded
    assert torch.equal(fresh.blocks[0].mlp.down_proj.weight, mlp.down_proj.weight)
    assert torch.equal(fresh.blocks[0].mlp.gate_proj.bias, mlp.gate_proj.bias)
    ours.float()  # on the CPU: the config's width again, the original values
    after = ours.visual.state_dict()
    assert mlp.gate_proj.weight.shape[0] == width
    assert all(torch.equal(before[k], after[k]) for k in before)
