"""Argument checks of the public API: each bad input gets a ValueError/TypeError naming the argument and what
was expected, before any work is done.

``validate_inputs`` is the one pass over a batch: shapes and dtypes on the host, then every value check in one
read from the device (plus one for the grids when the host does not know them yet). It returns the batch on the
model's device with a ``BatchLayout``; nothing downstream checks or reads again.
"""
from __future__ import annotations

import itertools

import torch

from .config import ModelConfig, VisionConfig
from .inputs import BatchLayout, Grid, ModelInputs


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_dtype(dtype) -> torch.dtype | None:
    """None, a floating torch.dtype or its name ('bfloat16', 'torch.float32') -> torch.dtype or None."""
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.replace("torch.", ""), None), torch.dtype):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise TypeError(f"dtype must be a floating-point dtype, a torch.dtype or its name (e.g. 'bfloat16'), got {dtype!r}")


def resolve_layers(layers, n_layers: int) -> tuple[int, ...]:
    """``layers`` (None = all, an int or ints, negatives from the end) -> indices into 0..n_layers."""
    n = n_layers
    if layers is None:
        return tuple(range(n + 1))
    if is_int(layers):
        layers = [layers]
    if not isinstance(layers, (list, tuple, range)):
        raise TypeError(f"layers must be None, an int or a sequence of ints, got {type(layers).__name__}")
    if len(layers) == 0:
        raise ValueError("layers must name at least one hidden state (or be None for all)")
    for i in layers:
        if not is_int(i):
            raise TypeError(f"layers must hold ints, got {i!r}")
        if not -(n + 1) <= i <= n:
            raise ValueError(f"layers index {i} out of range: hidden states are 0..{n} (or -{n + 1}..-1)")
    return tuple(i % (n + 1) for i in layers)


def resolve_eos(eos_token_id, cfg: ModelConfig) -> tuple[int, ...]:
    """None = the checkpoint's EOS ids; an int or a list overrides them; [] never stops."""
    if eos_token_id is None:
        return tuple(cfg.eos_token_ids)
    ids = [eos_token_id] if is_int(eos_token_id) else eos_token_id
    if not isinstance(ids, (list, tuple)) or not all(is_int(i) for i in ids):
        raise TypeError(f"eos_token_id must be None, an int or a list of ints, got {eos_token_id!r}")
    if any(not 0 <= i < cfg.text.vocab_size for i in ids):
        raise ValueError(f"eos_token_id {eos_token_id!r} outside the vocabulary (0..{cfg.text.vocab_size - 1})")
    return tuple(ids)


