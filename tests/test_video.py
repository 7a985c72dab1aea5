"""Videos end to end against transformers (fp32, CPU): prepare() against Qwen2_5_VLProcessor, hidden states, logits
and greedy generation of a mixed batch (video only / image + videos / text only), sub-batching, and input errors."""
from __future__ import annotations

import math

import pytest
import torch

from qwen_batched import generation
from qwen_batched.processor import BatchedImageProcessor
from qwen_batched.prompts import chat_messages
from qwen_batched.tokenizer import load_tokenizer
from tests.helpers import rel_err
from tests.test_prompts import _ids, tokenizer_dir  # noqa: F401  (tokenizer_dir is a fixture)

TOL = 1e-5
N_NEW = 8


def _noise(*shape, seed):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# sample 0: one 4-frame clip; sample 1: an image, then an odd 3-frame clip and a 6-frame clip; sample 2: text only.
IMAGES = [None, [_noise(3, 56, 56, seed=1)], None]
VIDEOS = [_noise(4, 3, 56, 84, seed=2), [_noise(3, 3, 84, 56, seed=3), _noise(6, 3, 56, 56, seed=4)], None]
TEXTS = ["What happens in this video?", "Compare the picture with the two clips.", "Say hi."]
FPS = [2.0, 3.0, 1.0]  # second_per_grid 1, 2/3 (a fractional temporal step), 2
GRIDS = [[2, 4, 6], [2, 6, 4], [3, 4, 4]]


def _hf_kwargs(x) -> dict:
    return {k: getattr(x, k) for k in x.keys()}  # mm_token_type_ids included: HF needs it for 3-D positions


def _our_kwargs(x) -> dict:
    return {k: v for k, v in _hf_kwargs(x).items() if k != "mm_token_type_ids"}


def hf_generate(hf, kw: dict, n: int = N_NEW) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference greedy continuation: (B, n) new tokens and the (n, B, V) logits each one was picked from."""
    cfg = hf.config.text_config
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = cfg.pad_token_id
    with torch.no_grad():
        out = hf.generate(**kw, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, kw["input_ids"].shape[1]:], torch.stack(out.logits)


@pytest.fixture(scope="module")
def inputs(models):
    return models[1].processor.prepare(IMAGES, TEXTS, videos=VIDEOS, fps=FPS)


@pytest.fixture(scope="module")
def reference(models, inputs):
    with torch.no_grad():
        return models[0](**_hf_kwargs(inputs), output_hidden_states=True)


@pytest.fixture(scope="module")
def features(models, inputs):
    return models[1].extract_features(**_our_kwargs(inputs))


# ------------------------------------------------------------------------------------------- batch layout
def test_prepare_layout(models, inputs):
    c = models[1].cfg
    x = inputs
    assert x.video_grid_thw.tolist() == GRIDS and x.image_grid_thw.tolist() == [[1, 4, 4]]
    assert x.videos_per_sample == (1, 2, 0) and x.images_per_sample == (0, 1, 0)
    assert x.second_per_grid_ts.dtype == torch.float32
    assert x.second_per_grid_ts.equal(torch.tensor([2 / f for f in FPS], dtype=torch.float32))
    assert x.pixel_values_videos.shape == (sum(math.prod(g) for g in GRIDS), c.vision.patch_dim)
    ids, mask = x.input_ids, x.attention_mask.bool()
    assert not mask[2, 0] and mask[:, -1].all()  # left padded, the text-only row shortest
    vid, img = ids == c.video_token_id, ids == c.image_token_id
    assert x.mm_token_type_ids.equal(img.long() + 2 * vid.long())
    assert vid.sum(1).tolist() == [12, 12 + 12, 0] and img.sum(1).tolist() == [0, 4, 0]
    row = ids[1].tolist()  # images before videos, each block <|vision_start|> tokens <|vision_end|>
    first_img, first_vid = row.index(c.image_token_id), row.index(c.video_token_id)
    assert first_img < first_vid
    assert row[first_vid - 1] == c.vision_start_token_id and row[first_vid + 12] == c.vision_end_token_id
    # pixels are the processor's video path: one clip list, sample-major
    flat = [VIDEOS[0]] + VIDEOS[1]
    direct = models[1].processor.preprocess_videos(flat)
    assert direct.pixel_values_videos.equal(x.pixel_values_videos) and direct.video_grid_thw.equal(x.video_grid_thw)


# ------------------------------------------------------------------------------------------- parity
def test_hidden_states_and_logits_match_reference(models, inputs, reference, features):
    _, m = models
    out = features
    valid = inputs.attention_mask.bool()
    assert len(out.hidden_states) == len(reference.hidden_states)
    errs = [rel_err(a[valid], b[valid]) for a, b in zip(out.hidden_states, reference.hidden_states)]
    assert max(errs) < TOL, errs
    logits = m.lm_head(out.hidden_states[-1])
    assert rel_err(logits[valid], reference.logits[valid]) < TOL
    ids = inputs.input_ids
    assert out.video_mask.dtype == torch.bool and torch.equal(out.video_mask, ids == m.cfg.video_token_id)
    assert torch.equal(out.image_mask, ids == m.cfg.image_token_id)
    assert out.video_embeds.shape == (int(out.video_mask.sum()), m.cfg.text.hidden_size)
    assert rel_err(out.hidden_states[0][out.video_mask], out.video_embeds) == 0.0
    assert rel_err(out.hidden_states[0][out.image_mask], out.vision_embeds) == 0.0


def test_video_features_match_reference_vision_tower(models, inputs, features):
    hf, _ = models
    with torch.no_grad():
        ref = torch.cat(hf.model.get_video_features(inputs.pixel_values_videos, inputs.video_grid_thw).pooler_output)
    assert rel_err(features.video_embeds, ref) < TOL


@pytest.mark.parametrize("chat", [True, False])
def test_greedy_matches_reference_generate(models, chat, monkeypatch):
    """Raw prompts end on the video block, whose temporal positions run past the last token's."""
    hf, m = models
    texts = TEXTS if chat else ["", "", "hi"]
    x = m.processor.prepare(IMAGES, texts, videos=VIDEOS, fps=FPS, chat_template=chat)
    if not chat:  # row 1 ends on the 6-frame clip: temporal positions s, s+4, s+8; its last token sits at s+2
        pos, _ = hf.model.get_rope_index(x.input_ids, x.mm_token_type_ids, x.image_grid_thw, x.video_grid_thw,
                                         second_per_grid_ts=x.second_per_grid_ts, attention_mask=x.attention_mask)
        assert pos[:, 1].max() == pos[:, 1, -1].max() + 6
    steps = []
    orig = generation.sample
    monkeypatch.setattr(generation, "sample", lambda logits, *a: steps.append(logits.clone()) or orig(logits, *a))
    ours = m.generate(**_our_kwargs(x), max_new_tokens=N_NEW, eos_token_id=[])
    ref_seqs, ref_logits = hf_generate(hf, _hf_kwargs(x))
    assert ours.sequences.tolist() == ref_seqs.tolist()
    assert rel_err(torch.stack(steps), ref_logits) < TOL  # prefill and every decode step (positions, cache)


