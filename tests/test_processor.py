"""Image preprocessing: parity with transformers' Qwen2-VL image processor and torchvision's resize, input forms,
videos, and argument errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qwen_batched import processor as processor_module
from qwen_batched.config import ModelConfig, tiny_config
from qwen_batched.processor import CLIP_MEAN, CLIP_STD, BatchedImageProcessor, load_processor, smart_resize
from qwen_batched.resize import axis_taps, resize_bicubic, resize_float

OFFICIAL_MAX = 12845056
NORM_STEP = 1 / 255 / min(CLIP_STD)  # one uint8 step in normalized units (~0.0150)


@pytest.fixture(scope="module")
def proc():
    return BatchedImageProcessor()


@pytest.fixture(scope="module")
def hf_pil():
    transformers = pytest.importorskip("transformers")
    return transformers.Qwen2VLImageProcessorPil


def hf_process(hf_cls, images_chw: list[torch.Tensor], min_pixels=3136, max_pixels=OFFICIAL_MAX):
    """HF's PIL image processor on HWC uint8 arrays of the same pixels."""
    ip = hf_cls(min_pixels=min_pixels, max_pixels=max_pixels)
    out = ip(images=[x.permute(1, 2, 0).numpy() for x in images_chw], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def noise(h, w, seed=0, n=None):
    g = torch.Generator().manual_seed(seed)
    shape = (3, h, w) if n is None else (n, 3, h, w)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def smooth(h, w, seed=0):
    """A smooth uint8 image (low frequencies only), where resamplers agree to about one step."""
    g = torch.Generator().manual_seed(seed)
    yy = torch.linspace(0, 1, h)[:, None]
    xx = torch.linspace(0, 1, w)[None, :]
    chans = []
    for _ in range(3):
        a, b, c, d = (torch.rand(4, generator=g) * 2 * math.pi).tolist()
        chans.append(127.5 + 60 * torch.sin(3 * yy + a) * torch.cos(2 * xx + b) + 50 * torch.sin(2 * xx + 4 * yy + c + d))
    return torch.stack(chans).round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------- smart_resize
@pytest.mark.parametrize("hw, max_pixels, want", [
    ((200, 300), OFFICIAL_MAX, (196, 308)),
    ((700, 1000), OFFICIAL_MAX, (700, 1008)),
    ((2000, 3000), 1003520, (812, 1204)),
    ((70, 98), OFFICIAL_MAX, (56, 112)),  # 70/28 = 2.5 rounds half to even -> 2
    ((28, 28), OFFICIAL_MAX, (56, 56)),  # below min_pixels: scaled up
])
def test_smart_resize_examples(hw, max_pixels, want):
    assert smart_resize(*hw, 28, 3136, max_pixels) == want


def test_smart_resize_matches_reference_on_a_sweep():
    ref = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl").smart_resize
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 5000, (400, 2), generator=g).tolist() + [[14, 2800], [42, 70], [98, 14], [5000, 5000]]
    for max_pixels in (1003520, OFFICIAL_MAX, 200704):
        for h, w in sizes:
            if max(h, w) / min(h, w) > 200:
                continue
            assert smart_resize(h, w, 28, 3136, max_pixels) == ref(h, w, 28, 3136, max_pixels), (h, w, max_pixels)


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)


# ------------------------------------------------------------------------------------------- resize
def _filter(x: np.float32, dt) -> np.float32:
    """PIL's antialias bicubic (a = -0.5) written from its definition."""
    a = dt(-0.5)
    x = dt(abs(x))
    if x < 1:
        return dt(dt(dt(dt(dt(a + 2) * x) - dt(a + 3)) * x) * x + 1)
    if x < 2:
        return dt(dt(dt(dt(a * x - 5 * a) * x) + 8 * a) * x - 4 * a)
    return dt(0)