def check_sampling(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def check_generate_args(max_new_tokens, temperature, top_k, top_p, seed, compile) -> None:
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    if seed is not None and not is_int(seed) and not (isinstance(seed, (list, tuple)) and all(map(is_int, seed))):
        raise TypeError(f"seed must be an int, a list of ints (one per row) or None, got {seed!r:.80}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {type(compile).__name__}")


def row_seeds(seed, batch: int) -> list[int]:
    """One 63-bit seed per row. An int seeds row b with (seed, b); a list gives each row its own; None draws a
    base seed from torch's global generator (so ``torch.manual_seed`` still makes runs repeatable)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise ValueError(f"seed has {len(seed)} values but the batch has {batch} rows; give one int for all "
                             "rows or one per row")
        return [s & (2**63 - 1) for s in seed]
    base = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed
    return [(base * 0x9E3779B1 + b) & (2**63 - 1) for b in range(batch)]


def check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_budget(max_batch_tokens) -> int | None:
    if max_batch_tokens is None:
        return None
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be a positive int or None, got {max_batch_tokens!r}")
    return max_batch_tokens


def check_context(length: int, cfg: ModelConfig, what: str) -> None:
    limit = cfg.text.max_position_embeddings
    if length > limit:
        raise ValueError(f"{what} {length} exceeds the model's context of {limit} tokens (max_position_embeddings)")


# ---------------------------------------------------------------------------------------------- pixels and grids
def check_pixels(pixel_values, cfg: VisionConfig, name: str = "pixel_values") -> None:
    """Type, shape and dtype of patch rows (no device read)."""
    pd = cfg.patch_dim
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.dim() != 2 or pixel_values.shape[1] != pd:
        raise ValueError(f"{name} must have shape (n_patches, {pd}), got {tuple(pixel_values.shape)}")
    if not pixel_values.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point (normalized patches), got {pixel_values.dtype}")


def check_grid_tensor(grid_thw, name: str = "image_grid_thw") -> None:
    items = "n_videos" if "video" in name else "n_images"
    if not isinstance(grid_thw, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({items}, 3), got {type(grid_thw).__name__}")
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] == 0:
        raise ValueError(f"{name} must have shape ({items} >= 1, 3), got {tuple(grid_thw.shape)}")
    if grid_thw.dtype.is_floating_point or grid_thw.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {grid_thw.dtype}")


def check_grids(grids: tuple[Grid, ...], n_rows: int, cfg: VisionConfig, name: str = "image_grid_thw",
                pixels: str = "pixel_values") -> None:
    """Host grids: each (t >= 1, h, w) with h, w multiples of the merge size, together covering the pixel rows."""
    m = cfg.spatial_merge_size
    bad = [g for g in grids if g[0] < 1 or g[1] < m or g[2] < m or g[1] % m or g[2] % m]
    if bad:
        raise ValueError(f"{name} rows must be (t >= 1, h, w) with h, w positive multiples of "
                         f"spatial_merge_size={m}; got {bad[:3]}")
    total = sum(t * h * w for t, h, w in grids)
    if total != n_rows:
        raise ValueError(f"{pixels} has {n_rows} patch rows but {name} describes {total} (sum of t*h*w)")


def host_grids(grid_thw: torch.Tensor) -> tuple[Grid, ...]:
    return tuple(tuple(g) for g in grid_thw.tolist())


def checked_vision_inputs(pixel_values, grid_thw, cfg: VisionConfig) -> tuple[Grid, ...]:
    """``encode_images``' checks: pixels, grids (one read) and finiteness (one read) -> host grids."""
    check_pixels(pixel_values, cfg)
    check_grid_tensor(grid_thw)
    grids = host_grids(grid_thw)
    check_grids(grids, pixel_values.shape[0], cfg)
    if not bool(torch.isfinite(pixel_values.sum(dtype=torch.float32))):
        raise ValueError("pixel_values holds NaN or inf values")
    return grids


# ---------------------------------------------------------------------------------------------- whole batch


def validate_inputs(inputs: ModelInputs, cfg: ModelConfig, device: torch.device) -> ModelInputs:
    """Check a whole batch before any work -> the batch on ``device`` (ids/mask int64) with its ``BatchLayout``.

    Host checks first (types, shapes, grids the host already knows), then all value checks in one device read:
    ids in the vocabulary, a 0/1 mask with a real token in every row, finite pixels and ``second_per_grid_ts``,
    and per row its real span and its image/video token counts, which assign the items to rows.
    """
    ids, mask = inputs.input_ids, inputs.attention_mask
    _check_ids(ids, mask)
    if mask is None:
        mask = torch.ones_like(ids)
    devs = {k: getattr(inputs, k).device for k in inputs.keys()}  # the fields holding tensors
    if len(set(devs.values())) > 1:
        raise ValueError(f"input tensors are on different devices: {', '.join(f'{k}={d}' for k, d in devs.items())}; "
                         f"put them on one device (the model is on {device})")
    check_context(ids.shape[1], cfg, "input length")
    known = inputs.layout
    img = _media(inputs.pixel_values, inputs.image_grid_thw, known.image_grids if known else None, cfg.vision,
                 "pixel_values", "image_grid_thw")
    vid = _media(inputs.pixel_values_videos, inputs.video_grid_thw, known.video_grids if known else None,
                 cfg.vision, "pixel_values_videos", "video_grid_thw")
    spg = _check_seconds(inputs.second_per_grid_ts, vid)
    # grids the host takes from a layout are checked against their tensors in the one read below (a batch
    # edited with dataclasses.replace keeps its old layout)
    from_layout = [(m[0], m[1], name) for m, name in ((img, "image_grid_thw"), (vid, "video_grid_thw"))
                   if m is not None and m[0] is not None]
    unknown = [g for g, m in ((inputs.image_grid_thw, img), (inputs.video_grid_thw, vid)) if m is not None and m[0] is None]
    if unknown:  # one read for all grids the host does not know yet
        flat = host_grids(torch.cat([g.long() for g in unknown]) if len(unknown) > 1 else unknown[0])
        if img is not None and img[0] is None:
            img, flat = (flat[:inputs.image_grid_thw.shape[0]], img[1]), flat[inputs.image_grid_thw.shape[0]:]
        if vid is not None and vid[0] is None:
            vid = (flat, vid[1])
    if img is not None:
        check_grids(img[0], inputs.pixel_values.shape[0], cfg.vision)
    if vid is not None:
        check_grids(vid[0], inputs.pixel_values_videos.shape[0], cfg.vision, "video_grid_thw", "pixel_values_videos")

    # ---- the one read of values
    B, L = ids.shape
    idl, real = ids.long(), mask != 0
    cols = torch.arange(L, device=ids.device)
    scalars = [((idl < 0) | (idl >= cfg.text.vocab_size)).sum(), ((mask != 0) & (mask != 1)).sum()]
    finite = []
    for pv in (inputs.pixel_values, inputs.pixel_values_videos):
        if pv is not None:
            finite.append(torch.isfinite(pv.sum(dtype=torch.float32)))
    if spg is not None:
        finite.append((torch.isfinite(spg) & (spg >= 0)).all())
    per_row = [torch.where(real, cols, L).amin(1), torch.where(real, cols, -1).amax(1), real.sum(1),
               ((idl == cfg.image_token_id) & real).sum(1), ((idl == cfg.video_token_id) & real).sum(1)]
    head = torch.stack([s.double() for s in scalars + finite])
    stats = torch.cat([head, torch.stack(per_row).double().flatten(),
                       *(g.to(ids.device).flatten().double() for _, g, _ in from_layout)]).tolist()
    n_head = len(scalars) + len(finite)
    bad_ids, bad_mask = stats[:2]
    ok_media = stats[2:n_head]
    first, last, n_real, img_tok, vid_tok = (stats[n_head + i * B:n_head + (i + 1) * B] for i in range(5))
    at = n_head + 5 * B
    for grids, g, name in from_layout:
        read = [tuple(int(v) for v in stats[at + 3 * k:at + 3 * k + 3]) for k in range(len(grids))]
        at += 3 * len(grids)
        if read != [tuple(x) for x in grids]:
            raise ValueError(f"{name} {read} disagrees with the batch's layout {list(grids)} (a ModelInputs edited "
                             "with dataclasses.replace keeps its old layout: build it again with "
                             "ModelInputs(...) or processor.prepare)")
    if bad_ids:
        raise ValueError(f"input_ids holds {int(bad_ids)} ids outside the vocabulary (0..{cfg.text.vocab_size - 1})")
    if bad_mask:
        raise ValueError("attention_mask must hold only 0 and 1")
    empty = sum(f >= L for f in first)
    if empty:
        raise ValueError(f"attention_mask has {empty} rows without any real token")
    names = [n for n, pv in (("pixel_values", inputs.pixel_values), ("pixel_values_videos", inputs.pixel_values_videos))
             if pv is not None] + (["second_per_grid_ts"] if spg is not None else [])
    for name, ok in zip(names, ok_media):
        if not ok:
            raise ValueError(f"{name} holds NaN or inf values" if name != "second_per_grid_ts" else
                             "second_per_grid_ts must be finite and >= 0 (seconds per temporal grid step)")
    mu = cfg.vision.merge_unit
    img_rows = _assign(list(map(int, img_tok)), img[0] if img else (), mu, "image", "pixel_values", "image_grid_thw")
    vid_rows = _assign(list(map(int, vid_tok)), vid[0] if vid else (), mu, "video", "pixel_values_videos",
                       "video_grid_thw")

    layout = BatchLayout(first=tuple(map(int, first)), last=tuple(map(int, last)), n_real=tuple(map(int, n_real)),
                         image_grids=img[0] if img else (), images_per_row=tuple(img_rows),
                         video_grids=vid[0] if vid else (), videos_per_row=tuple(vid_rows) if vid else ())
    mm = inputs.mm_token_type_ids
    return ModelInputs(
        input_ids=idl.to(device), attention_mask=mask.long().to(device),
        mm_token_type_ids=None if mm is None else mm.to(device),
        pixel_values=None if img is None else inputs.pixel_values.to(device),
        image_grid_thw=None if img is None else inputs.image_grid_thw.long().to(device),
        images_per_sample=layout.images_per_row,
        pixel_values_videos=None if vid is None else inputs.pixel_values_videos.to(device),
        video_grid_thw=None if vid is None else inputs.video_grid_thw.long().to(device),
        second_per_grid_ts=None if spg is None else spg.to(device),
        videos_per_sample=layout.videos_per_row, layout=layout)


def _check_ids(input_ids, attention_mask) -> None:
    if input_ids is None:
        raise ValueError("input_ids is required (or texts=/images= with a processor)")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")


def _media(pixels, grid_thw, known: tuple[Grid, ...] | None, cfg: VisionConfig, pixels_name: str, grid_name: str):
    """(host grids or None if still unknown, grid tensor) for one modality, or None without it."""
    if (pixels is None) != (grid_thw is None):
        raise ValueError(f"{pixels_name} and {grid_name} must be given together")
    if pixels is None:
        return None
    check_pixels(pixels, cfg, pixels_name)
    check_grid_tensor(grid_thw, grid_name)
    if known and len(known) == grid_thw.shape[0]:
        return known, grid_thw
    return None, grid_thw


def _check_seconds(second_per_grid_ts, vid) -> torch.Tensor | None:
    """``second_per_grid_ts`` as a float32 (n_videos,) tensor (values are checked in the batch read)."""
    spg = second_per_grid_ts
    if spg is None:
        return None  # the reference then spaces temporal positions by tokens_per_second * 1
    if vid is None:
        raise ValueError("second_per_grid_ts was given without videos (pixel_values_videos/video_grid_thw)")
    if isinstance(spg, (list, tuple)):
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in spg):
            raise TypeError(f"second_per_grid_ts must hold numbers, got {spg!r:.80}")
        spg = torch.tensor(spg, dtype=torch.float32)
    if not isinstance(spg, torch.Tensor):
        raise TypeError(f"second_per_grid_ts must be a tensor or a list of numbers (one per video), got "
                        f"{type(spg).__name__}")
    if spg.dtype == torch.bool or spg.is_complex():
        raise TypeError(f"second_per_grid_ts must be a real tensor, got {spg.dtype}")
    n = vid[1].shape[0]
    if spg.dim() != 1 or spg.shape[0] != n:
        raise ValueError(f"second_per_grid_ts must have shape (n_videos,) = ({n},), got {tuple(spg.shape)}")
    return spg.float()


