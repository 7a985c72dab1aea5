"""Everything the model keeps between calls, in one place with bounded sizes.

* vision geometry per (grids, device, backend): window order, rotary tables, segment plans (LRU);
* the decoder's M-RoPE tables per device (fp32, never cast with the model);
* the compiled decode step and its static KV cache (one, for the last (batch, length, dtype, device));
* the image fingerprinter (content keys of images, to find rows sharing an image without an image cache).
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .geometry import VisionGeometry, build_geometry
from .image_cache import ImageFingerprints
from .lru import LRU
from .rope import inv_freq, section_index


class ModelCaches:
    def __init__(self, cfg: ModelConfig, geometry_capacity: int = 64):
        self.cfg = cfg
        self._geometry = LRU(geometry_capacity)
        self._rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.decode = None  # (key, StaticDecoder, compiled step): see generation.decode_step
        self.fingerprints = ImageFingerprints(model_token="")

    def geometry(self, grids: tuple[tuple[int, int, int], ...], device: torch.device, backend: str) -> VisionGeometry:
        """The vision geometry of a grid list (host tuples), built once and kept while it is in use."""
        return self._geometry.get((grids, str(device), backend),
                                  lambda: build_geometry(grids, self.cfg.vision, device, backend))

    def rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 inverse frequencies (hd/2,), section axis index (hd/2,)) of the decoder on ``device``."""
        key = str(device)
        if key not in self._rope:
            t = self.cfg.text
            self._rope[key] = (inv_freq(t.head_dim, t.rope_theta, device), section_index(t.mrope_section, device))
        return self._rope[key]

    def clear(self) -> None:
        self._geometry.clear()
        self._rope.clear()
        self.decode = None