def loop_weights(n_in: int, n_out: int, dt=np.float64) -> np.ndarray:
    """Dense (n_out, n_in) weights with plain loops (PIL's precompute_coeffs); ``dt`` is the working float
    type: float32 reproduces torch's own float32 weight arithmetic, float64 is exact math."""
    scale = dt(dt(n_in) / dt(n_out))
    support = dt(2 * scale) if scale >= 1 else dt(2)
    inv = dt(dt(1) / scale) if scale >= 1 else dt(1)
    m = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        center = dt(float(scale) * (i + 0.5))
        lo = max(int(float(dt(center - support)) + 0.5), 0)
        hi = min(int(float(dt(center + support)) + 0.5), n_in)
        ws = [_filter(dt((float(dt(dt(j) - center)) + 0.5) * float(inv)), dt) for j in range(lo, hi)]
        total = dt(0)
        for v in ws:
            total = dt(total + v)
        for j, v in zip(range(lo, hi), ws):
            m[i, j] = dt(v / total)
    return m


def loop_resize(x: torch.Tensor, size, dt=np.float64) -> torch.Tensor:
    """(..., H, W) float -> (..., h, w) float64 with the loop weights (width first, then height)."""
    wh = torch.from_numpy(loop_weights(x.shape[-2], size[0], dt))
    ww = torch.from_numpy(loop_weights(x.shape[-1], size[1], dt))
    return wh @ x.double() @ ww.T


RESIZE_CASES = [((200, 300), (196, 308)), ((37, 53), (56, 84)), ((1000, 700), (1008, 700)),
                ((333, 501), (112, 168)), ((28, 28), (56, 56)), ((90, 40), (28, 14))]


@pytest.mark.parametrize("src, dst", RESIZE_CASES)
def test_resize_float_matches_loop_reference_and_torchvision_kernel(src, dst):
    x = torch.rand(2, 3, *src, generator=torch.Generator().manual_seed(1))
    ours = resize_float(x, dst)
    assert ours.shape == (2, 3, *dst) and ours.dtype == torch.float32
    # the loops in torch's float32 arithmetic: what torchvision computes
    assert (ours.double() - loop_resize(x, dst, np.float32)).abs().max() <= 1e-5
    # F.interpolate(antialias=True) is the call torchvision's resize makes on float32
    tv = F.interpolate(x, size=dst, mode="bicubic", antialias=True, align_corners=False)
    assert (ours - tv).abs().max() <= 1e-5
    # exact-math weights differ from float32 ones by the float32 rounding of the pixel centers (<~1e-4)
    assert (ours.double() - loop_resize(x, dst, np.float64)).abs().max() <= 3e-4


@pytest.mark.parametrize("src, dst", RESIZE_CASES[:4])
def test_resize_uint8_rounds_like_torchvision(src, dst):
    x = noise(*src, seed=2, n=2)
    ours = resize_bicubic(x, dst)
    assert ours.dtype == torch.uint8
    ref = F.interpolate(x.float(), size=dst, mode="bicubic", antialias=True).clamp(0, 255).round().to(torch.uint8)
    diff = (ours.int() - ref.int()).abs()
    # float results agree to ~1e-6 of a step; only values within that of a .5 tie can round the other way
    assert diff.max() <= 1 and diff.float().mean() <= 1e-3


def test_resize_kernel_is_pil_bicubic_with_widened_support():
    xmin, w = axis_taps(40, 10)  # 4x downscale: support 2*4 = 8 input pixels each side
    assert w.shape[1] in (16, 17) and torch.allclose(w.sum(1), torch.ones(10), atol=1e-6)
    xmin, w = axis_taps(10, 40)  # upscale: support 2
    assert w.shape[1] in (4, 5)
    assert xmin.min() == 0 and (xmin + (w != 0).sum(1)).max() <= 10


def test_same_size_skips_resize():
    x = noise(56, 84)
    assert resize_float(x, (56, 84)).equal(x.float())


