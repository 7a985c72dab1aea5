"""Decoder parity against transformers' Qwen2.5-VL (fp32, CPU): M-RoPE positions, hidden states, logits."""

import pytest
import torch

from qwen_batched import QwenBatchedVL
from qwen_batched.rope import mrope_cos_sin, rope_index, section_index, inv_freq
from tests.helpers import build_batch, model_inputs, pad_rows, rel_err

TOL = 1e-5


@pytest.fixture(scope="module")
def reference(models, batch):
    hf, _ = models
    with torch.no_grad():
        return hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                  mm_token_type_ids=batch["mm_token_type_ids"], output_hidden_states=True)


# ------------------------------------------------------------------------------------------- positions
def _hf_rope(hf, ids, mask, image_grid_thw, video_grid_thw=None, second_per_grid_ts=None):
    cfg = hf.config
    tt = (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()
    return hf.model.get_rope_index(ids, tt, image_grid_thw, video_grid_thw, second_per_grid_ts=second_per_grid_ts,
                                   attention_mask=mask)


@pytest.mark.parametrize("side", ["left", "right"])
def test_rope_index_matches_reference(models, side):
    hf, m = models
    b = build_batch(m.cfg, padding_side=side)
    ref_pos, ref_delta = _hf_rope(hf, b["input_ids"], b["attention_mask"], b["image_grid_thw"])
    pos, delta = rope_index(b["input_ids"], b["attention_mask"], b["image_grid_thw"],
                            image_token_id=m.cfg.image_token_id, spatial_merge_size=2)
    assert torch.equal(pos, ref_pos)
    assert torch.equal(delta, ref_delta)
    assert delta.flatten().tolist()[0] == 0 and delta.flatten().tolist()[2] < 0  # 196 tokens span 14 positions


@pytest.mark.parametrize("spg", [None, [0.7, 1.3]])
def test_rope_index_videos_and_adjacent_items(models, spg):
    """Videos (temporal scaling by tokens_per_second * second_per_grid, truncated), images right after videos."""
    hf, m = models
    c = m.cfg
    VS, VE, IMG, VID = c.vision_start_token_id, c.vision_end_token_id, c.image_token_id, c.video_token_id
    rows = [[1, VS] + [VID] * (3 * 2 * 3) + [VE, 7, VS] + [IMG] * 6 + [VE],
            [4, 5, VS] + [IMG] * 4 + [VE, VS] + [VID] * (2 * 4 * 2) + [VE, 9, 9, 9],
            [8] * 5]
    b = pad_rows(c, rows)
    grids_img = torch.tensor([[1, 4, 6], [1, 4, 4]])
    grids_vid = torch.tensor([[3, 4, 6], [2, 8, 4]])
    spg_t = None if spg is None else torch.tensor(spg)
    ref_pos, ref_delta = _hf_rope(hf, b["input_ids"], b["attention_mask"], grids_img, grids_vid, spg_t)
    pos, delta = rope_index(b["input_ids"], b["attention_mask"], grids_img, image_token_id=IMG,
                            video_grid_thw=grids_vid, video_token_id=VID, second_per_grid_ts=spg_t,
                            tokens_per_second=c.vision.tokens_per_second, spatial_merge_size=2)
    assert torch.equal(pos, ref_pos)
    assert torch.equal(delta, ref_delta)


def test_mrope_cos_sin_matches_reference(models, batch):
    hf, m = models
    pos, _ = rope_index(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                        image_token_id=m.cfg.image_token_id)
    x = torch.zeros(1, dtype=torch.bfloat16)
    ref_cos, ref_sin = hf.model.language_model.rotary_emb(x, pos)
    t = m.cfg.text
    cos, sin = mrope_cos_sin(pos, inv_freq(t.head_dim, t.rope_theta), section_index(t.mrope_section), torch.bfloat16)
    assert cos.dtype == torch.bfloat16 and torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


# ------------------------------------------------------------------------------------------- hidden states
def test_hidden_states_and_logits_match_reference(models, batch, reference):
    _, m = models
    out = m.extract_features(**model_inputs(batch))
    valid = batch["attention_mask"].bool()
    assert out.layers == tuple(range(m.cfg.text.num_hidden_layers + 1))
    assert len(out.hidden_states) == len(reference.hidden_states)
    errs = [rel_err(ours[valid], ref[valid]) for ours, ref in zip(out.hidden_states, reference.hidden_states)]
    assert max(errs) < TOL, errs
    logits = m.lm_head(out.hidden_states[-1])
    assert rel_err(logits[valid], reference.logits[valid]) < TOL
    # pads are zeroed; image mask and vision embeddings as the reference scatters them
    assert all(bool((h[~valid] == 0).all()) for h in out.hidden_states)
    assert torch.equal(out.image_mask, batch["input_ids"] == m.cfg.image_token_id)
    assert out.vision_embeds.shape == (int(out.image_mask.sum()), m.cfg.text.hidden_size)
    assert rel_err(out.hidden_states[0][out.image_mask], out.vision_embeds) == 0.0


def test_rows_alone_equal_batch(models, batch):
    """Each sample alone (no padding) gives the hidden states of its row in the padded batch."""
    _, m = models
    full = m.extract_features(**model_inputs(batch))
    valid = batch["attention_mask"].bool()
    for i, (row, grid, px) in enumerate(zip(batch["rows"], batch["grids"], batch["pixels"])):
        kw = dict(pixel_values=px, image_grid_thw=grid) if len(grid) else {}
        alone = m.extract_features(input_ids=torch.tensor([row]), **kw)
        for a, f in zip(alone.hidden_states, full.hidden_states):
            assert rel_err(a[0], f[i][valid[i]]) < TOL


def test_right_padding_equals_left_padding(models, batch):
    _, m = models
    right = build_batch(m.cfg, padding_side="right")
    a = m.extract_features(**model_inputs(batch), layers=[-1])
    b = m.extract_features(**model_inputs(right), layers=[-1])
    va, vb = batch["attention_mask"].bool(), right["attention_mask"].bool()
    assert rel_err(b.hidden_states[0][vb], a.hidden_states[0][va]) < TOL


def test_layer_selection_and_early_stop(models, batch, reference):
    _, m = models
    n = m.cfg.text.num_hidden_layers
    calls = []
    hooks = [layer.register_forward_hook(lambda mod, i, o, k=k: calls.append(k)) for k, layer in enumerate(m.model.layers)]
    try:
        out = m.extract_features(**model_inputs(batch), layers=[2, 0, -4])
    finally:
        for h in hooks:
            h.remove()
    assert out.layers == (2, 0, n + 1 - 4)
    assert calls == [0, 1]  # layers past the deepest requested state are not run
    valid = batch["attention_mask"].bool()
    for idx, h in zip(out.layers, out.hidden_states):
        assert rel_err(h[valid], reference.hidden_states[idx][valid]) < TOL


def test_final_norm_false_returns_pre_norm(models, batch, reference):
    _, m = models
    out = m.extract_features(**model_inputs(batch), layers=-1, final_norm=False)
    valid = batch["attention_mask"].bool()
    pre = out.hidden_states[0][valid]
    assert rel_err(pre, reference.hidden_states[-1][valid]) > 1e-2  # really before the norm
    assert rel_err(m.model.norm(pre), reference.hidden_states[-1][valid]) < TOL


def test_text_only_batch_matches_unpadded_reference(models):
    """A left-padded text-only batch: each row equals the reference run on that row alone."""
    hf, m = models
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 17, 4)]
    b = pad_rows(m.cfg, rows)
    out = m.extract_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"], layers=[-1])
    for i, r in enumerate(rows):
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([r]), output_hidden_states=True).hidden_states[-1][0]
        assert rel_err(out.hidden_states[0][i][b["attention_mask"][i].bool()], ref) < TOL


