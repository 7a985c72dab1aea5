"""``BatchedImageProcessor``: images, videos and prompts in, Qwen2.5-VL model inputs out, on the images' device.

Images follow the reference (``transformers``' Qwen2-VL image processor, torchvision flavour): ``smart_resize``
to multiples of 28 within [min_pixels, max_pixels], bicubic antialiased resize of the uint8 image (float
interpolate, round back to uint8 values: torchvision's float path, which it takes on CUDA), then
``(x - 255*mean) / (255*std)`` and the patch layout of ``kernels/patchify.py``. Images of one size are processed
together: one resize and one patchify per size.

Value ranges: uint8 images are 0..255, floating images 0..1; ``rescale=`` overrides (True: the values are
0..255 whatever the dtype, False: use them as they are). A floating image outside its range is a ValueError
(``image_inputs.py``, which turns tensors, arrays, PIL images and lists into checked tensors).

Videos (clips of already sampled frames) go through the same resize and normalization as images; a clip of T frames
gives ``grid_t = ceil(T / temporal_patch_size)`` (an odd clip repeats its last frame), like the reference
``Qwen2VLVideoProcessor``. Frames are used as given (no frame sampling). Videos use this processor's
``min_pixels`` / ``max_pixels`` (the checkpoint's ``preprocessor_config.json``); note that the reference has a
separate video processor whose class defaults differ (``size`` shortest_edge 128*28*28, longest_edge 768*28*28,
plus an optional per-frame cap, ``cap_pixels_per_frame``): pass ``min_pixels=`` / ``max_pixels=`` to match a
setup that uses them.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .config import TINY_VOCAB, ModelConfig, default_chat_template, default_preprocessor_config, read_json
from .inputs import BatchLayout, ModelInputs
from .prompts import (IMAGE_TOKEN, VIDEO_TOKEN, check_placeholders, expand_image_tokens, pad_batch,
                      render_builtin, render_jinja, render_raw)
from .image_inputs import Collected, check_rescale, check_values, collect_images, collect_videos
from .resize import ResizeTables, resize_float
from .tokenizer import ByteTokenizer, load_tokenizer

from .fused import give_up, kernels_enabled, on_device, patchify_reference, resize_patchify

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 3136,
                 max_pixels: int = 12845056) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area within [min_pixels, max_pixels], aspect kept.

    Sides are first rounded (Python's half-to-even ``round``) to multiples of ``factor``; an area above
    ``max_pixels`` scales both sides down (floor), below ``min_pixels`` up (ceil).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.4g} > {MAX_ASPECT_RATIO} (image "
                         f"{height}x{width}); the model takes up to {MAX_ASPECT_RATIO}:1, crop or pad it")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class ProcessedImages(NamedTuple):
    """pixel_values (sum t*h*w, C*T*P*P) float32; image_grid_thw (n_images, 3) int64; images of each sample."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    images_per_sample: tuple[int, ...]


class ProcessedVideos(NamedTuple):
    """pixel_values_videos (sum t*h*w, C*T*P*P) float32; video_grid_thw (n_videos, 3) int64; videos of each
    sample. The names of ``ModelInputs`` / ``extract_features``' video arguments."""

    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    videos_per_sample: tuple[int, ...]


class _Group(NamedTuple):
    frames: torch.Tensor  # (n, F, C, H, W)
    index: list[int]  # positions of its n images in sample-major order
    names: list[str]  # where its n images came from ("images[1][2]")
    size: tuple[int, int]  # resize target (h, w)


