"""Argument checks of the public API: each bad input gets a ValueError/TypeError naming the argument and what
was expected, before any work is done."""
from __future__ import annotations

import torch

from .config import ModelConfig
from .generation import check_sampling


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_dtype(dtype) -> torch.dtype | None:
    """None, a torch.dtype or its name ('bfloat16', 'torch.float32') -> torch.dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.replace("torch.", ""), None), torch.dtype):
        return getattr(torch, dtype.replace("torch.", ""))
    raise TypeError(f"dtype must be a torch.dtype or its name (e.g. 'bfloat16'), got {dtype!r}")


def resolve_layers(layers, n_layers: int) -> tuple[int, ...]:
    """``layers`` (None = all, an int or ints, negatives from the end) -> indices into 0..n_layers."""
    n = n_layers
    if layers is None:
        return tuple(range(n + 1))
    if _is_int(layers):
        layers = [layers]
    if not isinstance(layers, (list, tuple, range)):
        raise TypeError(f"layers must be None, an int or a sequence of ints, got {type(layers).__name__}")
    if len(layers) == 0:
        raise ValueError("layers must name at least one hidden state (or be None for all)")
    for i in layers:
        if not _is_int(i):
            raise TypeError(f"layers must hold ints, got {i!r}")
        if not -(n + 1) <= i <= n:
            raise ValueError(f"layers index {i} out of range: hidden states are 0..{n} (or -{n + 1}..-1)")
    return tuple(i % (n + 1) for i in layers)


def resolve_eos(eos_token_id, cfg: ModelConfig) -> tuple[int, ...]:
    """None = the checkpoint's EOS ids; an int or a list overrides them; [] never stops."""
    if eos_token_id is None:
        return tuple(cfg.eos_token_ids)
    ids = [eos_token_id] if _is_int(eos_token_id) else eos_token_id
    if not isinstance(ids, (list, tuple)) or not all(_is_int(i) for i in ids):
        raise TypeError(f"eos_token_id must be None, an int or a list of ints, got {eos_token_id!r}")
    if any(not 0 <= i < cfg.text.vocab_size for i in ids):
        raise ValueError(f"eos_token_id {eos_token_id!r} outside the vocabulary (0..{cfg.text.vocab_size - 1})")
    return tuple(ids)


def check_generate_args(max_new_tokens, temperature, top_k, top_p, seed, compile) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    if seed is not None and not _is_int(seed):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {type(compile).__name__}")


def check_devices(model_device: torch.device, **tensors) -> None:
    """All given tensors on one device (they are moved to the model's device afterwards)."""
    devs = {k: v.device for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if len(set(devs.values())) > 1:
        raise ValueError(f"input tensors are on different devices: {', '.join(f'{k}={d}' for k, d in devs.items())}; "
                         f"put them on one device (the model is on {model_device})")


def check_context(length: int, cfg: ModelConfig, what: str) -> None:
    limit = cfg.text.max_position_embeddings
    if length > limit:
        raise ValueError(f"{what} {length} exceeds the model's context of {limit} tokens (max_position_embeddings)")


def check_ids(input_ids, attention_mask, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """-> (ids long (B, L), mask long (B, L), number of image tokens, number of video tokens). One host sync for
    all value checks."""
    if input_ids is None:
        raise ValueError("input_ids is required (or texts=/images= with a processor)")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    ids, mask = input_ids.long(), attention_mask.long()
    vocab = cfg.text.vocab_size
    stats = torch.stack([
        ((ids < 0) | (ids >= vocab)).sum(), ((mask != 0) & (mask != 1)).sum(), (mask.sum(1) == 0).sum(),
        (ids == cfg.video_token_id).sum(), (ids == cfg.image_token_id).sum()]).tolist()
    bad_ids, bad_mask, empty_rows, n_video, n_image = stats
    if bad_ids:
        raise ValueError(f"input_ids holds {bad_ids} ids outside the vocabulary (0..{vocab - 1})")
    if bad_mask:
        raise ValueError("attention_mask must hold only 0 and 1")
    if empty_rows:
        raise ValueError(f"attention_mask has {empty_rows} rows without any real token")
    return ids, mask, n_image, n_video


def check_images(pixel_values, image_grid_thw, n_image_tokens: int, visual, *, kind: str = "image",
                 pixels_name: str = "pixel_values", grid_name: str = "image_grid_thw") -> torch.Tensor | None:
    """Pixels and grids agree with each other and with the image tokens; -> grid (n, 3) long or None.
    ``kind`` / ``pixels_name`` / ``grid_name`` name the video inputs when checking those."""
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError(f"{pixels_name} and {grid_name} must be given together")
    if pixel_values is None:
        if n_image_tokens:
            raise ValueError(f"input_ids holds {n_image_tokens} {kind} tokens but no {pixels_name}/{grid_name} "
                             "were given")
        return None
    visual.check_pixels(pixel_values, pixels_name)
    grids = visual.validate_grids(image_grid_thw, pixel_values.shape[0], name=grid_name, pixels=pixels_name)
    if not bool(torch.isfinite(pixel_values.sum(dtype=torch.float32))):  # any NaN/inf makes the sum non-finite
        raise ValueError(f"{pixels_name} holds NaN or inf values")
    mu = visual.cfg.merge_unit
    n_features = sum(t * h * w for t, h, w in grids) // mu
    if n_image_tokens != n_features:
        raise ValueError(f"input_ids holds {n_image_tokens} {kind} tokens but {grid_name} gives "
                         f"{n_features} {kind} features (sum t*h*w/{mu})")
    return image_grid_thw.long()


def check_videos(pixel_values_videos, video_grid_thw, second_per_grid_ts, n_video_tokens: int,
                 visual) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Video pixels, grids and ``second_per_grid_ts`` agree with each other and with the video tokens;
    -> (grid (n, 3) long, seconds (n,) float32 or None) or (None, None) without videos."""
    grid = check_images(pixel_values_videos, video_grid_thw, n_video_tokens, visual, kind="video",
                        pixels_name="pixel_values_videos", grid_name="video_grid_thw")
    if second_per_grid_ts is None:
        return grid, None  # the reference then spaces temporal positions by tokens_per_second * 1
    if grid is None:
        raise ValueError("second_per_grid_ts was given without videos (pixel_values_videos/video_grid_thw)")
    spg = second_per_grid_ts
    if isinstance(spg, (list, tuple)):
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in spg):
            raise TypeError(f"second_per_grid_ts must hold numbers, got {spg!r:.80}")
        spg = torch.tensor(spg, dtype=torch.float32)
    if not isinstance(spg, torch.Tensor):
        raise TypeError(f"second_per_grid_ts must be a tensor or a list of numbers (one per video), got "
                        f"{type(spg).__name__}")
    if spg.dtype == torch.bool or spg.is_complex():
        raise TypeError(f"second_per_grid_ts must be a real tensor, got {spg.dtype}")
    if spg.dim() != 1 or spg.shape[0] != grid.shape[0]:
        raise ValueError(f"second_per_grid_ts must have shape (n_videos,) = ({grid.shape[0]},), got "
                         f"{tuple(spg.shape)}")
    if not bool(torch.isfinite(spg.float()).all() & (spg >= 0).all()):
        raise ValueError(f"second_per_grid_ts must be finite and >= 0 (seconds per temporal grid step), got "
                         f"{spg.tolist()}")
    return grid, spg