def _assign(tokens_per_row: list[int], grids: tuple[Grid, ...], merge_unit: int, kind: str, pixels: str,
            grid_name: str) -> list[int]:
    """Items belong to rows in (row, sequence) order: how many items each row holds. A row whose tokens are not
    a whole number of items, or a total that differs from the grids', raises."""
    total = sum(tokens_per_row)
    n_features = sum(t * h * w for t, h, w in grids) // merge_unit
    if not grids and total:
        raise ValueError(f"input_ids holds {total} {kind} tokens but no {pixels}/{grid_name} were given")
    if total != n_features:
        raise ValueError(f"input_ids holds {total} {kind} tokens but {grid_name} gives {n_features} {kind} features "
                         f"(sum t*h*w/{merge_unit})")
    ends = list(itertools.accumulate(t * h * w // merge_unit for t, h, w in grids))
    counts, k, got = [], 0, 0
    for r, n in enumerate(tokens_per_row):
        start = k
        target = got + n
        while got < target and k < len(ends):
            got = ends[k]
            k += 1
        if got != target:
            raise ValueError(f"row {r} of input_ids holds {n} {kind} tokens, which is not a whole number of {kind}s "
                             f"of {grid_name} taken in (batch, sequence) order (each {kind} has t*h*w/{merge_unit} "
                             "tokens, all in one row)")
        counts.append(k - start)
    return counts
