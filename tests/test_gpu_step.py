"""CUDA checks of model.feature_step (skipped without a GPU): equal to extract_features with the Triton
preprocessing, no host sync in a warm step (torch.cuda.set_sync_debug_mode("error")), CUDA graphs of the eager and
the compiled step equal to eager and never overwriting a returned result, bf16 against extract_features."""
import pytest
import torch

from qwen_batched import QwenBatchedVL
from tests.helpers import make_hf_model, rel_err
from tests.test_step import TEXTS, _frames, assert_real_tokens_equal

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SHAPE = (2, 2, 70, 100)  # resized to 56x112


@pytest.fixture(scope="module")
def model():
    return QwenBatchedVL.from_hf(make_hf_model().to("cuda"))


def test_step_equals_extract_features(model):
    frames = _frames(*SHAPE, device="cuda")
    out = model.feature_step(*SHAPE, max_text_tokens=20)(frames, TEXTS[:2])
    assert_real_tokens_equal(out, model.extract_features(images=frames, texts=TEXTS[:2], layers=[-1]))


@pytest.mark.parametrize("mode", [dict(cuda_graph=False), dict(), dict(compile=True)])
def test_warm_step_never_syncs(model, mode):
    step = model.feature_step(*SHAPE, texts="pick", max_text_tokens=20, **mode)
    frames = _frames(*SHAPE, device="cuda")
    step(frames)  # warm-up (and capture)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step(frames)
        step({"a": frames[:, 0], "b": frames[:, 1]})
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert_real_tokens_equal(out, model.extract_features(images=frames, texts=["pick"] * 2, layers=[-1]), tol=1e-4)


@pytest.mark.parametrize("mode", [dict(), dict(compile=True)])
def test_graph_step_equals_eager_and_keeps_results(model, mode):
    """On CUDA the step is a CUDA graph by default."""
    eager = model.feature_step(*SHAPE, texts="pick", max_text_tokens=20, cuda_graph=False)
    assert not eager.cuda_graph
    graph = model.feature_step(*SHAPE, texts="pick", max_text_tokens=20, **mode)
    assert graph.cuda_graph
    f1, f2 = _frames(*SHAPE, device="cuda"), _frames(*SHAPE, seed=5, device="cuda")
    a1 = graph(f1)
    a2 = graph(f2, ["go left", "a longer instruction"])  # a replay with new inputs must not overwrite a1
    b1, b2 = eager(f1), eager(f2, ["go left", "a longer instruction"])
    assert len(graph._graphs) == 1
    for a, b in ((a1, b1), (a2, b2)):
        assert rel_err(a.hidden_states[0], b.hidden_states[0]) <= 1e-4
        assert rel_err(a.vision_embeds, b.vision_embeds) <= 1e-4
        assert torch.equal(a.attention_mask, b.attention_mask)


def test_bf16_graph_step_matches_extract_features():
    m = QwenBatchedVL.from_hf(make_hf_model().to(device="cuda", dtype=torch.bfloat16))
    frames = _frames(*SHAPE, device="cuda")
    step = m.feature_step(*SHAPE, texts="pick", max_text_tokens=20, compile=True)
    step(frames)
    ref = m.extract_features(images=frames, texts=["pick"] * 2, layers=[-1])
    assert_real_tokens_equal(step(frames), ref, tol=2e-2)