def test_videos_go_through_processor(models, inputs, features):
    _, m = models
    f = m.extract_features(images=IMAGES, texts=TEXTS, videos=VIDEOS, fps=FPS, layers=[-1])
    assert torch.equal(f.hidden_states[0], features.hidden_states[-1])
    a = m.generate(images=IMAGES, texts=TEXTS, videos=VIDEOS, fps=FPS, max_new_tokens=4, eos_token_id=[])
    b = m.generate(**_our_kwargs(inputs), max_new_tokens=4, eos_token_id=[])
    assert torch.equal(a.sequences, b.sequences)
    # default fps 2.0 -> second_per_grid 1 for every video
    x = m.processor.prepare(IMAGES, TEXTS, videos=VIDEOS)
    assert x.second_per_grid_ts.tolist() == [1.0, 1.0, 1.0]
    g = m.extract_features(images=IMAGES, texts=TEXTS, videos=VIDEOS, layers=[-1]).hidden_states[0]
    assert torch.equal(g, m.extract_features(**_our_kwargs(x), layers=[-1]).hidden_states[0])


def test_split_equals_one_pass(models, inputs, features):
    _, m = models
    out = m.extract_features(**_our_kwargs(inputs), max_batch_tokens=1)  # one row per forward
    for a, b in zip(out.hidden_states, features.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.video_mask, features.video_mask)
    torch.testing.assert_close(out.video_embeds, features.video_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.vision_embeds, features.vision_embeds, rtol=1e-5, atol=1e-6)
    ref = m.generate(**_our_kwargs(inputs), max_new_tokens=N_NEW, eos_token_id=[])
    L = inputs.input_ids.shape[1]
    for budget in (1, 2 * (L + N_NEW)):  # [1, 1, 1] rows and [2, 1]
        got = m.generate(**_our_kwargs(inputs), max_new_tokens=N_NEW, eos_token_id=[], max_batch_tokens=budget)
        assert torch.equal(got.sequences, ref.sequences)


