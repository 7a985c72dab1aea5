"""CUDA-only checks of the vision tower in bf16 (skipped without a GPU).

bf16 tolerances: ours vs the reference in bf16, both compared to the fp32 reference; ours must be no worse than
the reference's own bf16 error (times a small factor), and the varlen CUDA backends must agree with SDPA.
"""
import pytest
import torch

from qwen_batched import QwenBatchedVL
from qwen_batched.attention import HAS_TORCH_VARLEN
from tests.helpers import rel_err, saved_reference_pair

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GRIDS = [(1, 28, 28), (1, 20, 14), (2, 8, 12), (1, 2, 2), (1, 32, 32)]


def _inputs():
    n = sum(t * h * w for t, h, w in GRIDS)
    pv = torch.randn(n, 1176, generator=torch.Generator().manual_seed(0)).cuda()
    return pv, torch.tensor(GRIDS).cuda()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    hf32, hf16 = saved_reference_pair(d, "cuda")
    ours = QwenBatchedVL.from_pretrained(d, device="cuda", dtype=torch.bfloat16)
    return hf32, hf16, ours, d


@cuda
def test_bf16_vision_matches_reference(models):
    hf32, hf16, ours, _ = models
    pv, g = _inputs()
    with torch.no_grad():
        ref32 = hf32.model.visual(pv, grid_thw=g).pooler_output
        ref16 = hf16.model.visual(pv, grid_thw=g).pooler_output
    out = ours.encode_images(pv, g)
    e_ref, e_ours, e_pair = rel_err(ref16, ref32), rel_err(out, ref32), rel_err(out, ref16)
    print(f"bf16 vision: ref16 vs fp32 {e_ref:.2e}, ours vs fp32 {e_ours:.2e}, ours vs ref16 {e_pair:.2e}")
    assert e_ours <= max(2 * e_ref, 2e-2)
    assert e_pair <= 3e-2


@cuda
@pytest.mark.skipif(not HAS_TORCH_VARLEN, reason="torch.nn.attention.varlen missing")
def test_varlen_backend_matches_sdpa(models):
    *_, d = models
    pv, g = _inputs()
    a = QwenBatchedVL.from_pretrained(d, device="cuda", dtype=torch.bfloat16, attn_backend="torch_varlen")
    b = QwenBatchedVL.from_pretrained(d, device="cuda", dtype=torch.bfloat16, attn_backend="sdpa")
    assert rel_err(a.encode_images(pv, g), b.encode_images(pv, g)) <= 2e-2


@cuda
def test_fp32_cuda_parity(models):
    hf32, _, _, d = models
    pv, g = _inputs()
    ours = QwenBatchedVL.from_pretrained(d, device="cuda", dtype=torch.float32)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the reference's Conv3d patch embedding would run in TF32 (cuDNN default)
    try:
        with torch.no_grad():
            ref = hf32.model.visual(pv, grid_thw=g).pooler_output
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    err = rel_err(ours.encode_images(pv, g), ref)
    print(f"fp32 CUDA vision vs reference: max rel {err:.2e}")
    assert err <= 1e-5


@cuda
def test_bf16_aligned_mlp_matches_reference():
    """A tower whose MLP width is not a multiple of 8 (like the 3B/7B towers' 3420) runs padded to 64-unit
    multiples in bf16 on CUDA, with the reference's accuracy."""
    import dataclasses

    from qwen_batched.config import tiny_config
    from tests.helpers import make_hf_model

    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, intermediate_size=100)).validate()
    hf32 = make_hf_model(cfg).cuda()
    ours = QwenBatchedVL.from_hf(hf32, dtype=torch.bfloat16)
    assert ours.visual.blocks[0].mlp.down_proj.weight.shape[1] == 128
    pv, g = _inputs()
    with torch.no_grad():
        ref32 = hf32.model.visual(pv, grid_thw=g).pooler_output
        ref16 = hf32.to(torch.bfloat16).model.visual(pv.bfloat16(), grid_thw=g).pooler_output
    e_ref, e_ours = rel_err(ref16, ref32), rel_err(ours.encode_images(pv, g), ref32)
    print(f"aligned bf16 vision: ref16 vs fp32 {e_ref:.2e}, ours vs fp32 {e_ours:.2e}")
    assert e_ours <= 2 * e_ref + 1e-3