# ------------------------------------------------------------------------------------------- HF parity
@pytest.mark.parametrize("sizes", [[(56, 56)], [(224, 224), (56, 84)], [(112, 308), (28, 3136 // 28)]])
def test_no_resize_is_bit_exact_with_hf(proc, hf_pil, sizes):
    imgs = [noise(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    ref_pv, ref_thw = hf_process(hf_pil, imgs)
    out = proc.preprocess_images([imgs])  # one sample with all the images
    assert out.image_grid_thw.equal(ref_thw)
    assert out.pixel_values.shape == ref_pv.shape and out.pixel_values.dtype == torch.float32
    assert (out.pixel_values - ref_pv).abs().max() <= 1e-6


def test_transparent_pil_images_composite_on_white_like_hf(proc, hf_pil, tmp_path):
    """RGBA, LA and palette images with a transparency entry: transparency over white, as the reference reads them
    (a plain convert("RGB") would drop it); the answer job's image decoding too."""
    from PIL import Image

    from qwen_batched.jobs.io import decode_image

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (56, 84, 4), dtype=np.uint8)
    a[..., 3] = rng.integers(0, 256, (56, 84), dtype=np.uint8)  # partly transparent
    palette = Image.fromarray(a[..., :3]).convert("P")
    palette.info["transparency"] = 0
    for img in (Image.fromarray(a, "RGBA"), Image.fromarray(a[..., [0, 3]], "LA"), palette):
        ref = hf_pil(min_pixels=3136, max_pixels=OFFICIAL_MAX)(images=[img], return_tensors="pt")["pixel_values"]
        assert (proc.preprocess_images([img]).pixel_values - ref).abs().max() <= 1e-6, img.mode
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    decoded = decode_image(str(tmp_path / "a.png"))
    ref = hf_pil(min_pixels=3136, max_pixels=OFFICIAL_MAX)(images=[Image.open(tmp_path / "a.png")],
                                                         return_tensors="pt")["pixel_values"]
    assert (proc.preprocess_images([decoded]).pixel_values - ref).abs().max() <= 1e-6


def test_processor_config_of_transformers_5_is_read(tmp_path):
    """transformers 5 saves the image processor's settings inside processor_config.json (no
    preprocessor_config.json): its pixel bounds are the checkpoint's, not the published defaults."""
    import json

    size = {"longest_edge": 200704, "shortest_edge": 3136}
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {
        "size": size, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}}))
    proc = BatchedImageProcessor.from_pretrained(tmp_path)
    assert (proc.min_pixels, proc.max_pixels) == (3136, 200704)
    img = torch.randint(0, 256, (3, 1000, 1000), dtype=torch.uint8)
    assert proc.preprocess_images([img]).image_grid_thw.tolist() == [[1, 32, 32]]  # transformers' grid there
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 401408}))
    assert BatchedImageProcessor.from_pretrained(tmp_path).max_pixels == 401408  # the older file first


GRID_SIZES = [(200, 300), (700, 1000), (33, 47), (501, 333), (28, 28), (15, 900), (1080, 1920), (97, 13)]


def test_grids_and_smooth_pixels_match_hf(proc, hf_pil):
    """Identical grids for many sizes; after a resize HF's PIL path (uint8 coefficients, uint8 intermediate)
    differs from the torchvision semantics by about one uint8 step on smooth images."""
    imgs = [smooth(h, w, seed=i) for i, (h, w) in enumerate(GRID_SIZES)]
    ref_pv, ref_thw = hf_process(hf_pil, imgs)
    out = proc.preprocess_images([imgs])
    assert out.image_grid_thw.equal(ref_thw)
    diff = (out.pixel_values - ref_pv).abs()
    assert diff.max() <= 2 * NORM_STEP + 1e-4, diff.max()
    assert diff.mean() <= 0.1 * NORM_STEP, diff.mean()


