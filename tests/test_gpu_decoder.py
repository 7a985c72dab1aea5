"""CUDA-only decoder checks in bf16 (skipped without a GPU): packed varlen prefill vs padded SDPA, the fp32
and bf16 references, and the compiled decode step."""
import pytest
import torch

from qwen_batched import QwenBatchedVL
from qwen_batched.attention import HAS_FLASH_ATTN, HAS_TORCH_VARLEN
from tests.helpers import build_batch, model_inputs, rel_err, saved_reference_pair

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    hf32, hf16 = saved_reference_pair(d, "cuda")
    b = build_batch(QwenBatchedVL.from_pretrained(d).cfg)
    b = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
    return d, hf32, hf16, b


def _ref_logits(hf, b):
    with torch.no_grad():
        return hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                  pixel_values=b["pixel_values"].to(hf.dtype), image_grid_thw=b["image_grid_thw"],
                  mm_token_type_ids=b["mm_token_type_ids"]).logits


@cuda
@pytest.mark.skipif(not (HAS_FLASH_ATTN or HAS_TORCH_VARLEN), reason="no varlen kernel")
def test_packed_prefill_matches_padded_sdpa_and_reference(setup):
    d, hf32, hf16, b = setup
    packed = QwenBatchedVL.from_pretrained(d, device="cuda", dtype=torch.bfloat16)  # auto: varlen kernels
    padded = QwenBatchedVL.from_pretrained(d, device="cuda", dtype=torch.bfloat16, attn_backend="sdpa")
    assert packed.backend in ("flash", "torch_varlen")
    inputs = dict(model_inputs(b), pixel_values=b["pixel_values"].bfloat16())
    a = packed.extract_features(**inputs, layers=[-1]).hidden_states[0]
    p = padded.extract_features(**inputs, layers=[-1]).hidden_states[0]
    valid = b["attention_mask"].bool()
    assert rel_err(a[valid], p[valid]) <= 2e-2
    logits = packed.lm_head(a)
    r32, r16 = _ref_logits(hf32, b), _ref_logits(hf16, b)
    e_ours, e_ref = rel_err(logits[valid], r32[valid]), rel_err(r16[valid], r32[valid])
    print(f"bf16 logits vs fp32 reference: ours {e_ours:.2e}, reference bf16 {e_ref:.2e}")
    assert e_ours <= max(1.5 * e_ref, 4e-3)


@cuda
def test_bf16_greedy_agrees_with_reference(setup):
    d, _, hf16, b = setup
    ours = QwenBatchedVL.from_pretrained(d, device="cuda", dtype=torch.bfloat16)
    out = ours.generate(**dict(model_inputs(b), pixel_values=b["pixel_values"].bfloat16()), max_new_tokens=16,
                        eos_token_id=[])
    hf16.generation_config.eos_token_id = None
    hf16.generation_config.pad_token_id = hf16.config.text_config.pad_token_id
    with torch.no_grad():
        ref = hf16.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            pixel_values=b["pixel_values"].bfloat16(), image_grid_thw=b["image_grid_thw"],
                            mm_token_type_ids=b["mm_token_type_ids"], max_new_tokens=16, min_new_tokens=16,
                            do_sample=False)[:, b["input_ids"].shape[1]:]
    agree = (out.sequences == ref).float().mean().item()
    print(f"bf16 greedy token agreement with the bf16 reference: {agree:.3f}")
    assert agree >= 0.9


@cuda
def test_compiled_decode_on_gpu_equals_eager(setup):
    d, *_ , b = setup
    ours = QwenBatchedVL.from_pretrained(d, device="cuda", dtype=torch.bfloat16)
    inputs = dict(model_inputs(b), pixel_values=b["pixel_values"].bfloat16())
    eager = ours.generate(**inputs, max_new_tokens=8, eos_token_id=[])
    compiled = ours.generate(**inputs, max_new_tokens=8, eos_token_id=[], compile=True)
    assert (compiled.sequences == eager.sequences).float().mean().item() >= 0.95


@cuda
def test_captured_decode_equals_eager(setup, monkeypatch):
    """On CUDA the eager decode step is replayed as one CUDA graph: the same kernels, so the same tokens (greedy and
    sampled), and the graph is kept for the next call of the same shape."""
    import warnings

    from qwen_batched import generation

    d, *_, b = setup
    ours = QwenBatchedVL.from_pretrained(d, device="cuda", dtype=torch.bfloat16)
    inputs = dict(model_inputs(b), pixel_values=b["pixel_values"].bfloat16())
    kw = [dict(max_new_tokens=12, eos_token_id=[]), dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture would warn and run eagerly
        graph = [ours.generate(**inputs, **k) for k in kw]
    assert ours.caches.decode[0][0] == "graph" and ours.caches.decode[2].graph is not None
    monkeypatch.setattr(generation, "CUDA_GRAPHS", False)
    eager = [ours.generate(**inputs, **k) for k in kw]
    for g, e in zip(graph, eager):
        assert torch.equal(g.sequences, e.sequences) and torch.equal(g.lengths, e.lengths)
