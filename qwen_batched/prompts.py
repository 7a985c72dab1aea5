"""Prompt building: chat template, image/video-token expansion, batching with padding, and ``ModelInputs``.

One sample's user turn holds its images first, then its videos, then its text: the content list the chat template
receives is ``[image] * n_images + [video] * n_videos + [text]`` and the published template renders vision blocks in
content order.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Sequence

import torch

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_TOKEN = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VIDEO_TOKEN = "<|video_pad|>"
IMAGE_BLOCK = VISION_START + IMAGE_TOKEN + VISION_END
VIDEO_BLOCK = VISION_START + VIDEO_TOKEN + VISION_END


@dataclass
class ModelInputs:
    """Model-ready inputs for a batch of B prompts.

    input_ids, attention_mask, mm_token_type_ids: (B, L) int64 (mm type 0 text, 1 image token, 2 video token;
    padding 0).
    pixel_values: (sum t*h*w, C*T*P*P) float32 and image_grid_thw: (n_images, 3) int64, images in sample-major
    order; both None without images. images_per_sample: images of each prompt.
    pixel_values_videos: (sum t*h*w, C*T*P*P) float32, video_grid_thw: (n_videos, 3) int64 and
    second_per_grid_ts: (n_videos,) float32 (temporal_patch_size / fps: seconds covered by one temporal grid step),
    videos in sample-major order; all None without videos. videos_per_sample: videos of each prompt.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    images_per_sample: tuple[int, ...] = ()
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None
    videos_per_sample: tuple[int, ...] = ()

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ModelInputs":
        """Move every tensor to ``device``; ``dtype`` (if given) applies to ``pixel_values`` and
        ``pixel_values_videos`` only."""
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                pixels = name in ("pixel_values", "pixel_values_videos")
                moved[name] = value.to(device=device, dtype=dtype if pixels else None)
        return ModelInputs(**moved)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def __getitem__(self, name: str):
        return getattr(self, name)


def render_builtin(text: str, n_images: int, system_prompt: str | None, n_videos: int = 0) -> str:
    """The Qwen2.5-VL chat template for one user turn: image blocks, then video blocks, then the text."""
    system = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{IMAGE_BLOCK * n_images}{VIDEO_BLOCK * n_videos}{text}<|im_end|>\n"
            "<|im_start|>assistant\n")


def chat_messages(text: str, n_images: int, system_prompt: str | None, n_videos: int = 0) -> list[dict]:
    """The messages a chat template receives for one sample: images, then videos, then the text."""
    content = ([{"type": "image"} for _ in range(n_images)] + [{"type": "video"} for _ in range(n_videos)]
               + [{"type": "text", "text": text}])
    messages = [{"role": "user", "content": content}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("rendering a checkpoint's chat template needs jinja2 (pip install jinja2)") from e
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template)


def render_jinja(template: str, text: str, n_images: int, system_prompt: str | None, n_videos: int = 0) -> str:
    """Render a jinja chat template (a checkpoint's ``chat_template``) with a generation prompt."""
    return _compile(template).render(messages=chat_messages(text, n_images, system_prompt, n_videos),
                                     add_generation_prompt=True)


def render_raw(text: str, n_images: int, n_videos: int = 0) -> str:
    """No chat template: one vision block per image, then one per video, then the text."""
    return IMAGE_BLOCK * n_images + VIDEO_BLOCK * n_videos + text


def check_placeholders(prompt: str, n_images: int, sample: int, n_videos: int = 0) -> None:
    """A rendered prompt must hold exactly one ``<|image_pad|>`` per image and one ``<|video_pad|>`` per video of
    its sample."""
    for token, n, what in ((IMAGE_TOKEN, n_images, "images"), (VIDEO_TOKEN, n_videos, "videos")):
        found = prompt.count(token)
        if found != n:
            raise ValueError(f"texts[{sample}]: the prompt has {found} {token} placeholders but the sample has "
                             f"{n} {what} (the processor inserts the vision blocks itself)")


def expand_image_tokens(prompt: str, tokens_per_image: Sequence[int], token: str = IMAGE_TOKEN) -> str:
    """Repeat the i-th ``token`` (``<|image_pad|>`` by default, or ``<|video_pad|>``) of ``prompt``
    ``tokens_per_image[i]`` times (counts already checked)."""
    parts = prompt.split(token)
    out = [parts[0]]
    for n, part in zip(tokens_per_image, parts[1:]):
        out.append(token * n)
        out.append(part)
    return "".join(out)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, image_token_id: int, padding_side: str = "left",
              device=None, video_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token id lists -> input_ids, attention_mask, mm_token_type_ids (1 image, 2 video), each (B, L) int64."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)  # (B,)
    batch, width = len(sequences), int(lengths.max()) if len(sequences) else 0
    flat = torch.tensor([t for s in sequences for t in s], dtype=torch.long)  # (sum lengths,)
    row = torch.repeat_interleave(torch.arange(batch), lengths)
    col = torch.arange(flat.numel()) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    if padding_side == "left":
        col += torch.repeat_interleave(width - lengths, lengths)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    input_ids[row, col] = flat
    attention_mask[row, col] = 1
    mm_token_type_ids = ((input_ids == image_token_id) & attention_mask.bool()).long()
    if video_token_id is not None:
        mm_token_type_ids += 2 * ((input_ids == video_token_id) & attention_mask.bool()).long()
    return input_ids.to(device), attention_mask.to(device), mm_token_type_ids.to(device)
