"""A prepared (processor output) batch: field access, pinning, moving to the device, slicing out rows."""
from __future__ import annotations

import dataclasses

import torch



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


def _slice_inputs(inputs, idx: list[int], image_token_id: int = 0, merge_unit: int = 4):
    """Rows ``idx`` of a prepared batch (with their images), re-trimmed to their own padding."""
    return inputs.select_rows(list(idx))


def _model_inputs(inputs, device: torch.device) -> dict:
    return {k: _to_device(_field(inputs, k), device, True)
            for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
