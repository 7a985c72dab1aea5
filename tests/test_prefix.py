"""Shared prefixes (fp32, CPU): grouping rows by token ids and image contents, prefill on top of a KV cache,
``share_prefix=True`` against ``share_prefix=False`` (hidden states, logits, tokens) and against transformers."""
from __future__ import annotations

import pytest
import torch

from qwen_batched import ModelInputs
from qwen_batched.generation import KVCache, prefill_on_cache
from qwen_batched.rope import rope_index
from qwen_batched.text import run_batch
from tests.helpers import count_vision_rows, pad_rows, rel_err

TOL = 1e-5
N_NEW = 6


def _img(side_h: int, side_w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, side_h, side_w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


A, B, C = _img(56, 56, 1), _img(56, 84, 2), _img(56, 56, 3)  # C: A's size (same ids), other content


def _clip(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (4, 3, 56, 56), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.fixture()
def vision_rows(models):
    m = models[1]
    calls = count_vision_rows(m)
    yield calls
    del m.visual.forward  # back to the class method


def _compare(m, x: ModelInputs, **kw):
    """Features and logits of ``x`` with and without sharing: assert fp32 equality; return the shared ones."""
    on = m.extract_features(x, share_prefix=True, **kw)
    off = m.extract_features(x, share_prefix=False, **kw)
    mask = x.attention_mask.bool()
    for a, b in zip(on.hidden_states, off.hidden_states):
        assert rel_err(a[mask], b[mask]) <= TOL
        assert not a[~mask].any() and not b[~mask].any()
    assert rel_err(m.lm_head(on.hidden_states[-1][mask]), m.lm_head(off.hidden_states[-1][mask])) <= TOL
    if off.vision_embeds is not None:
        assert rel_err(on.vision_embeds, off.vision_embeds) <= TOL
    return on


def _groups(m, x: ModelInputs):
    g = m._prefix_groups(m.validate(x))
    return None if g is None else g.group


# ------------------------------------------------------------------------------------------- grouping
def test_interleaved_rows_share_wherever_they_sit(models, vision_rows):
    """A's questions at rows 0, 2, 5; B's at 1, 4; a text-only row and C (A's size, other content) alone."""
    m = models[1]
    imgs = [[A], [B], [A], None, [B], [A], [C]]
    texts = ["What is it?", "Colour?", "Is there a dog in the image?", "Say hi.", "Count the cars.", "Where?", "Hm?"]
    x = m.processor.prepare(imgs, texts)
    assert _groups(m, x) == (0, 1, 0, -1, 1, 0, -1)
    vision_rows.clear()
    _compare(m, x)
    px = {id(A): 4 * 4, id(B): 4 * 6, id(C): 4 * 4}  # patch rows of each distinct image (56 px -> 4 patches)
    assert vision_rows[0] == sum(px.values())  # each distinct image through the vision tower once


def test_images_compared_by_content_not_identity(models, vision_rows):
    m = models[1]
    x = m.processor.prepare([[A], [A.clone()], [C], [C.clone()]], ["a?", "b?", "c?", "d?"])
    assert _groups(m, x) == (0, 0, 1, 1)  # C has A's token ids but other pixels
    vision_rows.clear()
    _compare(m, x)
    assert vision_rows[0] == 2 * 16  # the shared run (the unshared one follows)


def test_two_images_in_other_orders_share_nothing(models):
    m = models[1]
    x = m.processor.prepare([[A, B], [B, A]], ["first?", "second?"])
    assert _groups(m, x) == (-1, -1)
    # the longest prefix shared: two images in the same order beat one
    x = m.processor.prepare([[A, B], [A, B], [A, C], [A, C], [A]], ["1?", "2?", "3?", "4?", "5?"])
    g = m._prefix_groups(m.validate(x))
    assert g.group == (0, 0, 1, 1, -1)  # the A-only row shares less with either group than they do inside
    image_tokens = [int((x.input_ids[r, x.attention_mask[r].bool()][:g.prefix[r]] == m.cfg.image_token_id).sum())
                    for r in range(4)]
    assert image_tokens == [4 + 6, 4 + 6, 4 + 4, 4 + 4]  # both image blocks (4 and 6 tokens) in each prefix
    _compare(m, x)


def test_text_only_and_single_rows(models):
    m = models[1]
    x = m.processor.prepare(None, ["Say hi.", "Say hi.", "Say bye."])
    assert _groups(m, x) is None  # no images: nothing to share, the usual path
    _compare(m, x)
    x = m.processor.prepare([[A]], ["alone"])
    assert _groups(m, x) is None
    assert torch.equal(m.generate(x, share_prefix=True, max_new_tokens=N_NEW).sequences,
                       m.generate(x, share_prefix=False, max_new_tokens=N_NEW).sequences)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_sides(models, padding_side):
    m = models[1]
    x = m.processor.prepare([[A], [B], [A], [A]], ["short?", "a much longer question here?", "mid size?", "x"],
                            padding_side=padding_side)
    assert _groups(m, x) == (0, -1, 0, 0)
    _compare(m, x, layers=[0, 2, -1])
    _compare(m, x, layers=[1])  # one layer run: the cache of the shared pass holds one layer
    _compare(m, x, final_norm=False)
    on = m.generate(x, share_prefix=True, max_new_tokens=N_NEW, eos_token_id=[])
    off = m.generate(x, share_prefix=False, max_new_tokens=N_NEW, eos_token_id=[])
    assert torch.equal(on.sequences, off.sequences)


def test_hand_built_ids_and_prefix_boundaries(models):
    """Groups end after an image block's <|vision_end|>, never at a row's last token; any padding."""
    m = models[1]
    cfg = m.cfg
    g = torch.Generator().manual_seed(0)
    IMG, VS, VE = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    head = torch.randint(0, 256, (5,), generator=g).tolist()
    block = [VS] + [IMG] * 16 + [VE]
    rows = [head + block + [7, 8, 9], head + block + [7], head + block, [1, 2] + head + block + [3]]
    px = torch.randn(64, cfg.vision.patch_dim, generator=g)
    b = pad_rows(cfg, rows)
    x = ModelInputs(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=torch.cat([px] * 4),
                    image_grid_thw=torch.tensor([[1, 8, 8]] * 4))
    groups = m._prefix_groups(m.validate(x))
    # row 2 ends with the block: no token left after it; row 3 starts differently
    assert groups.group == (0, 0, -1, -1) and groups.prefix[:2] == (len(head) + 18,) * 2
    _compare(m, x)


def test_mask_with_holes_runs_unshared(models):
    m = models[1]
    x = m.processor.prepare([[A], [A], [A]], ["one more question?", "two?", "three?"])
    holed = ModelInputs(**{k: getattr(x, k) for k in x.keys()})
    holed.attention_mask = x.attention_mask.clone()
    holed.attention_mask[0, -3] = 0  # a masked token inside row 0's text
    assert _groups(m, x) == (0, 0, 0) and _groups(m, holed) is None
    on = m.extract_features(holed, share_prefix=True)
    off = m.extract_features(holed, share_prefix=False)
    assert all(torch.equal(a, b) for a, b in zip(on.hidden_states, off.hidden_states))


def test_videos_stay_in_the_suffix(models):
    m = models[1]
    vids = [_clip(5), _clip(6), _clip(5), _clip(5)]
    x = m.processor.prepare([[A], [A], None, None], ["what?", "when?", "video?", "again?"], videos=vids, fps=2.0)
    groups = m._prefix_groups(m.validate(x))
    assert groups.group == (0, 0, -1, -1)  # same video, no image before it: not shared
    ids = x.input_ids[0, x.attention_mask[0].bool()]
    assert groups.prefix[0] < int((ids == m.cfg.video_token_id).nonzero()[0])
    on = _compare(m, x)
    assert on.video_embeds is not None
    assert torch.equal(m.generate(x, share_prefix=True, max_new_tokens=N_NEW, eos_token_id=[]).sequences,
                       m.generate(x, share_prefix=False, max_new_tokens=N_NEW, eos_token_id=[]).sequences)


def test_sub_batches_split_groups(models):
    m = models[1]
    imgs = [[A], [B], [A], [A], [B], [A], None, [A]]
    texts = [f"question number {i}?" for i in range(8)]
    x = m.processor.prepare(imgs, texts)
    n = int(x.attention_mask.sum(1).max())
    on = _compare(m, x, max_batch_tokens=3 * n)  # A's five rows cannot all fit in one sub-batch
    full = m.extract_features(x, share_prefix=True)
    assert all(rel_err(a, b) <= TOL for a, b in zip(on.hidden_states, full.hidden_states))
    kw = dict(max_new_tokens=N_NEW, eos_token_id=[])
    ref = m.generate(x, share_prefix=False, **kw).sequences
    for budget in (3 * (n + N_NEW), 2 * (n + N_NEW), None):
        assert torch.equal(m.generate(x, share_prefix=True, max_batch_tokens=budget, **kw).sequences, ref)
    # sampled tokens depend on the row's seed only, however the rows are regrouped
    kw = dict(max_new_tokens=N_NEW, eos_token_id=[], temperature=1.0, seed=11)
    assert torch.equal(m.generate(x, share_prefix=True, max_batch_tokens=3 * (n + N_NEW), **kw).sequences,
                       m.generate(x, share_prefix=False, **kw).sequences)


def test_greedy_equals_transformers_per_sample(models):
    hf, m = models
    imgs, texts = [A, B, A, A], ["Is there a dog?", "What colour?", "Is there a cat?", "Where?"]
    out = m.generate(m.processor.prepare([[i] for i in imgs], texts), share_prefix=True, max_new_tokens=N_NEW,
                     eos_token_id=[])
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = m.cfg.pad_token_id
    for i in range(4):
        one = m.processor.prepare([[imgs[i]]], [texts[i]])
        with torch.no_grad():
            ref = hf.generate(**{k: getattr(one, k) for k in one.keys()}, max_new_tokens=N_NEW, do_sample=False)
        assert out.sequences[i].tolist() == ref[0, one.input_ids.shape[1]:].tolist(), f"row {i}"


def test_image_cache_keeps_embeddings_for_later_batches(models, vision_rows):
    m = models[1]
    m.enable_image_cache(1 << 20)
    try:
        first = m.processor.prepare([[A], [A], [B]], ["1?", "2?", "3?"])
        later = m.processor.prepare([[A], [B], [A]], ["4?", "5?", "6?"])
        vision_rows.clear()
        a = m.generate(first, share_prefix=True, max_new_tokens=N_NEW, eos_token_id=[])
        b = m.generate(later, share_prefix=True, max_new_tokens=N_NEW, eos_token_id=[])
        assert vision_rows == [16 + 24]  # the later batch hits the cache for both images
    finally:
        m.disable_image_cache()
    assert torch.equal(a.sequences, m.generate(first, share_prefix=False, max_new_tokens=N_NEW,
                                               eos_token_id=[]).sequences)
    assert torch.equal(b.sequences, m.generate(later, share_prefix=False, max_new_tokens=N_NEW,
                                               eos_token_id=[]).sequences)


def test_layer_zero_alone_with_shared_images(models):
    """layers=[0] (the embeddings) runs no layer: rows sharing an image give the unshared result, no shared pass."""
    m = models[1]
    x = m.processor.prepare([[A], [A], [B]], ["What is it?", "Colour?", "Where?"])
    assert _groups(m, x) == (0, 0, -1)
    _compare(m, x, layers=[0])
    _compare(m, x, layers=[0, -1])


def test_share_prefix_must_be_bool(models):
    m = models[1]
    x = m.processor.prepare([[A]], ["q"])
    with pytest.raises(TypeError, match="share_prefix"):
        m.generate(x, share_prefix=1)
    with pytest.raises(TypeError, match="share_prefix"):
        m.extract_features(x, share_prefix="yes")


# ------------------------------------------------------------------------------------------- the primitive
def test_prefill_on_cache_continues_a_prompt(models):
    """A prompt cut anywhere (here mid-text and mid-batch at different points per row): the first part prefilled
    into a cache, the rest on top with positions continuing (rope_index(start=)), equals one pass over all of it."""
    m = models[1]
    cfg, text = m.cfg, m.model
    x = m.validate(m.processor.prepare([[A], [B], None], ["Is there a dog?", "Colour of the sky?", "Say hi."],
                                       padding_side="right"))
    e = m._embed(x)
    rope = m.caches.rope(m.device)
    lengths = x.layout.lengths
    full_last, full = run_batch(text, e.embeds, e.position_ids, e.valid, rope=rope, keep=range(5))
    cut = [n - k for n, k in zip(lengths, (3, 7, 5))]
    L = max(lengths)
    cache = KVCache(cfg.text.num_hidden_layers, 3, cfg.text.num_key_value_heads, L + 4, cfg.text.head_dim,
                    m.device, m.dtype)
    cols = torch.arange(e.embeds.shape[1])
    head = cols[None] < torch.tensor(cut)[:, None]
    run_batch(text, e.embeds, e.position_ids, head, rope=rope, sink=cache.prompt_sink(head.sum(1).tolist()))
    # the rest, left-aligned, positions from rope_index over the new ids only (text: start = last position + 1)
    T = max(n - c for n, c in zip(lengths, cut))
    idx = torch.tensor([[min(c + j, n - 1) for j in range(T)] for n, c in zip(lengths, cut)])
    valid = torch.tensor([[j < n - c for j in range(T)] for n, c in zip(lengths, cut)])
    rows = torch.arange(3)[:, None]
    ids = torch.where(valid, x.input_ids[rows, idx], 0)
    start = e.position_ids[0, torch.arange(3), torch.tensor(cut) - 1] + 1
    pos, _ = rope_index(ids, valid.long(), image_token_id=cfg.image_token_id, start=start)
    assert torch.equal(pos.masked_fill(~valid, 0), e.position_ids[:, rows, idx].masked_fill(~valid, 0))
    last, states = prefill_on_cache(text, cache, e.embeds[rows, idx], pos, valid, rows=range(3),
                                    cached=torch.tensor(cut), rope=rope, kv_len=L, keep=range(5))
    assert rel_err(last, full_last) <= TOL
    for i in range(5):
        assert rel_err(states[i][valid], full[i][rows, idx][valid]) <= TOL
    # the same continuation from a cache whose rows sit elsewhere, read through an index
    perm = torch.tensor([2, 0, 3])
    moved = KVCache(cfg.text.num_hidden_layers, 4, cfg.text.num_key_value_heads, L, cfg.text.head_dim,
                    m.device, m.dtype)
    for dst, src in zip(moved.k + moved.v, cache.k + cache.v):
        for r in range(3):
            dst[perm[r], :, :cut[r]] = src[r, :, :cut[r]]
    moved_last, _ = prefill_on_cache(text, moved, e.embeds[rows, idx], pos, valid, rows=perm,
                                     cached=torch.tensor(cut), rope=rope, kv_len=L)
    assert rel_err(moved_last, full_last) <= TOL


def test_prefill_on_cache_rejects_bad_input(models):
    m = models[1]
    t = m.cfg.text
    cache = KVCache(t.num_hidden_layers, 2, t.num_key_value_heads, 8, t.head_dim, m.device, m.dtype)
    h = torch.zeros(2, 3, t.hidden_size)
    pos = torch.zeros(3, 2, 3, dtype=torch.long)
    valid = torch.ones(2, 3, dtype=torch.bool)
    kw = dict(rows=range(2), cached=torch.zeros(2, dtype=torch.long), rope=m.caches.rope(m.device))
    with pytest.raises(TypeError, match="cache"):
        prefill_on_cache(m.model, None, h, pos, valid, **kw)
    with pytest.raises(ValueError, match="valid"):
        prefill_on_cache(m.model, cache, h, pos, valid.long(), **kw)
    with pytest.raises(ValueError, match="position_ids"):
        prefill_on_cache(m.model, cache, h, pos[:, :1], valid, **kw)
    with pytest.raises(ValueError, match="rows"):
        prefill_on_cache(m.model, cache, h, pos, valid, **{**kw, "rows": range(1, 3 + 1)})
    with pytest.raises(ValueError, match="rows"):
        prefill_on_cache(m.model, cache, h, pos, valid, **{**kw, "rows": [0, 1]})
    with pytest.raises(ValueError, match="cached"):
        prefill_on_cache(m.model, cache, h, pos, valid, **{**kw, "cached": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(ValueError, match="kv_len"):
        prefill_on_cache(m.model, cache, h, pos, valid, kv_len=9, **kw)
    with pytest.raises(ValueError, match="lengths and starts"):
        prefill_on_cache(m.model, cache, h, pos, valid, lengths=[3, 3], **kw)
    with pytest.raises(ValueError, match="lengths and starts"):
        prefill_on_cache(m.model, cache, h, pos, valid, lengths=[3, 3, 3], starts=[0, 0, 0], **kw)
    small = KVCache(1, 2, t.num_key_value_heads, 8, t.head_dim, m.device, m.dtype)
    with pytest.raises(ValueError, match="layers"):
        prefill_on_cache(m.model, small, h, pos, valid, **kw)
    with pytest.raises(ValueError, match="no layers"):
        prefill_on_cache(m.model, KVCache(0, 2, t.num_key_value_heads, 8, t.head_dim, m.device, m.dtype), h, pos,
                         valid, depth=0, **kw)
    with pytest.raises(ValueError, match="starts \\+ lengths"):  # a run past the row would read the next row
        prefill_on_cache(m.model, cache, h, pos, valid, lengths=[3, 3], starts=[1, 0], **kw)
