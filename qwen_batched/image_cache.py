"""Image content fingerprints, and the per-image vision-embedding cache (LRU by bytes) keyed by them.

Keys hash each image's pixel rows together with its grid, the model's identity and dtype. On the CPU the hash is
SHA-1 over the bytes (the fastest of hashlib's here; keys, not signatures). On an accelerator the rows are hashed on the device with exact integer arithmetic
(modulo 2**64, so the order of the reductions does not matter and an image gets the same key in any batch):
two independent 64-bit hashes of the element bit patterns, each row weighted by a per-column and a per-position
odd multiplier. Only the 16-byte fingerprints travel to the host, in one transfer per batch; a change of a single
element always changes the key.
"""
from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict

import torch

from .inputs import item_pixels

_PROJ_DIM = 2  # independent 64-bit hashes per image
_POS_MUL = torch.tensor([-7046029254386353131, 1442695040888963407], dtype=torch.int64)  # odd constants
_POS_ADD = torch.tensor([-4658895280553007687, 6364136223846793005], dtype=torch.int64)


class ImageFingerprints:
    """Content keys of images: equal keys <=> same pixels (bit for bit), same grid, same model and dtype."""

    def __init__(self, model_token: str):
        self.model_token = model_token
        self._proj: dict[tuple, torch.Tensor] = {}  # (device, patch_dim) -> (patch_dim, 2) odd int64 multipliers

    def keys(self, pixel_values: torch.Tensor, grids: tuple[tuple[int, int, int], ...],
             which: list[int] | None = None) -> list[bytes]:
        """One key per image (or per image of ``which``, in that order). pixel_values: (sum t*h*w, patch_dim)."""
        sizes = [t * h * w for t, h, w in grids]
        starts = [0, *itertools.accumulate(sizes)]
        which = range(len(grids)) if which is None else which
        if not which:
            return []
        prefix = f"{self.model_token}|{pixel_values.dtype}|".encode()
        if pixel_values.device.type == "cpu":
            rows = pixel_values.contiguous()
            out = []
            for i in which:
                h = hashlib.sha1(prefix + repr(grids[i]).encode(), usedforsecurity=False)  # a key, not a signature
                h.update(memoryview(rows[starts[i]:starts[i + 1]].view(torch.uint8).numpy()))  # no copy
                out.append(h.digest())
            return out
        pixel_values = item_pixels(pixel_values, grids, which)
        fp = self._device_fingerprints(pixel_values, [sizes[i] for i in which]).cpu()  # (n, 2) int64, one transfer
        return [prefix + repr(grids[i]).encode() + f.numpy().tobytes() for i, f in zip(which, fp)]

    def _device_fingerprints(self, pv: torch.Tensor, sizes: list[int], chunk: int = 4096) -> torch.Tensor:
        """(n_images, 2) int64 fingerprints of the row blocks of ``pv`` (N, patch_dim), computed on its device."""
        n, d = pv.shape
        bits = pv.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[pv.element_size()])
        cols = self._proj.get((pv.device, d))
        if cols is None:
            gen = torch.Generator(device="cpu").manual_seed(0x5EED)
            cols = (torch.randint(-2**62, 2**62, (d, _PROJ_DIM), generator=gen, dtype=torch.int64) | 1).to(pv.device)
            self._proj[(pv.device, d)] = cols
        dev = pv.device
        counts = torch.tensor(sizes, device=dev)
        img = torch.repeat_interleave(torch.arange(len(sizes), device=dev), counts)  # (N,) image of each row
        local = torch.arange(n, device=dev) - (counts.cumsum(0) - counts)[img]  # row index within its image
        pos = (local[:, None] * _POS_MUL.to(dev) + _POS_ADD.to(dev)) | 1  # (N, P) odd per-position multipliers
        fp = torch.zeros(len(sizes), _PROJ_DIM, dtype=torch.int64, device=dev)
        for r in range(0, n, chunk):  # bounded int64 temporaries
            x = bits[r:r + chunk].to(torch.int64)  # (c, d)
            rows = torch.stack([(x * cols[:, j]).sum(1) for j in range(_PROJ_DIM)], dim=1)  # (c, P), exact mod 2**64
            fp.index_add_(0, img[r:r + chunk], rows * pos[r:r + chunk])
        return fp


class ImageEmbeddingCache(ImageFingerprints):
    """Merged vision features per image key, least recently used evicted first beyond ``max_bytes``."""

    def __init__(self, max_bytes: int, model_token: str):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        super().__init__(model_token)
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._store: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()
        self.bytes = 0

    def get(self, key: bytes) -> torch.Tensor | None:
        val = self._store.get(key)
        if val is not None:
            self._store.move_to_end(key)
        return val

    def put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return  # larger than the whole budget: never cached
        value = value.clone()  # its own bytes: not a view of a batch output, nor a tensor the caller holds
        old = self._store.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        self._store[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, ev = self._store.popitem(last=False)
            self.bytes -= ev.numel() * ev.element_size()
