"""Bicubic antialiased resize with torchvision's semantics, in plain torch ops.

``torchvision.transforms.v2.functional.resize(img, size, BICUBIC, antialias=True)`` on CUDA casts a uint8 image
to float32, runs ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)``, then clamps to [0, 255],
rounds (half to even) and casts back: that float path is the one followed here, on every device. (On a CPU,
torchvision 0.29 instead calls torch's native uint8 kernel, which rounds between the two passes like PIL; the
README's parity table gives the measured gap.) That antialiased kernel is PIL's: the cubic filter with ``a = -0.5``
(not the ``-0.75`` of plain bicubic), its support widened by the scale when downscaling (``2 * in/out`` input
pixels each side instead of 2) and each output's weights normalised to sum to one. The weights are computed
in float32 with the same operation order as torch, so results agree with it to ~1e-6 (in 0..1 units), not just
with exact arithmetic.

Separable: the width is resized first, then the height (torch's order); an axis whose size does not change is
skipped (its weights would be the identity). Each axis is a banded matrix applied in blocks of ``_BLOCK``
output rows: gather the input window a block needs, then one batched matmul, so the cost stays linear in the
image size for any scale.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from .lru import LRU

_A = -0.5  # cubic coefficient of the antialiased kernel (PIL and torch)
_BLOCK = 32  # output rows per block of the banded weight matrix


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic filter (a = -0.5) in the dtype of ``x``, in torch's operation order."""
    x = x.abs()
    near = ((_A + 2) * x - (_A + 3)) * x * x + 1
    far = ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


