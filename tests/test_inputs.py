"""``ModelInputs`` as the one batch type: positional == keyword tensors, row selection, one validation pass and
the number of device reads it costs."""
import pytest
import torch

from qwen_batched import ModelInputs, QwenBatchedVL
from tests.helpers import build_batch, make_hf_model, model_inputs
from tests.host_reads import count_host_reads


@pytest.fixture(scope="module")
def model():
    return QwenBatchedVL.from_hf(make_hf_model())


@pytest.fixture(scope="module")
def batch(model):
    return model_inputs(build_batch(model.cfg))


FRAMES = torch.randint(0, 256, (3, 2, 3, 56, 84), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
TEXTS = ["pick", "place the cube", "stop"]


def test_model_inputs_equal_keyword_tensors(model, batch):
    kw = model.extract_features(**batch, layers=[0, -1])
    pos = model.extract_features(ModelInputs(**batch), layers=[0, -1])
    for a, b in zip(pos.hidden_states, kw.hidden_states):
        assert torch.equal(a, b)
    prepared = model.processor.prepare(FRAMES, TEXTS)
    via_processor = model.generate(prepared, max_new_tokens=6, eos_token_id=[])
    via_keywords = model.generate(input_ids=prepared.input_ids, attention_mask=prepared.attention_mask,
                                  pixel_values=prepared.pixel_values, image_grid_thw=prepared.image_grid_thw,
                                  max_new_tokens=6, eos_token_id=[])
    via_images = model.generate(images=FRAMES, texts=TEXTS, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(via_processor.sequences, via_keywords.sequences)
    assert torch.equal(via_processor.sequences, via_images.sequences)


def test_model_inputs_and_keywords_together_is_an_error(model, batch):
    with pytest.raises(ValueError, match="not both"):
        model.extract_features(ModelInputs(**batch), input_ids=batch["input_ids"])
    with pytest.raises(TypeError, match="ModelInputs"):
        model.extract_features(batch)
    with pytest.raises(ValueError, match="rescale= applies"):
        model.extract_features(**batch, rescale=False)


@pytest.mark.parametrize("rows", [[0], [1], [2], [1, 2], [2, 0], [0, 1, 2], [2, 1, 0]])
def test_select_rows_equals_the_rows_prepared_alone(model, rows):
    imgs = [[FRAMES[0, 0]], [FRAMES[1, 0], FRAMES[1, 1, :, :28, :28]], []]
    texts = ["a", "bb", "ccc"]
    full = model.processor.prepare(imgs, texts)
    part = full.select_rows(rows)
    ref = model.processor.prepare([imgs[r] for r in rows], [texts[r] for r in rows])
    for name in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        a, b = getattr(part, name), getattr(ref, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert part.images_per_sample == ref.images_per_sample
    assert part.layout.image_grids == ref.layout.image_grids and part.layout.first == ref.layout.first
    # a validated batch selects the same rows (layout from the one device read instead of the processor)
    validated = model.validate(ModelInputs(**{k: getattr(full, k) for k in full.keys()}))
    again = validated.select_rows(rows)
    assert torch.equal(again.input_ids, ref.input_ids) and again.layout.lengths == ref.layout.lengths


def test_select_rows_bad_input(model):
    full = model.processor.prepare(FRAMES, TEXTS)
    with pytest.raises(ValueError, match="row indices"):
        full.select_rows([3])
    with pytest.raises(ValueError, match="row indices"):
        full.select_rows([])
    bare = ModelInputs(full.input_ids, full.attention_mask)
    with pytest.raises(ValueError, match="layout"):
        bare.select_rows([0])


def test_cached_call_reads_the_device_at_most_three_times(model, batch):
    model.extract_features(images=FRAMES, texts=TEXTS)  # warm: geometry built
    with count_host_reads() as c:
        model.extract_features(images=FRAMES, texts=TEXTS)
    assert c.count <= 3, c.calls
    model.extract_features(**batch)
    with count_host_reads() as c:
        model.extract_features(**batch)
    assert c.count <= 3, c.calls
    prepared = model.processor.prepare(FRAMES, TEXTS)
    with count_host_reads() as c:
        model.extract_features(prepared, max_batch_tokens=40)  # sub-batches read nothing more
    assert c.count <= 3, c.calls


def test_first_call_reads_the_device_a_few_times(batch):
    fresh = QwenBatchedVL.from_config("tiny")
    with count_host_reads() as c:
        fresh.extract_features(**batch)
    assert c.count <= 12, c.calls  # the geometry is built on the host from host grids


def test_a_layout_that_disagrees_with_the_grids_is_an_error(model):
    """A ModelInputs edited with dataclasses.replace keeps its host layout: grids that no longer match their tensor
    are a ValueError (the two images below give the same ids, so nothing else would notice)."""
    import dataclasses

    g = torch.Generator().manual_seed(1)
    wide, tall = (torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in ((56, 112), (112, 56)))
    a, b = model.processor.prepare([[wide]], ["what?"]), model.processor.prepare([[tall]], ["what?"])
    assert torch.equal(a.input_ids, b.input_ids) and a.layout.image_grids != b.layout.image_grids
    stale = dataclasses.replace(a, pixel_values=b.pixel_values, image_grid_thw=b.image_grid_thw)
    with pytest.raises(ValueError, match="image_grid_thw .* disagrees with the batch's layout"):
        model.extract_features(stale)
    model.extract_features(a)  # the layout of a batch built whole is right


def test_a_placeholder_id_at_a_pad_position_is_a_pad(model):
    """An image token id under attention_mask 0 is padding: the features equal the batch without it (the vision
    features go to the real placeholders only), and it is not in image_mask."""
    b = model_inputs(build_batch(model.cfg, padding_side="left"))
    ids, mask = b["input_ids"].clone(), b["attention_mask"]
    r, c = (mask == 0).nonzero()[0].tolist()
    ids[r, c] = model.cfg.image_token_id
    out = model.extract_features(**{**b, "input_ids": ids}, layers=[-1])
    ref = model.extract_features(**b, layers=[-1])
    assert torch.equal(out.hidden_states[0], ref.hidden_states[0])
    assert torch.equal(out.image_mask, ref.image_mask)


def test_a_transformers_processor_output_can_be_passed_whole(model):
    """transformers' processor returns mm_token_type_ids beside the tensors: accepted as a keyword (carried as
    ModelInputs carries it; the ids decide where the images go)."""
    full = {k: v for k, v in build_batch(model.cfg).items() if k not in ("rows", "grids", "pixels")}
    assert "mm_token_type_ids" in full
    ref = model.extract_features(**model_inputs(full), layers=[-1]).hidden_states[0]
    assert torch.equal(model.extract_features(**full, layers=[-1]).hidden_states[0], ref)
    assert torch.equal(model.generate(**full, max_new_tokens=2, eos_token_id=[]).sequences,
                       model.generate(**model_inputs(full), max_new_tokens=2, eos_token_id=[]).sequences)


def test_item_pixels_gathers_items_in_order():
    from qwen_batched.inputs import item_pixels

    grids = [(1, 2, 2), (1, 2, 4), (1, 4, 2)]
    pixels = torch.arange(20).view(20, 1)
    assert torch.equal(item_pixels(pixels, grids, [1, 2]), pixels[4:20])  # one run: a view
    assert item_pixels(pixels, grids, [1, 2]).data_ptr() == pixels[4:].data_ptr()
    assert torch.equal(item_pixels(pixels, grids, [2, 0]), torch.cat([pixels[12:20], pixels[:4]]))
    assert item_pixels(pixels, grids, []).shape == (0, 1)
    with pytest.raises(ValueError, match="items must index the 3 grids"):
        item_pixels(pixels, grids, [3])
