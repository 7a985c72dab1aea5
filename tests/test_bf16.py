"""bf16 on CPU: our deviation from the fp32 reference stays at the reference's own bf16 level."""
import pytest
import torch

from qwen_batched import QwenBatchedVL
from tests.helpers import build_batch, rel_err, saved_reference_pair


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    hf32, hf16 = saved_reference_pair(d)
    ours = QwenBatchedVL.from_pretrained(d, dtype=torch.bfloat16)
    return hf32, hf16, ours


def _ref(hf, b):
    with torch.no_grad():
        out = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                 pixel_values=b["pixel_values"].to(hf.dtype), image_grid_thw=b["image_grid_thw"],
                 mm_token_type_ids=b["mm_token_type_ids"], output_hidden_states=True)
    return out.hidden_states, out.logits


def test_bf16_hidden_states_and_logits(setup):
    hf32, hf16, ours = setup
    b = build_batch(ours.cfg)
    valid = b["attention_mask"].bool()
    h32, l32 = _ref(hf32, b)
    h16, l16 = _ref(hf16, b)
    feats = ours.extract_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                  pixel_values=b["pixel_values"].bfloat16(), image_grid_thw=b["image_grid_thw"])
    pairs = list(zip(feats.hidden_states, h16, h32)) + [(ours.lm_head(feats.hidden_states[-1]), l16, l32)]
    for i, (o, r16, r32) in enumerate(pairs):
        e_ours, e_ref = rel_err(o[valid], r32[valid]), rel_err(r16[valid], r32[valid])
        assert e_ours <= max(1.5 * e_ref, 4e-3), f"stage {i}: ours {e_ours:.2e} vs reference bf16 {e_ref:.2e}"
        assert rel_err(o[valid], r16[valid]) <= 2e-2, f"stage {i}"