@functools.lru_cache(maxsize=256)
def axis_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output taps of one axis: first input index ``xmin`` (n_out,) and weights (n_out, K) float32.

    Output ``i`` reads inputs ``xmin[i] .. xmin[i] + K - 1``; weights past the window's end are zero. Mirrors
    torch's float32 computation (center, support, invscale and the weight sum are float32; the ``+ 0.5``
    offsets are double, as in the C++ source).
    """
    f32 = torch.float32
    scale = (torch.tensor(float(n_in), dtype=f32) / n_out).item()  # float32 division, exact as a Python float
    support = 2.0 * scale if scale >= 1.0 else 2.0  # interp_size/2 * scale: exact in float32
    invscale = torch.tensor(1.0 / scale, dtype=f32).double() if scale >= 1.0 else torch.tensor(1.0, dtype=torch.float64)
    center = (scale * (torch.arange(n_out, dtype=torch.float64) + 0.5)).to(f32)  # (n_out,)
    xmin = ((center - support).double() + 0.5).long().clamp(min=0)  # C++ cast truncates toward zero
    xmax = ((center + support).double() + 0.5).long().clamp(max=n_in)
    size = xmax - xmin  # (n_out,)
    k = torch.arange(int(size.max()))
    pos = xmin[:, None] + k  # (n_out, K)
    arg = (((pos.to(f32) - center[:, None]).double() + 0.5) * invscale).to(f32)
    w = torch.where(k < size[:, None], _cubic(arg), torch.zeros((), dtype=f32))  # (n_out, K)
    total = w[:, 0].clone()
    for j in range(1, w.shape[1]):  # sequential float32 sum, as torch accumulates
        total += w[:, j]
    return xmin, w / total[:, None]


@functools.lru_cache(maxsize=256)
def _band_cpu(n_in: int, n_out: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked banded weights: window row indices (n_blocks * S,) and weights (n_blocks, block, S)."""
    xmin, w = axis_taps(n_in, n_out)
    n_blocks = -(-n_out // block)
    pad = n_blocks * block - n_out
    xmin = torch.cat([xmin, xmin[-1:].expand(pad)])  # padded outputs: zero weights, any window
    w = torch.cat([w, w.new_zeros(pad, w.shape[1])])
    xend = (xmin + (w != 0).int().cumsum(1).argmax(1) + 1).view(n_blocks, block)  # last nonzero tap + 1
    start = xmin.view(n_blocks, block).min(1).values  # (n_blocks,)
    span = min(int((xend.max(1).values - start).max()), n_in)
    start = start.clamp(max=n_in - span)
    offset = (xmin - start.repeat_interleave(block))[:, None] + torch.arange(w.shape[1])  # (n_blocks*block, K)
    keep = w != 0
    weights = torch.zeros(n_blocks * block, span, dtype=torch.float32)
    rows = torch.arange(n_blocks * block)[:, None].expand_as(offset)
    weights[rows[keep], offset[keep]] = w[keep]
    index = (start[:, None] + torch.arange(span)).reshape(-1)  # (n_blocks * span,)
    return index, weights.view(n_blocks, block, span)


def _device_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    xmin, w = axis_taps(n_in, n_out)
    return xmin.int(), w


class ResizeTables:
    """The resize tables of the sizes a processor meets, copied to each device once (LRU, ``capacity`` entries).

    Owned by ``BatchedImageProcessor`` (and so by the model): the host tables behind them are small and kept by
    ``functools.lru_cache``; the device copies live here, not in a module global.
    """

    def __init__(self, capacity: int = 256):
        self._store = LRU(capacity)

    def _get(self, key: tuple, build) -> tuple[torch.Tensor, ...]:
        return self._store.get(key, lambda: tuple(t.to(key[0]) for t in build()))

    def taps(self, n_in: int, n_out: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`axis_taps` on ``device`` (first index as int32): the Triton kernels' input."""
        return self._get((torch.device(device), "taps", n_in, n_out), lambda: _device_taps(n_in, n_out))

    def bands(self, size_in: tuple[int, int], size_out: tuple[int, int], device) -> tuple:
        """The banded weights ``resize_float`` uses for (H, W) -> (h, w) on ``device``: (height band or None,
        width band or None), None for an axis that keeps its size."""
        (h_in, w_in), (h, w) = size_in, size_out
        device = torch.device(device)

        def band(n_in, n_out):
            return self._get((device, "band", n_in, n_out), lambda: _band_cpu(n_in, n_out, _BLOCK))
        return (band(h_in, h) if h != h_in else None, band(w_in, w) if w != w_in else None)


@contextlib.contextmanager
def _ieee_fp32_matmul():
    """Full-precision float32 matmuls (no TF32 / bf16 shortcuts) inside the block."""
    prev = torch.get_float32_matmul_precision()
    if prev != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if prev != "highest":
            torch.set_float32_matmul_precision(prev)


def _resize_rows(x: torch.Tensor, n_out: int, band=None) -> torch.Tensor:
    """(..., n_in, L) -> (..., n_out, L) along dim -2."""
    if band is None:  # uncached: built on the host (lru-cached there) and copied for this call
        band = tuple(t.to(x.device) for t in _band_cpu(x.shape[-2], n_out, _BLOCK))
    index, weights = band  # weights: (n_blocks, B, S)
    windows = x.index_select(-2, index).unflatten(-2, (weights.shape[0], weights.shape[2]))  # (..., n_blocks, S, L)
    return torch.matmul(weights, windows).flatten(-3, -2)[..., :n_out, :]


def _resize_cols(x: torch.Tensor, n_out: int, band=None) -> torch.Tensor:
    """(..., H, n_in) -> (..., H, n_out) along dim -1, returned as a transposed view of a (..., n_out, H) tensor.

    Gathering whole rows is far faster than gathering columns, so the width pass runs on a transposed copy
    (which also does the dtype conversion).
    """
    xt = torch.empty(x.shape[:-2] + (x.shape[-1], x.shape[-2]), dtype=torch.float32, device=x.device)  # (..., n_in, H)
    xt.copy_(x.transpose(-1, -2))
    return _resize_rows(xt, n_out, band).transpose(-1, -2)


def resize_float(x: torch.Tensor, size: tuple[int, int], *, round_uint8: bool | None = None,
                 bands: tuple | None = None) -> torch.Tensor:
    """Resize (..., H, W) to (..., h, w) as float32 (torchvision's float intermediate).

    With ``round_uint8`` (default: when ``x`` is uint8) the result is clamped to [0, 255] and rounded, i.e. the
    values torchvision's uint8 output holds, still as float32. ``bands``: ``ResizeTables.bands(...)`` for these
    sizes (built for this call when None).
    """
    if round_uint8 is None:
        round_uint8 = x.dtype == torch.uint8
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if (h, w) == tuple(x.shape[-2:]):
        return x if x.dtype == torch.float32 else x.float()
    with _ieee_fp32_matmul():
        h_band, w_band = bands if bands is not None else (None, None)
        y = _resize_cols(x, w, w_band) if w != x.shape[-1] else x  # (..., H, w), any dtype until a pass runs
        y = _resize_rows(y.contiguous().float(), h, h_band) if h != x.shape[-2] else y.float()  # (..., h, w)
    if round_uint8:
        y = y.clamp_(0, 255).round_()
    return y


def resize_bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``torchvision ... resize(x, size, BICUBIC, antialias=True)`` for uint8 or float tensors (..., H, W).

    uint8 in, uint8 out (float interpolate, clamp, round); float in, float32 out (no rounding).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise TypeError("x must be a tensor of shape (..., H, W)")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise TypeError(f"x must be uint8 or floating point, got {x.dtype}")
    y = resize_float(x, size)
    return y.to(torch.uint8) if x.dtype == torch.uint8 else y
