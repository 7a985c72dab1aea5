"""Prompt building: chat template, image/video-token expansion, batching with padding.

One sample's user turn holds its images first, then its videos, then its text: the content list the chat template
receives is ``[image] * n_images + [video] * n_videos + [text]`` and the published template renders vision blocks in
content order.
"""
from __future__ import annotations

import datetime
import functools
import json
from typing import Sequence

import numpy as np
import torch

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_TOKEN = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VIDEO_TOKEN = "<|video_pad|>"
IMAGE_BLOCK = VISION_START + IMAGE_TOKEN + VISION_END
VIDEO_BLOCK = VISION_START + VIDEO_TOKEN + VISION_END


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


def _raise_exception(message):
    raise ValueError(f"the chat template refused the prompt: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """The environment chat templates are written for (transformers renders them so): loop controls, its
    ``raise_exception`` / ``strftime_now`` globals and a non-escaping ``tojson``."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("rendering a checkpoint's chat template needs jinja2 (pip install jinja2)") from e
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def render_jinja(template: str, text: str, n_images: int, system_prompt: str | None, n_videos: int = 0,
                 special_tokens: dict | None = None) -> str:
    """Render a jinja chat template (a checkpoint's ``chat_template``) with a generation prompt; the tokenizer's
    special tokens (``eos_token``, ``bos_token``, ...) are template variables, as in transformers."""
    return _compile(template).render(**(special_tokens or {}),
                                     messages=chat_messages(text, n_images, system_prompt, n_videos),
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
    """Token id lists -> input_ids, attention_mask, mm_token_type_ids (1 image, 2 video), each (B, L) int64.
    Built on the host (numpy) and copied to ``device`` once each."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max((len(s) for s in sequences), default=0)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for i, seq in enumerate(sequences):  # host lists, before any tensor exists
        sl = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
        ids[i, sl] = seq
        mask[i, sl] = 1
    mm = ((ids == image_token_id) & (mask == 1)).astype(np.int64)
    if video_token_id is not None:
        mm += 2 * ((ids == video_token_id) & (mask == 1))
    return tuple(torch.from_numpy(a).to(device) for a in (ids, mask, mm))
