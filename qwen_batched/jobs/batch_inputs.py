"""A prepared (processor output) batch: field access, pinning, moving to the device, slicing out rows."""
from __future__ import annotations

import dataclasses

import torch

from ..batching import item_bounds


def _to_device(obj, device: torch.device, non_blocking: bool):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to_device(getattr(obj, f.name), device, non_blocking)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to_device(v, device, non_blocking) for v in obj))
    if isinstance(obj, dict):
        return {k: _to_device(v, device, non_blocking) for k, v in obj.items()}
    return obj


def _pin(obj):
    if isinstance(obj, torch.Tensor):
        return obj.pin_memory() if obj.device.type == "cpu" else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _pin(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_pin(v) for v in obj))
    if isinstance(obj, dict):
        return {k: _pin(v) for k, v in obj.items()}
    return obj


def _field(obj, name):
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _slice_inputs(inputs, idx: list[int], image_token_id: int, merge_unit: int = 4) -> dict:
    """Rows ``idx`` of a prepared batch (with their images), re-trimmed to their own left padding."""
    full_ids, full_mask = _field(inputs, "input_ids"), _field(inputs, "attention_mask")
    grid, pv = _field(inputs, "image_grid_thw"), _field(inputs, "pixel_values")
    sel = torch.tensor(idx, device=full_ids.device)
    ids, mask = full_ids[sel], full_mask[sel]
    keep = mask.bool().any(0)
    first = int(keep.nonzero()[0]) if keep.any() else 0
    out = {"input_ids": ids[:, first:], "attention_mask": mask[:, first:], "pixel_values": None,
           "image_grid_thw": None}
    mm = _field(inputs, "mm_token_type_ids")
    if mm is not None:
        out["mm_token_type_ids"] = mm[sel][:, first:]
    if grid is not None and grid.numel():
        # the images of each row, in (batch, sequence) order, from the rows' image-token counts
        tokens_per_row = (full_ids == image_token_id).sum(-1).tolist()
        bounds, patches = item_bounds(tokens_per_row, grid, merge_unit, "image")
        out["images_per_sample"] = tuple(bounds[r + 1] - bounds[r] for r in idx)
        ks = [k for r in idx for k in range(bounds[r], bounds[r + 1])]
        if ks:
            out["image_grid_thw"] = grid[torch.tensor(ks, device=grid.device)]
            out["pixel_values"] = torch.cat([pv[patches[r]:patches[r + 1]] for r in idx if bounds[r + 1] > bounds[r]])
    return out


def _model_inputs(inputs, device: torch.device) -> dict:
    return {k: _to_device(_field(inputs, k), device, True)
            for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
