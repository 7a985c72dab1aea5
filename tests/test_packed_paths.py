"""The CUDA varlen code paths (packed causal prefill, varlen vision attention, GQA, both kernels' calling
conventions) run on the CPU against a plain-torch stand-in for the kernels, and must equal the SDPA paths.

The kernels themselves only run on a GPU (tests/test_gpu_*.py); this checks everything around them: packing,
cu_seqlens, causal flags, head layouts, unpacking, the KV-cache sink.
"""
import pytest
import torch
import torch.nn.functional as F

import qwen_batched.attention as attention
from qwen_batched import QwenBatchedVL
from tests.helpers import build_batch, make_hf_model, model_inputs, rel_err


def _segments(q, k, v, cu, causal, scale):
    """Per-segment SDPA (GQA by repeating KV heads): the kernels' contract."""
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale).transpose(0, 1)
    return out


def fake_flash(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and isinstance(max_q, int)
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
    return _segments(q, k, v, cu_q, causal, softmax_scale)


def fake_torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    assert window_size in ((-1, -1), (-1, 0)) and isinstance(max_q, int)
    assert enable_gqa == (q.shape[1] != k.shape[1])
    return _segments(q, k, v, cu_q, window_size == (-1, 0), scale)


@pytest.fixture(scope="module")
def setup():
    hf = make_hf_model()
    return QwenBatchedVL.from_hf(hf), model_inputs(build_batch(QwenBatchedVL.from_hf(hf).cfg))


@pytest.mark.parametrize("backend, hole", [("flash", False), ("torch_varlen", False), ("flash", True)])
def test_packed_paths_equal_sdpa(setup, backend, hole, monkeypatch):
    model, batch = setup
    if hole:  # a masked token inside a row's span: packing counts real tokens, not the span
        mask = batch["attention_mask"].clone()
        mask[0, -5] = 0
        batch = dict(batch, attention_mask=mask)
    ref = model.extract_features(**batch)
    ref_gen = model.generate(**batch, max_new_tokens=8, eos_token_id=[])
    monkeypatch.setattr(attention, "_flash_varlen", fake_flash)
    monkeypatch.setattr(attention, "_torch_varlen", fake_torch_varlen)
    monkeypatch.setattr(attention, "_VARLEN_KW", {"scale", "window_size", "enable_gqa"})
    monkeypatch.setattr(model, "backend", backend)
    model.caches.clear()
    try:
        out = model.extract_features(**batch)
        gen = model.generate(**batch, max_new_tokens=8, eos_token_id=[])
    finally:
        model.caches.clear()
    valid = batch["attention_mask"].bool()
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert rel_err(a[valid], b[valid]) <= 1e-5
        assert bool((a[~valid] == 0).all())
    assert rel_err(out.vision_embeds, ref.vision_embeds) <= 1e-5
    assert torch.equal(gen.sequences, ref_gen.sequences)


@pytest.mark.parametrize("causal_kw", ["is_causal", "window_size"])
def test_torch_varlen_without_enable_gqa(monkeypatch, causal_kw):
    """torch 2.10's varlen_attn takes is_causal instead of window_size, and no enable_gqa; a later one takes
    window_size, still without enable_gqa: the KV heads are repeated for the GQA in both."""
    seen = {}

    def old_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, **kw):
        assert set(kw) == {causal_kw}
        causal = kw[causal_kw] is True or kw[causal_kw] == (-1, 0)
        seen.update(causal=causal, heads=k.shape[1])
        return _segments(q, k, v, cu_q, causal, scale)

    monkeypatch.setattr(attention, "_torch_varlen", old_varlen)
    monkeypatch.setattr(attention, "_VARLEN_KW", {"scale", causal_kw})
    q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    plan = attention.VarlenPlan.build([6, 4], torch.device("cpu"), "torch_varlen")
    out = attention.varlen_attention(q, k, v, plan, "torch_varlen", causal=True)
    assert seen == {"causal": True, "heads": 4}  # KV heads repeated for the GQA
    torch.testing.assert_close(out, _segments(q, k, v, plan.cu_seqlens, True, None))
    with pytest.raises(ValueError, match="bidirectional"):
        attention.varlen_attention(q, k, v, attention.VarlenPlan.build([6, 4], torch.device("cpu"), "sdpa"), "sdpa",
                                   causal=True)


def _varlen_without_reads(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """The varlen contract as one masked SDPA over all tokens (block-diagonal, causal on request): no host reads."""
    T = q.shape[0]
    pos = torch.arange(T, device=q.device)
    seg = torch.searchsorted(cu_q[1:].long(), pos, right=True)
    mask = seg[:, None] == seg[None, :]
    if window_size == (-1, 0):
        mask &= pos[None, :] <= pos[:, None]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                       scale=scale)
    return o.transpose(0, 1)


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "torch_varlen"])
def test_prefill_indexes_real_tokens_without_reads(setup, backend, share, monkeypatch):
    """Rows without masked holes: the prefill (padded or packed) and the KV-cache fill index the real tokens from
    the host layout: no nonzero / boolean-mask reads (on a GPU each is a sync; the padded sink once made one per
    layer). What remains: validation, the stop checks and the outputs."""
    from tests.host_reads import count_host_reads

    model, batch = setup
    monkeypatch.setattr(attention, "_torch_varlen", _varlen_without_reads)
    monkeypatch.setattr(attention, "_VARLEN_KW", {"scale", "window_size", "enable_gqa"})
    monkeypatch.setattr(model, "backend", backend)
    if share:  # the batch twice: every image row shares its prefix with its copy
        batch = {k: torch.cat([v, v]) for k, v in batch.items()}
    ref = model.generate(**batch, max_new_tokens=4, eos_token_id=[], share_prefix=False)
    model.caches.clear()
    try:
        with count_host_reads() as c:
            feats = model.extract_features(**batch, share_prefix=share)
            out = model.generate(**batch, max_new_tokens=4, eos_token_id=[], share_prefix=share)
    finally:
        model.caches.clear()
    assert not [r for r in c.calls if r in ("nonzero", "__getitem__[bool mask]", "__setitem__[bool mask]")], c.calls
    assert torch.equal(out.sequences, ref.sequences) and len(feats.hidden_states) == model.cfg.text.num_hidden_layers + 1


@pytest.mark.parametrize("message, falls_back", [("CUDA out of memory. Tried to allocate 2 GiB", False),
                                                 ("no kernel image is available for this GPU", True)])
def test_packed_prefill_failure(setup, monkeypatch, message, falls_back):
    """A kernel the GPU cannot run falls back to padded SDPA with a warning; running out of memory is raised (the
    caller halves the batch: padded SDPA would need more memory, not less)."""
    from qwen_batched import ModelInputs
    from qwen_batched.text import run_batch

    model, batch = setup
    x = model._embed(model.validate(ModelInputs(**batch)))
    kw = dict(rope=model.caches.rope(model.device), keep=[model.cfg.text.num_hidden_layers])
    _, ref = run_batch(model.model, x.embeds, x.position_ids, x.valid, backend="sdpa", **kw)

    def failing(*args, **kw):
        raise RuntimeError(message)

    monkeypatch.setattr(attention, "_flash_varlen", failing)
    if falls_back:
        with pytest.warns(UserWarning, match="padded SDPA"):
            _, out = run_batch(model.model, x.embeds, x.position_ids, x.valid, backend="flash", **kw)
        assert all(torch.equal(out[i], ref[i]) for i in ref)
    else:
        with pytest.raises(RuntimeError, match="out of memory"):
            run_batch(model.model, x.embeds, x.position_ids, x.valid, backend="flash", **kw)