@pytest.mark.parametrize("max_pixels, want_hw", [(1003520, (812, 1204)), (OFFICIAL_MAX, (1988, 2996))])
def test_large_image_grid_matches_hf(hf_pil, max_pixels, want_hw):
    img = smooth(2000, 3000, seed=3)
    proc = BatchedImageProcessor(max_pixels=max_pixels)
    ref_pv, ref_thw = hf_process(hf_pil, [img], max_pixels=max_pixels)
    out = proc.preprocess_images([img])
    assert out.image_grid_thw.tolist() == [[1, want_hw[0] // 14, want_hw[1] // 14]] == ref_thw.tolist()
    assert (out.pixel_values - ref_pv).abs().max() <= 2 * NORM_STEP + 1e-4


def test_per_call_pixel_bounds_match_hf(proc, hf_pil):
    img = smooth(300, 400, seed=4)
    ref_pv, ref_thw = hf_process(hf_pil, [img], min_pixels=200704, max_pixels=401408)
    out = proc.preprocess_images([img], min_pixels=200704, max_pixels=401408)
    assert out.image_grid_thw.equal(ref_thw) and out.image_grid_thw.tolist() == [[1, 28, 38]]  # 300x400 -> 392x532
    assert (out.pixel_values - ref_pv).abs().max() <= 2 * NORM_STEP + 1e-4


def test_resized_pixels_follow_torchvision_exactly(proc):
    """Our pipeline = torchvision resize (uint8 out) then the fused normalize, to float32 precision."""
    img = noise(200, 300, seed=5)
    out = proc.preprocess_images([img])
    tv = F.interpolate(img[None].float(), size=(196, 308), mode="bicubic", antialias=True).clamp(0, 255).round()
    mean = torch.tensor(CLIP_MEAN) * 255.0
    std = torch.tensor(CLIP_STD) * 255.0
    norm = (tv[0] - mean[:, None, None]) / std[:, None, None]  # (3, 196, 308)
    patches = norm.view(3, 7, 2, 14, 11, 2, 14).permute(1, 4, 2, 5, 0, 3, 6)[:, :, :, :, :, None]
    want = patches.expand(7, 11, 2, 2, 3, 2, 14, 14).reshape(-1, 1176)
    diff = (out.pixel_values - want).abs()
    assert (diff > 1e-6).float().mean() <= 1e-3 and diff.max() <= NORM_STEP + 1e-5


# ------------------------------------------------------------------------------------------- input forms
def test_input_forms_agree(proc):
    x = noise(56, 84, seed=6, n=4).view(2, 2, 3, 56, 84)  # (B=2, N=2, 3, H, W)
    ref = proc.preprocess_images(x)
    assert ref.images_per_sample == (2, 2) and ref.image_grid_thw.tolist() == [[1, 4, 6]] * 4
    nested = proc.preprocess_images([[x[0, 0], x[0, 1]], [x[1, 0], x[1, 1]]])
    stacked = proc.preprocess_images([x[0], x[1]])
    pil = pytest.importorskip("PIL.Image")
    as_pil = proc.preprocess_images([[pil.fromarray(im.permute(1, 2, 0).numpy()) for im in s] for s in x])
    as_np = proc.preprocess_images([[im.permute(1, 2, 0).numpy() for im in s] for s in x])
    for other in (nested, stacked, as_pil, as_np):
        assert other.pixel_values.equal(ref.pixel_values) and other.image_grid_thw.equal(ref.image_grid_thw)
        assert other.images_per_sample == (2, 2)
    flat = proc.preprocess_images(x.view(4, 3, 56, 84))
    assert flat.images_per_sample == (1, 1, 1, 1) and flat.pixel_values.equal(ref.pixel_values)
    assert proc.preprocess_images(list(x.view(4, 3, 56, 84))).pixel_values.equal(ref.pixel_values)


def test_float_input_is_0_to_1_and_rescale_overrides(proc):
    x = noise(56, 56, seed=7)
    ref = proc.preprocess_images([x]).pixel_values
    assert (proc.preprocess_images([x.float() / 255]).pixel_values - ref).abs().max() <= 1e-5
    assert (proc.preprocess_images([x.float()], rescale=True).pixel_values - ref).abs().max() <= 1e-6
    raw = proc.preprocess_images([x], rescale=False).pixel_values
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    assert torch.allclose(raw[0, :196], (x[0, :14, :14].float().reshape(-1) - mean[0]) / std[0])


def test_mixed_sizes_keep_sample_major_order(proc):
    a, b, c = noise(56, 56, 1), noise(200, 300, 2), noise(56, 56, 3)
    out = proc.preprocess_images([[a, b], None, [c]])
    assert out.images_per_sample == (2, 0, 1)
    assert out.image_grid_thw.tolist() == [[1, 4, 4], [1, 14, 22], [1, 4, 4]]
    single = [proc.preprocess_images([im]).pixel_values for im in (a, b, c)]
    assert out.pixel_values.equal(torch.cat(single))


def test_float16_and_channels_last_inputs(proc):
    x = smooth(200, 300, seed=8)  # no overshoot past 0..255, so uint8 clamping plays no part
    ref = proc.preprocess_images([x]).pixel_values
    cl = x.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # strided view
    assert proc.preprocess_images([cl]).pixel_values.equal(ref)
    half = proc.preprocess_images([(x.float() / 255).half()]).pixel_values
    # float inputs are resized without rounding to uint8 values: at most half a step apart, plus fp16 input error
    assert (half - ref).abs().max() <= 0.6 * NORM_STEP


# ------------------------------------------------------------------------------------------- video
def _manual_video_rows(frames: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) uint8, T even -> rows with explicit loops over the layout (t, bh, bw, mh, mw) x (C, T, P, P)."""
    mean = torch.tensor(CLIP_MEAN) * 255.0
    std = torch.tensor(CLIP_STD) * 255.0
    x = (frames.float() - mean[:, None, None]) / std[:, None, None]
    t, _, h, w = frames.shape
    rows = []
    for gt in range(t // 2):
        for bh in range(h // 28):
            for bw in range(w // 28):
                for mh in range(2):
                    for mw in range(2):
                        y, xx = (bh * 2 + mh) * 14, (bw * 2 + mw) * 14
                        patch = x[gt * 2:gt * 2 + 2, :, y:y + 14, xx:xx + 14]  # (T, C, P, P)
                        rows.append(patch.permute(1, 0, 2, 3).reshape(-1))
    return torch.stack(rows)


def test_video_layout_and_odd_frame_padding(proc):
    clip = noise(56, 84, seed=9, n=4)  # (T=4, 3, H, W)
    out = proc.preprocess_videos(clip[None])
    assert out.video_grid_thw.tolist() == [[2, 4, 6]] and out.videos_per_sample == (1,)
    assert (out.pixel_values_videos - _manual_video_rows(clip)).abs().max() <= 1e-6
    odd = proc.preprocess_videos([clip[:3]])  # 3 frames: the last one is repeated
    padded = torch.cat([clip[:3], clip[2:3]])
    assert odd.video_grid_thw.tolist() == [[2, 4, 6]]
    assert (odd.pixel_values_videos - _manual_video_rows(padded)).abs().max() <= 1e-6


def test_single_frame_video_equals_image(proc):
    img = noise(200, 300, seed=10)
    as_image = proc.preprocess_images([img])
    as_clip = proc.preprocess_videos(img[None, None])
    assert as_clip.video_grid_thw.equal(as_image.image_grid_thw)
    assert as_clip.pixel_values_videos.equal(as_image.pixel_values)


# ------------------------------------------------------------------------------------------- loading
def test_load_processor_presets():
    tiny = load_processor(None, tiny_config())
    assert tiny.max_pixels == OFFICIAL_MAX and tiny.tokenizer is not None
    assert tiny.image_token_id == tiny_config().image_token_id == tiny.tokenizer.token_to_id("<|image_pad|>")
    real = load_processor(None, ModelConfig.from_name("7b"))
    assert real.tokenizer is None and real.image_token_id == 151655
    assert real.preprocess_images([noise(56, 56)]).pixel_values.shape == (16, 1176)
    with pytest.raises(RuntimeError, match="tokenizer.json"):
        real.prepare([noise(56, 56)], "hi")


def test_from_pretrained_reads_resaved_preprocessor_config(tmp_path):
    import json
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 1000, "longest_edge": 200704}, "patch_size": 14, "merge_size": 2,
         "temporal_patch_size": 2, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}))
    p = BatchedImageProcessor.from_pretrained(tmp_path, tiny_config())
    assert (p.min_pixels, p.max_pixels, p.tokenizer, p.chat_template) == (1000, 200704, None, None)
    assert p.image_token_id == tiny_config().image_token_id
    loaded = load_processor(tmp_path, tiny_config())  # no tokenizer.json: the tiny vocabulary is built in
    assert loaded.max_pixels == 200704 and type(loaded.tokenizer).__name__ == "ByteTokenizer"
    assert load_processor(tmp_path, ModelConfig.from_name("3b")).tokenizer is None


# ------------------------------------------------------------------------------------------- errors
def test_error_mismatched_batch_sizes():
    p = load_processor(None, tiny_config())
    with pytest.raises(ValueError, match="texts has 3 prompts but images has 2 samples"):
        p.prepare([noise(56, 56), noise(56, 56)], ["a", "b", "c"])


def test_error_wrong_channels(proc):
    with pytest.raises(ValueError, match=r"images\[0\]\[0\]: expected 3 channels"):
        proc.preprocess_images([[torch.zeros(4, 56, 56, dtype=torch.uint8)]])
    with pytest.raises(ValueError, match="expected 3 channels"):
        proc.preprocess_images(torch.zeros(2, 56, 56, 3, dtype=torch.uint8))  # channels last


def test_error_wrong_rank(proc):
    with pytest.raises(ValueError, match=r"images\[1\]: expected a \(C, H, W\) tensor"):
        proc.preprocess_images([noise(56, 56), torch.zeros(56, 56, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="expected a"):
        proc.preprocess_images(torch.zeros(1, 1, 1, 3, 56, 56, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        proc.preprocess_videos(torch.zeros(3, 56, 56, dtype=torch.uint8))


def test_error_empty_images(proc):
    with pytest.raises(ValueError, match="empty image"):
        proc.preprocess_images([torch.zeros(3, 0, 56, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="empty list"):
        proc.preprocess_images([])


def test_error_nan_and_inf(proc):
    bad = torch.rand(3, 56, 56)
    bad[0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        proc.preprocess_images([bad])
    bad[0, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        proc.preprocess_images(bad[None, None])


def test_error_wrong_types(proc):
    with pytest.raises(TypeError, match="images must be a tensor or a list"):
        proc.preprocess_images("cat.png")
    with pytest.raises(TypeError, match=r"images\[0\]\[1\]: expected a image|images\[0\]\[1\]: expected an? image"):
        proc.preprocess_images([[noise(56, 56), 3]])
    with pytest.raises(TypeError, match="uint8 .* or floating point"):
        proc.preprocess_images([torch.zeros(3, 56, 56, dtype=torch.int32)])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        proc.preprocess_images([np.zeros((56, 56), dtype=np.uint8)])


def test_error_pixel_bounds(proc):
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        proc.preprocess_images([noise(56, 56)], min_pixels=5000, max_pixels=4000)


def test_errors_come_before_any_work(proc, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("resized before validating every image")

    monkeypatch.setattr(processor_module, "resize_float", fail)
    with pytest.raises(ValueError, match="aspect ratio"):
        proc.preprocess_images([[noise(200, 300)], [torch.zeros(3, 2, 500, dtype=torch.uint8)]])
    bad = torch.rand(3, 60, 60)
    bad[1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        proc.preprocess_images([noise(200, 300), bad])
    tiny = load_processor(None, tiny_config())
    with pytest.raises(ValueError, match="texts has 1 prompts but images has 2 samples"):
        tiny.prepare([noise(200, 300), noise(60, 60)], "one prompt")
    with pytest.raises(ValueError, match="placeholders"):
        tiny.prepare([noise(200, 300)], "<|image_pad|>")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_output_stays_on_device_and_matches_cpu(proc):
    imgs = [[noise(200, 300, 1), noise(56, 56, 2)], [noise(700, 1000, 3)]]
    cpu = proc.preprocess_images(imgs)
    gpu = proc.preprocess_images([[x.cuda() for x in s] for s in imgs])
    assert gpu.pixel_values.is_cuda and gpu.image_grid_thw.is_cuda
    assert gpu.image_grid_thw.cpu().equal(cpu.image_grid_thw)
    diff = (gpu.pixel_values.cpu() - cpu.pixel_values).abs()
    assert diff.max() <= NORM_STEP + 1e-5 and (diff > 1e-5).float().mean() <= 1e-3
