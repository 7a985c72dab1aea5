"""Sub-batching under a token budget, OOM halving, and input validation at the public API."""
import pytest
import torch

import qwen_batched.api as api_mod
from qwen_batched import QwenBatchedVL
from qwen_batched.batching import plan_ranges
from tests.helpers import make_hf_model
from tests.helpers import build_batch, model_inputs


@pytest.fixture(scope="module")
def model():
    return QwenBatchedVL.from_hf(make_hf_model())


@pytest.fixture(scope="module")
def batch(model):
    b = build_batch(model.cfg)
    return model_inputs(b)


def test_plan_ranges():
    assert plan_ranges([5, 5, 5, 5], None) == [(0, 4)]
    assert plan_ranges([5, 5, 5, 5], 10) == [(0, 2), (2, 4)]
    assert plan_ranges([5, 5, 5, 5], 9) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert plan_ranges([2, 8, 3], 16) == [(0, 2), (2, 3)]
    assert plan_ranges([30, 2], 10) == [(0, 1), (1, 2)]  # a row over budget runs alone
    assert plan_ranges([3, 3, 3], 20, extra=7) == [(0, 2), (2, 3)]


def _count_forwards(monkeypatch, fail_above=None, fn="run_batch"):
    """Record (rows, columns) of every decoder pass; optionally fail passes of more than ``fail_above`` rows."""
    calls = []
    orig = getattr(api_mod, fn)

    def wrapped(first, h, *a, **k):
        calls.append(h.shape[:2])
        if fail_above is not None and h.shape[0] > fail_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return orig(first, h, *a, **k)
    monkeypatch.setattr(api_mod, fn, wrapped)
    return calls


def test_split_features_equal_one_pass(model, batch, monkeypatch):
    ref = model.extract_features(**batch)
    calls = _count_forwards(monkeypatch)
    L = batch["input_ids"].shape[1]
    out = model.extract_features(**batch, max_batch_tokens=1)  # every row over budget: one row per forward
    assert len(calls) == 3 and all(c[0] == 1 for c in calls)
    assert sum(c[1] for c in calls) < 3 * L  # shared pad columns were dropped
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.image_mask, ref.image_mask) and torch.equal(out.attention_mask, ref.attention_mask)
    torch.testing.assert_close(out.vision_embeds, ref.vision_embeds, rtol=1e-5, atol=1e-6)


def test_split_generate_equal_one_pass(model, batch, monkeypatch):
    ref = model.generate(**batch, max_new_tokens=8, eos_token_id=[])
    calls = _count_forwards(monkeypatch, fn="generate_tokens")
    out = model.generate(**batch, max_new_tokens=8, eos_token_id=[],
                         max_batch_tokens=2 * (batch["input_ids"].shape[1] + 8))
    assert [c[0] for c in calls] == [2, 1]
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.lengths, ref.lengths)


def test_oom_halves_and_retries(model, batch, monkeypatch):
    ref = model.extract_features(**batch, layers=[-1])
    calls = _count_forwards(monkeypatch, fail_above=1)
    out = model.extract_features(**batch, layers=[-1])
    assert [c[0] for c in calls] == [3, 1, 2, 1, 1]  # whole batch, then halves, then the 2-row half split
    torch.testing.assert_close(out.hidden_states[0], ref.hidden_states[0], rtol=1e-5, atol=1e-5)


def test_oom_on_a_single_row_raises(model, batch, monkeypatch):
    _count_forwards(monkeypatch, fail_above=0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        model.extract_features(**batch, layers=[-1])


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "100"])
def test_bad_budget(model, batch, bad):
    with pytest.raises(ValueError, match="max_batch_tokens"):
        model.extract_features(**batch, max_batch_tokens=bad)


def test_devices_that_differ(model, batch):
    b = dict(batch, attention_mask=batch["attention_mask"].to("meta"))
    with pytest.raises(ValueError, match="different devices"):
        model.extract_features(**b)


def test_prompt_longer_than_context(model, batch):
    limit = model.cfg.text.max_position_embeddings
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model.generate(**batch, max_new_tokens=limit)
    ids = torch.zeros(1, limit + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="input length"):
        model.extract_features(input_ids=ids)


def test_nan_pixels(model, batch):
    pv = batch["pixel_values"].clone()
    pv[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        model.extract_features(**dict(batch, pixel_values=pv))