def test_image_cache_and_image_only_batch(models, inputs, features):
    _, m = models
    m.enable_image_cache()
    try:  # images through the cache, videos through the tower: a second vision call
        out = m.extract_features(**_our_kwargs(inputs))
    finally:
        m.disable_image_cache()
    for a, b in zip(out.hidden_states, features.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    x = m.processor.prepare(IMAGES, TEXTS)  # no videos: no video outputs
    f = m.extract_features(**_our_kwargs(x), layers=[-1])
    assert x.pixel_values_videos is None and x.second_per_grid_ts is None and x.videos_per_sample == (0, 0, 0)
    assert f.video_embeds is None and not f.video_mask.any()


def test_no_second_per_grid_ts_is_one_second(models, inputs):
    """As the reference: without second_per_grid_ts, temporal steps are tokens_per_second * 1."""
    hf, m = models
    kw = dict(_hf_kwargs(inputs), second_per_grid_ts=None)
    with torch.no_grad():
        ref = hf(**kw).logits
    ours = m.extract_features(**{k: v for k, v in kw.items() if k != "mm_token_type_ids"}, layers=[-1])
    valid = inputs.attention_mask.bool()
    assert rel_err(m.lm_head(ours.hidden_states[0])[valid], ref[valid]) < TOL


# ------------------------------------------------------------------------------------------- prepare vs HF
class _GridOnlyVideoProcessor:
    """Stands in for transformers' torchvision-only Qwen2VLVideoProcessor: grids from the reference
    smart_resize and grid_t rule, metadata as the reference builds it; pixels are zeros (not compared)."""

    merge_size, temporal_patch_size, patch_size = 2, 2, 14

    def __call__(self, videos, video_metadata=None, **kwargs):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
        from transformers.video_utils import make_batched_metadata, make_batched_videos

        videos = make_batched_videos(videos)
        grids = []
        for v in videos:  # (T, H, W, C) arrays
            h, w = smart_resize(v.shape[1], v.shape[2], 28, 3136, 12845056)
            grids.append([-(-v.shape[0] // 2), h // 14, w // 14])
        return {"pixel_values_videos": torch.zeros(sum(math.prod(g) for g in grids), 1176),
                "video_grid_thw": torch.tensor(grids),
                "video_metadata": make_batched_metadata(videos, video_metadata)}


@pytest.fixture(scope="module")
def hf_processor(tokenizer_dir):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    from qwen_batched.config import default_chat_template

    class Processor(transformers.Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if arg is None or name == "video_processor":
                return None
            return super().check_argument_for_proper_class(name, arg)

    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"),
                                               pad_token="<|endoftext|>", padding_side="left")
    return Processor(image_processor=transformers.Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056),
                     tokenizer=tok, video_processor=_GridOnlyVideoProcessor(), chat_template=default_chat_template())


@pytest.mark.parametrize("chat", [True, False])
def test_prepare_matches_hf_processor(tokenizer_dir, hf_processor, chat):  # noqa: F811
    tok = load_tokenizer(tokenizer_dir)
    ours = BatchedImageProcessor(tokenizer=tok, **_ids(tok))
    texts = ["Describe the image in detail.", "What is in these pictures?", "hello world"]
    got = ours.prepare(IMAGES, texts, videos=VIDEOS, fps=FPS, chat_template=chat)
    prompts = []
    for imgs, vids, text in zip(IMAGES, VIDEOS, texts):
        n_img = len(imgs or [])
        n_vid = 0 if vids is None else len(vids) if isinstance(vids, list) else 1
        if chat:  # the content list spelled out: images, then videos, then the text
            content = [{"type": "image"}] * n_img + [{"type": "video"}] * n_vid + [{"type": "text", "text": text}]
            assert chat_messages(text, n_img, None, n_vid) == [{"role": "user", "content": content}]
            prompts.append(hf_processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                            add_generation_prompt=True))
        else:
            prompts.append("<|vision_start|><|image_pad|><|vision_end|>" * n_img
                           + "<|vision_start|><|video_pad|><|vision_end|>" * n_vid + text)
    flat_imgs = [x.permute(1, 2, 0).numpy() for s in IMAGES for x in (s or [])]
    clips = [VIDEOS[0]] + VIDEOS[1]
    meta = [{"total_num_frames": c.shape[0], "fps": f, "frames_indices": list(range(c.shape[0]))}
            for c, f in zip(clips, FPS)]
    ref = hf_processor(images=flat_imgs, videos=[c.permute(0, 2, 3, 1).numpy() for c in clips],
                       video_metadata=meta, text=prompts, padding=True, return_tensors="pt")
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "video_grid_thw",
              "second_per_grid_ts"):
        assert getattr(got, k).equal(ref[k]), k
    assert (got.pixel_values - ref["pixel_values"]).abs().max() <= 1e-5  # 56x56: no resize


# ------------------------------------------------------------------------------------------- errors
def _with(inputs, **kw) -> dict:
    return {**_our_kwargs(inputs), **kw}


def test_errors_video_inputs(models, inputs):
    _, m = models
    c = m.cfg
    with pytest.raises(ValueError, match="video tokens but no pixel_values_videos/video_grid_thw"):
        m.extract_features(**_with(inputs, pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None))
    with pytest.raises(ValueError, match="pixel_values_videos and video_grid_thw must be given together"):
        m.extract_features(**_with(inputs, video_grid_thw=None))
    with pytest.raises(ValueError, match="pixel_values_videos has 144 patch rows but video_grid_thw describes"):
        m.extract_features(**_with(inputs, video_grid_thw=torch.tensor([[2, 4, 6], [2, 6, 4], [2, 4, 4]])))
    pv = inputs.pixel_values_videos
    with pytest.raises(ValueError, match="holds 36 video tokens but video_grid_thw gives 40 video features"):
        m.extract_features(**_with(inputs, pixel_values_videos=torch.cat([pv, pv[:16]]),
                                   video_grid_thw=torch.tensor(GRIDS + [[1, 4, 4]]),
                                   second_per_grid_ts=torch.ones(4)))
    with pytest.raises(ValueError, match=r"second_per_grid_ts must have shape \(n_videos,\) = \(3,\)"):
        m.extract_features(**_with(inputs, second_per_grid_ts=torch.ones(2)))
    with pytest.raises(ValueError, match="second_per_grid_ts must be finite and >= 0"):
        m.extract_features(**_with(inputs, second_per_grid_ts=torch.tensor([1.0, float("nan"), 1.0])))
    with pytest.raises(ValueError, match="second_per_grid_ts was given without videos"):
        m.extract_features(input_ids=torch.tensor([[1, 2, 3]]), second_per_grid_ts=torch.ones(1))
    with pytest.raises(ValueError, match="pixel_values_videos holds NaN"):
        bad = pv.clone().index_fill_(0, torch.tensor([5]), float("nan"))
        m.extract_features(**_with(inputs, pixel_values_videos=bad))
    with pytest.raises(ValueError, match=r"pixel_values_videos must have shape \(n_patches, 1176\)"):
        m.extract_features(**_with(inputs, pixel_values_videos=pv[:, :10]))
    # a video whose tokens do not sit in one row
    VS, VE, VID = c.vision_start_token_id, c.vision_end_token_id, c.video_token_id
    ids = torch.tensor([[5, VS] + [VID] * 6 + [VE], [VS] + [VID] * 6 + [VE, 5]])
    with pytest.raises(ValueError, match="row 0 of input_ids holds 6 video tokens, which is not a whole number"):
        m.extract_features(input_ids=ids, pixel_values_videos=torch.zeros(48, 1176),
                           video_grid_thw=torch.tensor([[3, 4, 4]]))


def test_errors_api_and_prepare(models, inputs):
    _, m = models
    with pytest.raises(ValueError, match="pass either images=/texts=/videos= or input_ids"):
        m.extract_features(videos=VIDEOS, texts=TEXTS, input_ids=inputs.input_ids)
    with pytest.raises(ValueError, match="fps= applies to videos= only"):
        m.generate(images=IMAGES, texts=TEXTS, fps=2.0)
    with pytest.raises(ValueError, match="fps= applies to videos= only"):
        m.extract_features(**_our_kwargs(inputs), fps=2.0)
    p = m.processor
    with pytest.raises(ValueError, match="texts has 3 prompts but videos has 2 samples"):
        p.prepare(IMAGES, TEXTS, videos=VIDEOS[:2])
    with pytest.raises(ValueError, match=r"videos\[0\]: expected a \(T, C, H, W\) tensor"):
        p.prepare(None, "a", videos=[_noise(3, 56, 56, seed=0)])
    with pytest.raises(ValueError, match=r"videos\[0\]\[1\]: empty clip"):
        p.prepare(None, "a", videos=[[VIDEOS[0], []]])
    with pytest.raises(ValueError, match=r"texts\[0\]: the prompt has 1 <\|video_pad\|> placeholders but the sample "
                                         r"has 0 videos"):
        p.prepare(None, "look <|video_pad|>")
    with pytest.raises(ValueError, match="fps has 2 values but there are 3 videos"):
        p.prepare(IMAGES, TEXTS, videos=VIDEOS, fps=[1.0, 2.0])
    for bad in (0, -1.0, float("inf"), "2"):
        with pytest.raises(ValueError, match="fps must be a positive finite number"):
            p.prepare(IMAGES, TEXTS, videos=VIDEOS, fps=bad)
    with pytest.raises(TypeError, match="videos must be None, a"):
        p.prepare(None, "a", videos="clip.mp4")
