"""Per-batch vision geometry from ``image_grid_thw``: window order, rotary tables, segment plans.

Everything is built with vectorised tensor ops over all images at once (no per-image loop), on the host from the
host grids, then moved to the device; ``ModelCaches.geometry`` keeps it per grid list, so a pipeline that feeds
the same camera sizes every step builds it once.

Token order conventions (``m`` = spatial merge size, ``W`` = window side in merged tokens):
  * patch rows arrive grouped by merged unit: unit u holds m*m consecutive rows;
  * merged units of an image are in raster order over (t, h/m, w/m);
  * window order sorts units by (image, t, window row, window col), raster order inside a window.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .attention import VarlenPlan
from .config import VisionConfig


@dataclass
class VisionGeometry:
    window_index: torch.Tensor  # (n_units,) int64: unit ids in window order
    reverse_index: torch.Tensor  # (n_units,) int64: inverse permutation
    cos: torch.Tensor  # (n_patches, head_dim) fp32, window order
    sin: torch.Tensor  # (n_patches, head_dim) fp32, window order
    window_plan: VarlenPlan
    full_plan: VarlenPlan


def window_layout(grids, merge: int, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window permutation of merged units for all images (numpy on the host).

    grids: (n, 3) ints (t, h, w) in patches. Returns (window_index (U,), window_sizes (n_windows,) in units,
    unit_rows (U,), unit_cols (U,)) as int64 tensors, where rows/cols are the merged-grid coordinates of each unit.
    """
    g = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
    t, h, w = g[:, 0], g[:, 1], g[:, 2]
    hm, wm = h // merge, w // merge
    units = t * hm * wm  # (n,)
    img = np.repeat(np.arange(len(g)), units)  # (U,)
    local = np.arange(units.sum()) - (np.cumsum(units) - units)[img]
    wm_u, hm_u = wm[img], hm[img]
    col = local % wm_u
    row = (local // wm_u) % hm_u
    frame = local // (hm_u * wm_u)
    nwh, nww = -(-hm // window), -(-wm // window)  # windows per column / row (ceil)
    wins = t * nwh * nww
    key = (np.cumsum(wins) - wins)[img] + (frame * nwh[img] + row // window) * nww[img] + col // window
    window_index = np.argsort(key, kind="stable")
    sizes = np.bincount(key, minlength=int(wins.sum()))
    return tuple(torch.from_numpy(a.astype(np.int64)) for a in (window_index, sizes, row, col))


def rotary_tables(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary cos/sin: angles [row*f, col*f] (head_dim/4 freqs each), repeated twice. rows/cols: (N,)."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))  # (head_dim/4,)
    ang = torch.cat([rows[:, None].float() * inv_freq, cols[:, None].float() * inv_freq], dim=-1)  # (N, hd/2)
    ang = torch.cat([ang, ang], dim=-1)  # (N, hd)
    return ang.cos(), ang.sin()


def build_geometry(grids: tuple[tuple[int, int, int], ...], cfg: VisionConfig, device: torch.device,
                   backend: str) -> VisionGeometry:
    m, mu = cfg.spatial_merge_size, cfg.merge_unit
    window_index, win_sizes, urow, ucol = window_layout(grids, m, cfg.window_merged)
    reverse_index = torch.empty_like(window_index)
    reverse_index[window_index] = torch.arange(len(window_index))
    # patch coordinates in window order: unit (r, c) holds patches (m*r + i, m*c + j), i, j < m
    sub = torch.arange(mu)
    prow = (urow[window_index, None] * m + sub // m).flatten()
    pcol = (ucol[window_index, None] * m + sub % m).flatten()
    cos, sin = rotary_tables(prow, pcol, cfg.head_dim, cfg.rope_theta)
    frame_lens = [h * w for t, h, w in grids for _ in range(t)]
    return VisionGeometry(
        window_index=window_index.to(device),
        reverse_index=reverse_index.to(device),
        cos=cos.to(device),
        sin=sin.to(device),
        window_plan=VarlenPlan.build((win_sizes.numpy() * mu).tolist(), device, backend),
        full_plan=VarlenPlan.build(frame_lens, device, backend),
    )
