"""Per-image vision-embedding cache, LRU by bytes.

Keys hash each image's pixel rows together with its grid, the model's identity and dtype. On the CPU the hash is
BLAKE2b over the bytes (exact). On an accelerator the rows are reduced on the device to a 256-bit float64
random-projection fingerprint plus a byte count, so no pixels cross to the host: images that differ by as little
as one uint8 step in one pixel get different keys (the projection has no exact cancellation in float64 for
non-adversarial data); only the fingerprints travel, in one transfer per batch.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

_PROJ_DIM = 4


class ImageEmbeddingCache:
    def __init__(self, max_bytes: int, model_token: str):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.model_token = model_token
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._store: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._proj: dict[tuple, torch.Tensor] = {}  # (device, patch_dim) -> (patch_dim, P) projection

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()
        self.bytes = 0

    # ------------------------------------------------------------------ keys
    def keys(self, pixel_values: torch.Tensor, grids: tuple[tuple[int, int, int], ...]) -> list[bytes]:
        """One key per image. pixel_values: (sum t*h*w, patch_dim)."""
        sizes = [t * h * w for t, h, w in grids]
        prefix = f"{self.model_token}|{pixel_values.dtype}|".encode()
        if pixel_values.device.type == "cpu":
            rows = pixel_values.contiguous()
            out, start = [], 0
            for grid, n in zip(grids, sizes):
                h = hashlib.blake2b(prefix + repr(grid).encode(), digest_size=32)
                h.update(rows[start:start + n].view(torch.uint8).numpy().tobytes())
                out.append(h.digest())
                start += n
            return out
        fp = self._device_fingerprints(pixel_values, sizes).cpu()  # (n_images, _PROJ_DIM) float64, one transfer
        return [prefix + repr(g).encode() + f.numpy().tobytes() for g, f in zip(grids, fp)]

    def _device_fingerprints(self, pv: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        n, d = pv.shape
        col = self._proj.get((pv.device, d))
        if col is None:
            gen = torch.Generator(device="cpu").manual_seed(0x5EED)
            col = torch.randn(d, _PROJ_DIM, generator=gen, dtype=torch.float64).to(pv.device)
            self._proj[(pv.device, d)] = col
        row_proj = pv.double() @ col  # (N, P)
        # position weights so that permuted rows hash differently: row r of its image gets 1 + r * phi
        img = torch.repeat_interleave(torch.arange(len(sizes), device=pv.device),
                                      torch.tensor(sizes, device=pv.device))
        starts = torch.tensor([0] + sizes[:-1], device=pv.device).cumsum(0)
        local = torch.arange(n, device=pv.device) - starts[img]
        w = 1.0 + local.double() * 0.6180339887498949
        fp = torch.zeros(len(sizes), _PROJ_DIM, dtype=torch.float64, device=pv.device)
        fp.index_add_(0, img, row_proj * w[:, None])
        return fp

    # ------------------------------------------------------------------ LRU
    def get(self, key: bytes) -> torch.Tensor | None:
        val = self._store.get(key)
        if val is not None:
            self._store.move_to_end(key)
        return val

    def put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return  # larger than the whole budget: never cached
        old = self._store.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        self._store[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, ev = self._store.popitem(last=False)
            self.bytes -= ev.numel() * ev.element_size()
