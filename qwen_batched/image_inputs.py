"""Images and clips as users give them -> checked, channels-first tensors, each named by where it came from.

Accepted: torch tensors (channels first, as torch and torchvision use them), numpy arrays (channels last, as image
libraries decode them), PIL images; per sample None / [] / an image / a stack / a list. Every check runs before
any resize or patchify and names the offending input by its index (``images[1][2]``), so one bad image of a
large batch is found without bisecting.

Value ranges: uint8 images are 0..255; floating images are 0..1 unless ``rescale=True`` (0..255, whatever the
dtype) or ``rescale=False`` (used as given). A floating image outside the range its ``rescale`` implies is an
error, not a guess: ``frames.float()`` of uint8 camera frames would otherwise be normalised 255x too bright.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch


class Collected(NamedTuple):
    """Checked inputs in sample-major order.

    items: each (F, C, H, W) (F = 1 for an image, T for a clip); None when the input was one batch tensor, which
    arrives whole as ``stacked`` (n, F, C, H, W) so that it is never split and re-stacked.
    names: where each input came from (``images[1][2]``); counts: inputs per sample.
    """

    items: list[torch.Tensor] | None
    stacked: torch.Tensor | None
    names: list[str]
    counts: list[int]


def check_rescale(rescale) -> bool | None:
    if rescale is not None and not isinstance(rescale, bool):
        raise TypeError(f"rescale must be None (uint8 0..255, floating 0..1), True (0..255) or False (values used as "
                        f"given), got {rescale!r}")
    return rescale


# ---------------------------------------------------------------------------------------------- one input
def _permute_hint(shape: tuple[int, ...], channels: int) -> str:
    """A hint for a channels-last tensor (..., H, W, C) given where channels first is expected."""
    if len(shape) < 3 or shape[-1] != channels or shape[-3] == channels:
        return ""
    order = (*range(len(shape) - 3), len(shape) - 1, len(shape) - 3, len(shape) - 2)
    return f"; it looks channels-last (..., H, W, {channels}): pass x.permute{order}"


def check_tensor(x: torch.Tensor, where: str, channels: int, layout: str) -> None:
    """Rank, channels, emptiness and dtype of an image tensor whose expected layout is ``layout``."""
    if x.dim() != layout.count(",") + 1:
        raise ValueError(f"{where}: expected a {layout} tensor, got shape {tuple(x.shape)}"
                         + _permute_hint(tuple(x.shape), channels))
    if x.shape[-3] != channels:
        raise ValueError(f"{where}: expected {channels} channels (RGB, channels first: {layout}), got shape "
                         f"{tuple(x.shape)}" + _permute_hint(tuple(x.shape), channels))
    if x.numel() == 0:
        raise ValueError(f"{where}: empty image tensor of shape {tuple(x.shape)}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise TypeError(f"{where}: images must be uint8 (0..255) or floating point (0..1), got {x.dtype}")


def _from_array(img: np.ndarray, where: str, video: bool, channels: int) -> torch.Tensor:
    """HWC (or THWC for a clip) numpy array -> CHW (TCHW) tensor view."""
    want = 4 if video else 3
    if img.ndim != want or img.shape[-1] != channels:
        layout = f"(T, H, W, {channels})" if video else f"(H, W, {channels})"
        hint = ""
        if img.ndim == want and img.shape[-3] == channels:
            order = (0, 2, 3, 1) if video else (1, 2, 0)
            hint = f"; it looks channels-first: numpy arrays are read channels-last, pass a.transpose{order}"
        elif not video and img.ndim == 4 and img.shape[-1] == channels:
            hint = "; for several images pass a list of (H, W, 3) arrays"
        raise ValueError(f"{where}: numpy images must be {layout} arrays, got shape {img.shape}{hint}")
    if img.dtype != np.uint8 and not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f"{where}: numpy images must be uint8 (0..255) or floating (0..1), got {img.dtype}")
    img = np.ascontiguousarray(img)
    t = torch.from_numpy(img if img.flags.writeable else img.copy())  # torch wants writable memory
    return t.movedim(-1, -3)


def pil_rgb(im):
    """A PIL image as RGB the way the reference reads it: transparency (an alpha band, or a palette's or
    greyscale image's ``transparency`` entry) composited onto white, not dropped."""
    if "A" not in im.getbands() and im.info.get("transparency") is None:
        return im.convert("RGB")
    from PIL import Image

    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _to_tensor(img: Any, where: str, video: bool, channels: int) -> torch.Tensor:
    """One image (C, H, W) or clip (T, C, H, W) as a tensor; PIL images become RGB uint8."""
    if isinstance(img, torch.Tensor):
        return img
    if isinstance(img, np.ndarray):
        return _from_array(img, where, video, channels)
    if type(img).__module__.startswith("PIL."):
        return _from_array(np.array(pil_rgb(img)), where, False, channels)
    kind = "clip" if video else "image"
    raise TypeError(f"{where}: expected a {kind} as a torch.Tensor, numpy array or PIL image, got {type(img).__name__}")


def _frame(img: Any, where: str, channels: int) -> torch.Tensor:
    t = _to_tensor(img, where, False, channels)
    check_tensor(t, where, channels, "(C, H, W)")
    return t


def _sample_images(entry: Any, where: str, channels: int) -> tuple[list[torch.Tensor], list[str]]:
    """The checked images of one sample, each (1, C, H, W), and their names; [] for None or []."""
    if entry is None:
        return [], []
    if isinstance(entry, (list, tuple)):
        names = [f"{where}[{j}]" for j in range(len(entry))]
        return [_frame(img, name, channels).unsqueeze(0) for img, name in zip(entry, names)], names
    t = _to_tensor(entry, where, False, channels)
    if t.dim() == 4:  # this sample's images stacked
        check_tensor(t, where, channels, "(N, C, H, W)")
        return list(t.unsqueeze(1).unbind(0)), [f"{where}[{j}]" for j in range(t.shape[0])]
    check_tensor(t, where, channels, "(C, H, W)")
    return [t.unsqueeze(0)], [where]


def clip(x: Any, where: str, channels: int) -> torch.Tensor:
    """One checked clip (T, C, H, W): a tensor, a (T, H, W, C) array or a list of frames (one size)."""
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{where}: empty clip (a clip needs at least one frame)")
        frames = [_frame(f, f"{where}[{j}]", channels) for j, f in enumerate(x)]
        if len({(f.shape, f.dtype, f.device) for f in frames}) > 1:
            raise ValueError(f"{where}: the frames of a clip must share one size, dtype and device")
        return torch.stack(frames)
    t = _to_tensor(x, where, True, channels)
    check_tensor(t, where, channels, "(T, C, H, W)")
    return t


def _one_device(items: list[torch.Tensor], what: str) -> None:
    devices = {x.device for x in items}
    if len(devices) > 1:
        raise ValueError(f"{what} are on several devices {sorted(map(str, devices))}; put them on one")


# ---------------------------------------------------------------------------------------------- whole arguments
def collect_images(images, channels: int) -> Collected:
    """``images`` as ``preprocess_images`` takes it -> checked images (sample-major), names, images per sample."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 5:
            check_tensor(images, "images", channels, "(B, N, C, H, W)")
            b, n = images.shape[:2]
            names = [f"images[{i}][{j}]" for i in range(b) for j in range(n)]
            return Collected(None, images.reshape(b * n, 1, *images.shape[2:]), names, [n] * b)
        x = images.unsqueeze(0) if images.dim() == 3 else images
        check_tensor(x, "images", channels, "(N, C, H, W)")
        return Collected(None, x.unsqueeze(1), [f"images[{i}]" for i in range(x.shape[0])], [1] * x.shape[0])
    if isinstance(images, np.ndarray):
        raise TypeError(f"images: a numpy array of shape {images.shape} is ambiguous as a batch; pass a list of "
                        "(H, W, 3) arrays (one entry per sample), or a tensor: torch.from_numpy(a).permute(0, 3, 1, 2) "
                        "for (N, H, W, 3)")
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images must be a tensor or a list (one entry per sample), got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images is an empty list: pass None for a text-only batch")
    items, names, counts = [], [], []
    for i, entry in enumerate(images):
        got, got_names = _sample_images(entry, f"images[{i}]", channels)
        items += got
        names += got_names
        counts.append(len(got))
    _one_device(items, "images")
    return Collected(items, None, names, counts)


def collect_videos(videos, n_samples: int | None, channels: int) -> Collected:
    """``videos`` (one entry per sample: None / [], a clip, or a list of clips; or a (B, T, C, H, W) tensor) ->
    checked clips (sample-major), names, clips per sample. ``n_samples``: the entries required (None: any)."""
    if isinstance(videos, torch.Tensor):
        if videos.dim() != 5:
            raise ValueError("videos as a tensor must be (B, T, C, H, W) (one clip per sample), got shape "
                             f"{tuple(videos.shape)}; or pass a list with one entry per sample"
                             + _permute_hint(tuple(videos.shape), channels))
        videos = list(videos.unbind(0))
    if not isinstance(videos, (list, tuple)):
        raise TypeError("videos must be None, a (B, T, C, H, W) tensor or a list with one entry per sample (None, "
                        f"a (T, C, H, W) clip or a list of clips), got {type(videos).__name__}")
    if n_samples is not None and len(videos) != n_samples:
        raise ValueError(f"texts has {n_samples} prompts but videos has {len(videos)} samples; give one videos "
                         "entry per prompt (None or [] for a prompt without video)")
    if not videos:
        raise ValueError("videos is an empty list: give one entry per sample")
    items, names, counts = [], [], []
    for i, entry in enumerate(videos):
        clips = entry if isinstance(entry, (list, tuple)) else ([] if entry is None else [entry])
        for j, c in enumerate(clips):
            names.append(f"videos[{i}]" if c is entry else f"videos[{i}][{j}]")
            items.append(clip(c, names[-1], channels))
        counts.append(len(clips))
    _one_device(items, "videos")
    return Collected(items, None, names, counts)


# ---------------------------------------------------------------------------------------------- values
def check_values(groups: Sequence[tuple[torch.Tensor, Sequence[str]]], rescale: bool | None) -> None:
    """Floating inputs are finite and within the range ``rescale`` implies ([0, 1] for None, [0, 255] for True,
    unchecked for False). ``groups``: (frames (n, F, C, H, W), the n names). One min/max reduction per floating
    group and one host read for all of them; uint8 inputs need none."""
    floats = [(frames, names) for frames, names in groups if frames.is_floating_point()]
    if not floats:
        return
    stats = torch.cat([torch.stack(torch.aminmax(f.reshape(f.shape[0], -1), dim=1), 1).float() for f, _ in floats])
    top = None if rescale is False else (255.0 if rescale else 1.0)
    for (lo, hi), name in zip(stats.tolist(), (n for _, names in floats for n in names)):  # (n_images, 2)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{name}: floating-point images must be finite, found NaN or inf")
        if top is None or (lo >= 0.0 and hi <= top):
            continue
        if rescale is None:
            raise ValueError(
                f"{name}: floating-point images are read as 0..1, but this one holds values in [{lo:g}, {hi:g}]. "
                "For camera frames pass the uint8 tensor itself (not frames.float()), or rescale=True for floating "
                "0..255 values; rescale=False uses the values as given (data already normalised that way)")
        raise ValueError(f"{name}: rescale=True reads images as 0..255, but this one holds values in [{lo:g}, "
                         f"{hi:g}]; pass rescale=False to use the values as given")