# ------------------------------------------------------------------------------------------- input checks
def test_image_token_count_mismatch_raises_before_vision(models, batch, monkeypatch):
    _, m = models
    monkeypatch.setattr(m, "encode_images", lambda *a, **k: pytest.fail("vision tower ran"))
    ids = batch["input_ids"].clone()
    ids[1, -1] = m.cfg.image_token_id  # one image token too many
    n_feat = int(batch["image_grid_thw"].prod(-1).sum()) // 4
    with pytest.raises(ValueError, match=rf"{n_feat + 1} image tokens.*{n_feat} image features"):
        m.extract_features(**{**model_inputs(batch), "input_ids": ids})
    with pytest.raises(ValueError, match=rf"{n_feat + 1} image tokens.*{n_feat} image features"):
        m.generate(**{**model_inputs(batch), "input_ids": ids}, max_new_tokens=2)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(layers=[5]), ValueError, "layers index 5"),
    (dict(layers=[-6]), ValueError, "layers index -6"),
    (dict(layers=[1.0]), TypeError, "layers must hold ints"),
    (dict(layers=[]), ValueError, "at least one"),
    (dict(layers="all"), TypeError, "layers must be"),
    (dict(final_norm=1), TypeError, "final_norm"),
    (dict(input_ids=None), ValueError, "input_ids is required"),
    (dict(input_ids=[[1, 2]]), TypeError, "input_ids must be a torch.Tensor"),
    (dict(input_ids=torch.ones(2, 3)), TypeError, "integer tensor"),
    (dict(input_ids=torch.ones(3, dtype=torch.long)), ValueError, r"\(batch, length\)"),
    (dict(input_ids=torch.full((1, 3), 10_000)), ValueError, "outside the vocabulary"),
    (dict(attention_mask=torch.ones(1, 2, dtype=torch.long)), ValueError, "attention_mask shape"),
    (dict(attention_mask=torch.tensor([[0, 0, 0]])), ValueError, "without any real token"),
    (dict(attention_mask=torch.tensor([[2, 1, 1]])), ValueError, "only 0 and 1"),
    (dict(pixel_values=torch.zeros(4, 1176)), ValueError, "together"),
    (dict(texts=["hi"], input_ids=torch.ones(1, 3, dtype=torch.long)), ValueError, "not both"),
])
def test_bad_inputs_raise(models, kwargs, err, match):
    _, m = models
    base = dict(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(err, match=match):
        m.extract_features(**{**base, **kwargs})


def test_texts_without_processor_raise(models):
    _, m = models
    m2 = QwenBatchedVL.from_hf(models[0])
    m2.processor = None
    with pytest.raises(ValueError, match="processor"):
        m2.extract_features(texts=["a cat"])
    with pytest.raises(ValueError, match="processor"):
        m2.generate(texts=["a cat"], max_new_tokens=2)


def test_image_tokens_without_pixels_raise(models, batch):
    _, m = models
    with pytest.raises(ValueError, match="no pixel_values"):
        m.extract_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    grid = batch["image_grid_thw"].clone()
    with pytest.raises(ValueError, match="patch rows"):
        m.extract_features(**{**model_inputs(batch), "pixel_values": batch["pixel_values"][:-4], "image_grid_thw": grid})