class BatchedImageProcessor:
    """Qwen2.5-VL preprocessing for whole batches on any device.

    ``preprocess_images`` turns images into ``pixel_values`` / ``image_grid_thw``; ``prepare`` also builds the
    prompts (chat template, one ``<|vision_start|><|image_pad|>*n<|vision_end|>`` block per image) and pads
    them into ``ModelInputs``. Token ids default to the published checkpoints'.
    """

    def __init__(self, min_pixels: int = 3136, max_pixels: int = 12845056, patch_size: int = 14,
                 temporal_patch_size: int = 2, merge_size: int = 2, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, tokenizer=None, chat_template: str | None = None, *,
                 image_token_id: int = 151655, video_token_id: int = 151656, vision_start_token_id: int = 151652,
                 vision_end_token_id: int = 151653, pad_token_id: int = 151643, in_channels: int = 3,
                 use_triton: bool | None = None, special_tokens: dict | None = None):
        self.min_pixels, self.max_pixels = self._check_pixels(min_pixels, max_pixels)
        self.patch_size, self.temporal_patch_size, self.merge_size = int(patch_size), int(temporal_patch_size), int(merge_size)
        self.in_channels = int(in_channels)
        if len(image_mean) != self.in_channels or len(image_std) != self.in_channels:
            raise ValueError(f"image_mean and image_std need {self.in_channels} values, got {image_mean}, {image_std}")
        self.image_mean, self.image_std = tuple(map(float, image_mean)), tuple(map(float, image_std))
        self.tokenizer = tokenizer
        if chat_template is not None and chat_template.strip() == default_chat_template().strip():
            chat_template = None  # the published template: rendered by the built-in formatter
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})  # eos_token, bos_token, ...: variables of the template
        self.image_token_id, self.video_token_id = int(image_token_id), int(video_token_id)
        self.vision_start_token_id, self.vision_end_token_id = int(vision_start_token_id), int(vision_end_token_id)
        self.pad_token_id = int(pad_token_id)
        self.use_triton = use_triton
        self._norm_cache: dict = {}  # (device, scale) -> mean, std: a handful of entries
        self.resize_tables = ResizeTables()  # resize taps and bands per size, on each device once
        self._check_tokenizer_ids()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config_dict(cls, cfg: dict, **kwargs) -> "BatchedImageProcessor":
        """From a ``preprocessor_config.json`` dict (``min_pixels``/``max_pixels`` or ``size`` edges)."""
        size = cfg.get("size") or {}
        args = dict(
            min_pixels=cfg.get("min_pixels", size.get("shortest_edge", 3136)),
            max_pixels=cfg.get("max_pixels", size.get("longest_edge", 12845056)),
            patch_size=cfg.get("patch_size", 14), temporal_patch_size=cfg.get("temporal_patch_size", 2),
            merge_size=cfg.get("merge_size", 2), image_mean=cfg.get("image_mean", CLIP_MEAN),
            image_std=cfg.get("image_std", CLIP_STD),
        )
        args.update(kwargs)
        return cls(**args)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, model_config: ModelConfig | None = None,
                        **kwargs) -> "BatchedImageProcessor":
        """From a checkpoint directory: ``preprocessor_config.json``, else the ``image_processor`` entry of
        ``processor_config.json`` (what transformers 5 saves), else the published defaults;
        ``tokenizer.json`` (optional), chat template from ``chat_template.jinja`` / ``chat_template.json`` /
        ``tokenizer_config.json``; special token ids from ``model_config``, the directory's ``config.json`` or
        else the tokenizer's vocabulary."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
        pre = (read_json(os.path.join(path, "preprocessor_config.json"))
               or (read_json(os.path.join(path, "processor_config.json")) or {}).get("image_processor")
               or default_preprocessor_config())
        if model_config is None and os.path.isfile(os.path.join(path, "config.json")):
            model_config = ModelConfig.from_json(path)
        tok_path = os.path.join(path, "tokenizer.json")
        tokenizer = load_tokenizer(tok_path) if os.path.isfile(tok_path) else None
        ids = _token_ids(model_config) if model_config is not None else _tokenizer_ids(tokenizer)
        return cls.from_config_dict(pre, tokenizer=tokenizer, chat_template=_find_chat_template(path),
                                    special_tokens=_special_tokens(path), **{**ids, **kwargs})

    def _check_tokenizer_ids(self) -> None:
        if self.tokenizer is None:
            return
        for token, want in ((IMAGE_TOKEN, self.image_token_id), (VIDEO_TOKEN, self.video_token_id),
                            ("<|vision_start|>", self.vision_start_token_id),
                            ("<|vision_end|>", self.vision_end_token_id)):
            got = self.tokenizer.token_to_id(token)
            if got is not None and got != want:
                raise ValueError(f"tokenizer maps {token} to id {got} but the model config says {want}")

    @staticmethod
    def _check_pixels(min_pixels, max_pixels) -> tuple[int, int]:
        if not isinstance(min_pixels, (int, np.integer)) or not isinstance(max_pixels, (int, np.integer)):
            raise TypeError(f"min_pixels and max_pixels must be ints, got {min_pixels!r}, {max_pixels!r}")
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, max_pixels={max_pixels}")
        return int(min_pixels), int(max_pixels)

    # ------------------------------------------------------------------ images
    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def smart_resize(self, height: int, width: int, min_pixels: int | None = None,
                     max_pixels: int | None = None) -> tuple[int, int]:
        """The size an image of ``height`` x ``width`` is resized to with this processor's settings."""
        return smart_resize(height, width, self.factor, self.min_pixels if min_pixels is None else min_pixels,
                            self.max_pixels if max_pixels is None else max_pixels)

    def preprocess_images(self, images, *, min_pixels: int | None = None, max_pixels: int | None = None,
                          rescale: bool | None = None, device=None) -> ProcessedImages:
        """Images -> ``ProcessedImages(pixel_values, image_grid_thw, images_per_sample)``.

        ``images``: a tensor (B, N, 3, H, W) (N images per sample) or (N, 3, H, W) / a flat list (one image per
        sample); or a list with one entry per sample: None / [] (no image), an image, a (N, 3, H, W) tensor, or
        a list of images of any sizes. An image is a (3, H, W) tensor, a PIL image or a (H, W, 3) numpy array.
        ``rescale``: None reads uint8 as 0..255 and floating images as 0..1, True reads 0..255 whatever the dtype,
        False uses the values as given; a floating image outside its range is a ValueError. Outputs are on the
        images' device (or ``device``).
        """
        groups, counts = self._checked(collect_images(images, self.in_channels), min_pixels, max_pixels, rescale,
                                       device)
        pixel_values, grid_thw, _ = self._run(groups, counts, rescale, device)
        return ProcessedImages(pixel_values, grid_thw, tuple(counts))

    def preprocess_videos(self, videos, *, min_pixels: int | None = None, max_pixels: int | None = None,
                          rescale: bool | None = None, device=None) -> ProcessedVideos:
        """Clips -> ``ProcessedVideos(pixel_values_videos, video_grid_thw, videos_per_sample)``.

        ``videos``: a (B, T, 3, H, W) tensor (one clip per sample) or a list with one entry per sample: None / [],
        a clip, or a list of clips; a clip is a (T, 3, H, W) tensor, a (T, H, W, 3) array or a list of frames.
        ``grid_t = ceil(T / temporal_patch_size)``, an odd clip repeating its last frame. ``rescale`` and
        ``device`` as in ``preprocess_images``.
        """
        groups, counts = self._checked(collect_videos(videos, None, self.in_channels), min_pixels, max_pixels,
                                       rescale, device)
        pixel_values, grid_thw, _ = self._run(groups, counts, rescale, device)
        return ProcessedVideos(pixel_values, grid_thw, tuple(counts))

    def _run(self, groups: list["_Group"], counts: list[int], rescale, device):
        """Process checked groups: one resize + one patchify per distinct input size.

        Returns pixel rows (sum t*h*w, C*T*P*P) float32, grid_thw (n, 3) int64 and the grids as lists (for the
        prompts), images or clips alike, in sample-major order."""
        dev = groups[0].frames.device if groups else torch.device(device or "cpu")
        grids: list[list[int]] = [[]] * sum(counts)
        outputs = []
        for g in groups:
            patches, grid = self._process_group(g, rescale)
            outputs.append(patches)
            for i in g.index:
                grids[i] = grid
        pixel_values = self._assemble(groups, outputs, grids, dev)
        grid_thw = torch.tensor(grids, dtype=torch.long).reshape(-1, 3).to(dev)
        return pixel_values, grid_thw, grids

    def _checked(self, inputs: Collected, min_pixels: int | None, max_pixels: int | None, rescale, device):
        """Collected inputs -> groups of one shape and dtype with their resize targets, values checked, on
        ``device``; and the inputs per sample. Every check is done here, before any work."""
        min_pixels, max_pixels = self._check_pixels(self.min_pixels if min_pixels is None else min_pixels,
                                                    self.max_pixels if max_pixels is None else max_pixels)
        rescale = check_rescale(rescale)
        if inputs.stacked is not None:
            n = inputs.stacked.shape[0]
            groups = [_Group(inputs.stacked, list(range(n)), inputs.names, (0, 0))] if n else []
        else:
            groups = self._group(inputs.items, inputs.names)
        sized = []
        for g in groups:
            try:
                size = smart_resize(*g.frames.shape[-2:], self.factor, min_pixels, max_pixels)
            except ValueError as e:
                more = f" (and {len(g.names) - 1} more of this size)" if len(g.names) > 1 else ""
                raise ValueError(f"{g.names[0]}: {e}{more}") from None
            sized.append(g._replace(size=size))
        check_values([(g.frames, g.names) for g in sized], rescale)
        if device is not None:
            sized = [g._replace(frames=g.frames.to(device)) for g in sized]
        return sized, inputs.counts

    @staticmethod
    def _group(items: list[torch.Tensor], names: list[str]) -> list[_Group]:
        """Stack same-shape, same-dtype items (F, C, H, W) into groups, keeping their positions and names."""
        by_key: dict[tuple, list[int]] = {}
        for i, x in enumerate(items):
            by_key.setdefault((tuple(x.shape), x.dtype), []).append(i)
        return [_Group(items[index[0]].unsqueeze(0) if len(index) == 1 else torch.stack([items[i] for i in index]),
                       index, [names[i] for i in index], (0, 0)) for index in by_key.values()]

    def _norm(self, device: torch.device, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """mean*scale and std*scale as float32 (C,) on ``device`` (float32 products, as the reference)."""
        key = (device, scale)
        if key not in self._norm_cache:
            mean = torch.tensor(self.image_mean, dtype=torch.float32) * scale
            std = torch.tensor(self.image_std, dtype=torch.float32) * scale
            self._norm_cache[key] = (mean.to(device), std.to(device))
        return self._norm_cache[key]

    def _process_group(self, g: _Group, rescale: bool | None) -> tuple[torch.Tensor, list[int]]:
        """One group: resize (if needed), normalize and patchify; Triton on CUDA, torch elsewhere."""
        frames = g.frames  # (n, F, C, H, W)
        uint8 = frames.dtype == torch.uint8
        scale = 255.0 if (uint8 if rescale is None else rescale) else 1.0
        grid = [math.ceil(frames.shape[1] / self.temporal_patch_size), g.size[0] // self.patch_size,
                g.size[1] // self.patch_size]
        return self._patch_rows(frames, g.size, *self._norm(frames.device, scale)), grid

    def _patch_rows(self, frames: torch.Tensor, size: tuple[int, int], mean: torch.Tensor, std: torch.Tensor,
                   taps: list | None = None, bands=None) -> torch.Tensor:
        """frames (n, F, C, H, W) -> patch rows (n * F/T * gh * gw, C*T*P*P) float32: resized to ``size`` when it
        differs (uint8 frames round as the reference's uint8 resize does), normalized by ``mean``/``std`` (already
        scaled to the frames' range), patchified. The fused Triton kernel on CUDA, torch elsewhere or when the
        kernel cannot build. ``taps`` (per axis, None where unresized) / ``bands``: the resize tables, from
        ``resize_tables`` when not given (a caller holding them reads nothing back and looks nothing up)."""
        n, f, c, height, width = frames.shape
        uint8 = frames.dtype == torch.uint8
        resized = size != (height, width)
        kw = dict(patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size, merge_size=self.merge_size)
        use_triton = (self.use_triton if self.use_triton is not None
                      else kernels_enabled("resize_patchify") and frames.is_cuda)
        if use_triton:
            if taps is None:
                taps = [self.resize_tables.taps(src, dst, frames.device) if src != dst else None
                        for src, dst in ((height, size[0]), (width, size[1]))]
            try:
                with on_device(frames):
                    return resize_patchify(frames, mean, std, height_taps=taps[0], width_taps=taps[1],
                                           round_uint8=uint8 and resized, **kw)
            except Exception as e:  # a kernel that cannot build here: the torch path below
                if self.use_triton:
                    raise
                give_up("resize_patchify", e)
        if resized:
            if bands is None:
                bands = self.resize_tables.bands((height, width), size, frames.device)
            frames = resize_float(frames.reshape(n * f, c, height, width), size, round_uint8=uint8, bands=bands)
            frames = frames.view(n, f, c, *size)  # float32 (uint8 inputs: rounded values)
        return patchify_reference(frames, mean, std, **kw)

    def _assemble(self, groups: list[_Group], outputs: list[torch.Tensor], grids, device) -> torch.Tensor:
        """Group outputs -> one (rows, cols) tensor in sample-major image order."""
        ncol = self.in_channels * self.temporal_patch_size * self.patch_size ** 2
        if len(groups) == 1 and groups[0].index == list(range(len(grids))):
            return outputs[0]
        rows = torch.tensor([math.prod(g) for g in grids], dtype=torch.long)  # (n_images,)
        starts = rows.cumsum(0) - rows
        out = torch.empty(int(rows.sum()), ncol, dtype=torch.float32, device=device)
        for g, patches in zip(groups, outputs):
            idx = torch.tensor(g.index, dtype=torch.long)
            n = rows[idx]
            dest = torch.repeat_interleave(starts[idx] - (n.cumsum(0) - n), n) + torch.arange(int(n.sum()))
            out.index_copy_(0, dest.to(device), patches)
        return out

    # ------------------------------------------------------------------ prompts
    def prepare(self, images, texts, *, videos=None, fps: float | Sequence[float] = 2.0, chat_template: bool = True,
                padding_side: str = "left", system_prompt: str | None = None, min_pixels: int | None = None,
                max_pixels: int | None = None, rescale: bool | None = None, device=None) -> ModelInputs:
        """Images, videos and prompts -> ``ModelInputs`` (left padding by default).

        ``texts``: a str (batch of one) or a list with one prompt per sample; ``images``: as in
        ``preprocess_images`` (one entry per sample, None / [] for text-only samples) or None for a batch without
        images. ``videos``: None, or one entry per sample: None / [] (no video), a clip, or a list of clips; a clip
        is a (T, 3, H, W) tensor, a (T, H, W, 3) numpy array or a list of frames (frames already sampled, used as
        given); a (B, T, 3, H, W) tensor is one clip per sample. ``fps``: frame rate of the given frames, one value
        for all videos or one per video (sample-major); ``second_per_grid_ts = temporal_patch_size / fps`` as the
        reference processor computes it (the reference assumes 24 fps when a clip comes without metadata).
        With ``chat_template`` the Qwen2.5-VL chat turn is built (system prompt, then in the user turn the
        sample's image blocks, its video blocks (``<|vision_start|><|video_pad|>*n<|vision_end|>``, n = t*h*w/4),
        then its text, then the assistant prefix); otherwise the vision blocks are put before the raw text in that
        order. ``system_prompt=None`` keeps the template's default ("You are a helpful assistant.").
        ``min_pixels`` / ``max_pixels`` override the processor's and ``rescale`` is read as in
        ``preprocess_images``, for images and videos alike.
        """
        texts = _check_texts(texts)
        if self.tokenizer is None:
            raise RuntimeError("this processor has no tokenizer: prompts need the checkpoint's tokenizer.json "
                               "(load the model from a directory that contains it); images work without it")
        groups, counts = ([], [0] * len(texts)) if images is None else \
            self._checked(collect_images(images, self.in_channels), min_pixels, max_pixels, rescale, device)
        if len(counts) != len(texts):
            raise ValueError(f"texts has {len(texts)} prompts but images has {len(counts)} samples; "
                             "give one images entry per prompt (None or [] for a text-only prompt)")
        vgroups, vcounts = ([], [0] * len(texts)) if videos is None else \
            self._checked(collect_videos(videos, len(texts), self.in_channels), min_pixels, max_pixels, rescale,
                          device)
        seconds = self._seconds_per_grid(fps, sum(vcounts))
        devs = {g.frames.device for g in groups + vgroups}
        if len(devs) > 1:
            raise ValueError(f"images and videos are on different devices {sorted(map(str, devs))}; put them on one")
        out_dev = torch.device(device) if device is not None else (devs.pop() if devs else torch.device("cpu"))
        prompts = [self._render(text, n, chat_template, system_prompt, m) for text, n, m in zip(texts, counts, vcounts)]
        for i, (prompt, n, m) in enumerate(zip(prompts, counts, vcounts)):
            check_placeholders(prompt, n, i, m)
        pixel_values, grid_thw, grids = self._run(groups, counts, rescale, device)  # all checks done: now the work
        per_image = [math.prod(g) // self.merge_size ** 2 for g in grids]
        starts = np.cumsum([0] + counts).tolist()
        prompts = [expand_image_tokens(p, per_image[a:b]) for p, a, b in zip(prompts, starts, starts[1:])]
        if vgroups:
            pixel_values_videos, video_grid_thw, vgrids = self._run(vgroups, vcounts, rescale, device)
            per_video = [math.prod(g) // self.merge_size ** 2 for g in vgrids]
            vstarts = np.cumsum([0] + vcounts).tolist()
            prompts = [expand_image_tokens(p, per_video[a:b], VIDEO_TOKEN)
                       for p, a, b in zip(prompts, vstarts, vstarts[1:])]
        encoded = self.tokenizer.encode_batch(prompts)
        ids, mask, mm = pad_batch(encoded, self.pad_token_id, self.image_token_id, padding_side, out_dev,
                                  video_token_id=self.video_token_id)
        width, lens = ids.shape[1], [len(e) for e in encoded]
        first = [width - n if padding_side == "left" else 0 for n in lens]
        layout = BatchLayout(first=tuple(first), last=tuple(f + n - 1 for f, n in zip(first, lens)),
                             n_real=tuple(lens), image_grids=tuple(map(tuple, grids)),
                             images_per_row=tuple(counts),
                             video_grids=tuple(map(tuple, vgrids)) if vgroups else (),
                             videos_per_row=tuple(vcounts) if vgroups else ())
        out = ModelInputs(ids, mask, mm, images_per_sample=tuple(counts), videos_per_sample=tuple(vcounts),
                          layout=layout)
        if grids:
            out.pixel_values, out.image_grid_thw = pixel_values, grid_thw
        if vgroups:
            out.pixel_values_videos, out.video_grid_thw = pixel_values_videos, video_grid_thw
            out.second_per_grid_ts = seconds.to(out_dev)
        return out

    def _seconds_per_grid(self, fps, n_videos: int) -> torch.Tensor:
        """``temporal_patch_size / fps`` per video as float32 (n_videos,); ``fps`` one number or one per video."""
        if isinstance(fps, (torch.Tensor, np.ndarray)) and fps.ndim == 0:
            fps = fps.item()
        many = isinstance(fps, (list, tuple)) or (isinstance(fps, (torch.Tensor, np.ndarray)) and fps.ndim > 0)
        values = list(fps.tolist() if hasattr(fps, "tolist") else fps) if many else [fps] * n_videos
        if many and len(values) != n_videos:
            raise ValueError(f"fps has {len(values)} values but there are {n_videos} videos; give one number for all "
                             "videos or one per video")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(v) or v <= 0:
                raise ValueError(f"fps must be a positive finite number (frames per second of the given frames) or "
                                 f"a list of them, got {fps!r}")
        return torch.tensor([self.temporal_patch_size / float(v) for v in values], dtype=torch.float32)

    def _render(self, text: str, n_images: int, chat_template: bool, system_prompt: str | None,
                n_videos: int = 0) -> str:
        if not chat_template:
            return render_raw(text, n_images, n_videos)
        if self.chat_template is None:
            return render_builtin(text, n_images, system_prompt, n_videos)
        return render_jinja(self.chat_template, text, n_images, system_prompt, n_videos, self.special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        """Token id rows (tensor or lists) -> strings, with this processor's tokenizer."""
        if self.tokenizer is None:
            raise RuntimeError("this processor has no tokenizer: decoding needs the checkpoint's tokenizer.json")
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.batch_decode([ids.tolist() if hasattr(ids, "tolist") else list(ids)], skip_special_tokens)[0]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(min_pixels={self.min_pixels}, max_pixels={self.max_pixels}, "
                f"patch_size={self.patch_size}, temporal_patch_size={self.temporal_patch_size}, "
                f"merge_size={self.merge_size}, tokenizer={type(self.tokenizer).__name__ if self.tokenizer else None})")


# ---------------------------------------------------------------------------------------------- helpers
def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)) or not texts:
        raise TypeError(f"texts must be a str or a non-empty list of str, got {texts!r:.80}")
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be a str or a non-empty list of str, got a list holding {bad[0]}")
    return list(texts)


def _token_ids(cfg: ModelConfig) -> dict[str, int]:
    return dict(image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
                pad_token_id=cfg.pad_token_id, in_channels=cfg.vision.in_channels)


def _tokenizer_ids(tokenizer) -> dict[str, int]:
    """Special token ids from a tokenizer's vocabulary (a checkpoint without config.json)."""
    if tokenizer is None:
        return {}
    names = {"image_token_id": IMAGE_TOKEN, "video_token_id": VIDEO_TOKEN, "pad_token_id": "<|endoftext|>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    found = {name: tokenizer.token_to_id(token) for name, token in names.items()}
    return {name: i for name, i in found.items() if i is not None}


def _special_tokens(path: str) -> dict[str, str]:
    """The tokenizer's named special tokens (``eos_token`` ...) from ``special_tokens_map.json`` and
    ``tokenizer_config.json`` (the latter wins), as strings: what a chat template may refer to."""
    out = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        cfg = read_json(os.path.join(path, name)) or {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token"):
            tok = cfg.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok  # an AddedToken as saved
            if isinstance(tok, str):
                out[key] = tok
    return out


def _find_chat_template(path: str) -> str | None:
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja) as f:
            return f.read()
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = (read_json(os.path.join(path, name)) or {}).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def load_processor(path: str | os.PathLike | None, model_config: ModelConfig) -> BatchedImageProcessor:
    """The processor a model uses: from a checkpoint directory, or (``path=None``) the published preprocessor
    config. Without a tokenizer.json the tiny preset's vocabulary gets the built-in byte tokenizer; other
    vocabularies get none (images work, prompts ask for a tokenizer.json)."""
    tiny = model_config.text.vocab_size == TINY_VOCAB
    if path is not None:
        proc = BatchedImageProcessor.from_pretrained(path, model_config)
        if proc.tokenizer is None and tiny:
            proc.tokenizer = ByteTokenizer()
        return proc
    return BatchedImageProcessor.from_config_dict(default_preprocessor_config(),
                                                  tokenizer=ByteTokenizer() if tiny else None,
                                                  **_token_ids(model_config))
