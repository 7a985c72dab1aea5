"""``ModelInputs``: the one batch type, from the processor (or keyword tensors) to the decoder.

Dimensions: B rows, L columns (padded tokens), N patch rows (sum of t*h*w over the items), C*T*P*P columns per
patch row; an item is an image or a video, items in (row, sequence) order.

A batch that went through validation carries a ``BatchLayout``: host-side facts (grids, items per row, the span
of real tokens of each row) read from the device once, so that slicing rows, planning sub-batches and building
the vision geometry never read the device again.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class BatchLayout:
    """What the host knows about a batch: per-row token spans and items, and every item's grid."""
    first: tuple[int, ...]  # (B,) first real column of each row
    last: tuple[int, ...]  # (B,) last real column of each row
    n_real: tuple[int, ...]  # (B,) real tokens of each row (the span minus any masked holes inside it)
    image_grids: tuple[Grid, ...]  # (n_images,) (t, h, w) in patches
    images_per_row: tuple[int, ...]  # (B,)
    video_grids: tuple[Grid, ...] = ()
    videos_per_row: tuple[int, ...] = ()

    @property
    def lengths(self) -> list[int]:
        """Real span of each row (last - first + 1): what the row costs in a padded batch."""
        return [b - a + 1 for a, b in zip(self.first, self.last)]

    @property
    def run_starts(self) -> list[int] | None:
        """Each row's first real column when every row's real tokens are one run (no masked holes, the usual
        case), else None: the real tokens can then be indexed from host numbers alone."""
        return list(self.first) if list(self.n_real) == self.lengths else None

    def span(self, rows: Sequence[int]) -> tuple[int, int]:
        """Columns [lo, hi) that hold a real token of at least one of ``rows``."""
        return min(self.first[r] for r in rows), max(self.last[r] for r in rows) + 1


@dataclass
class ModelInputs:
    """Model-ready inputs for a batch of B prompts.

    input_ids, attention_mask, mm_token_type_ids: (B, L) int64 (mm type 0 text, 1 image token, 2 video token;
    padding 0; mm_token_type_ids may be None).
    pixel_values: (N_img, C*T*P*P) float32 and image_grid_thw: (n_images, 3) int64, images in row-major order;
    both None without images. images_per_sample: images of each row.
    pixel_values_videos: (N_vid, C*T*P*P) float32, video_grid_thw: (n_videos, 3) int64 and second_per_grid_ts:
    (n_videos,) float32 (temporal_patch_size / fps: seconds covered by one temporal grid step), videos in
    row-major order; all None without videos. videos_per_sample: videos of each row.
    layout: host-side facts once validated (or built by the processor), else None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    images_per_sample: tuple[int, ...] = ()
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    second_per_grid_ts: torch.Tensor | None = None
    videos_per_sample: tuple[int, ...] = ()
    layout: BatchLayout | None = dataclasses.field(default=None, repr=False, compare=False)

    TENSORS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
               "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device=None, dtype: torch.dtype | None = None, non_blocking: bool = False) -> "ModelInputs":
        """Every tensor on ``device``; ``dtype`` (if given) applies to the pixels only."""
        moved = {}
        for name in self.TENSORS:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                pixels = name in ("pixel_values", "pixel_values_videos")
                moved[name] = value.to(device=device, dtype=dtype if pixels else None, non_blocking=non_blocking)
        return dataclasses.replace(self, **moved)

    def pin_memory(self) -> "ModelInputs":
        """Page-locked copies of the CPU tensors (for asynchronous copies to a GPU)."""
        return dataclasses.replace(self, **{n: getattr(self, n).pin_memory() for n in self.TENSORS
                                            if isinstance(getattr(self, n), torch.Tensor)
                                            and getattr(self, n).device.type == "cpu"})

    def keys(self) -> list[str]:
        return [n for n in self.TENSORS if isinstance(getattr(self, n), torch.Tensor)]

    def __getitem__(self, name: str):
        return getattr(self, name)

    def select_rows(self, rows: Sequence[int] | range) -> "ModelInputs":
        """Rows ``rows`` (in that order) with their own images and videos, trimmed of the pad columns they all
        share. Needs a ``layout`` (set by the processor and by validation); reads nothing from the device."""
        lay = self.layout
        if lay is None:
            raise ValueError("select_rows needs a batch with a layout: one made by the processor, or validated by "
                             "the model (model.validate(inputs))")
        rows = list(rows)
        B = self.batch_size
        if not rows or any(not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < B for r in rows):
            raise ValueError(f"rows must be a non-empty sequence of row indices in 0..{B - 1}, got {rows!r:.80}")
        lo, hi = lay.span(rows)
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        sel = slice(rows[0], rows[0] + len(rows)) if contiguous else torch.tensor(rows, device=self.input_ids.device)
        out = {name: getattr(self, name)[sel][:, lo:hi] if getattr(self, name) is not None else None
               for name in ("input_ids", "attention_mask", "mm_token_type_ids")}
        pv, grid, img_grids = _select_items(self.pixel_values, self.image_grid_thw, lay.image_grids,
                                            lay.images_per_row, rows)
        pvv, vgrid, vid_grids = _select_items(self.pixel_values_videos, self.video_grid_thw, lay.video_grids,
                                              lay.videos_per_row, rows)
        spg = None
        if vgrid is not None and self.second_per_grid_ts is not None:
            spg = self.second_per_grid_ts[_item_index(lay.videos_per_row, rows, self.second_per_grid_ts.device)]
        layout = BatchLayout(
            first=tuple(lay.first[r] - lo for r in rows), last=tuple(lay.last[r] - lo for r in rows),
            n_real=tuple(lay.n_real[r] for r in rows), image_grids=img_grids,
            images_per_row=tuple(lay.images_per_row[r] for r in rows),
            video_grids=vid_grids, videos_per_row=tuple(lay.videos_per_row[r] for r in rows) if lay.videos_per_row
            else ())
        return ModelInputs(**out, pixel_values=pv, image_grid_thw=grid,
                           images_per_sample=layout.images_per_row, pixel_values_videos=pvv, video_grid_thw=vgrid,
                           second_per_grid_ts=spg, videos_per_sample=layout.videos_per_row, layout=layout)


def _item_index(per_row: Sequence[int], rows: list[int], device) -> torch.Tensor:
    """Indices of the items of ``rows`` (row order, then sequence order)."""
    starts = [0, *itertools.accumulate(per_row)]
    return torch.tensor([k for r in rows for k in range(starts[r], starts[r + 1])], dtype=torch.long, device=device)


def item_pixels(pixels: torch.Tensor, grids: Sequence[Grid], items: Sequence[int]) -> torch.Tensor:
    """The patch rows of the items ``items`` (host indices into ``grids``, in that order) of pixels
    (sum t*h*w, patch_dim): a view when they are one run in order, else one index_select."""
    offset = [0, *itertools.accumulate(t * h * w for t, h, w in grids)]
    items = list(items)
    if any(not 0 <= k < len(grids) for k in items):
        raise ValueError(f"items must index the {len(grids)} grids (0..{len(grids) - 1}), got {items}")
    if items and items == list(range(items[0], items[-1] + 1)):
        return pixels[offset[items[0]]:offset[items[-1] + 1]]
    if not items:
        return pixels[:0]
    idx = torch.cat([torch.arange(offset[k], offset[k + 1]) for k in items]).to(pixels.device)
    return pixels.index_select(0, idx)


def _select_items(pixels: torch.Tensor | None, grid_thw: torch.Tensor | None, grids: tuple[Grid, ...],
                  per_row: Sequence[int], rows: list[int]):
    """(pixels, grid_thw, host grids) of the items of ``rows``; (None, None, ()) when they hold none. A
    contiguous run of items is sliced (a view), anything else gathered in one index_select."""
    if grid_thw is None or not per_row:
        return None, None, ()
    starts = [0, *itertools.accumulate(per_row)]
    items = [k for r in rows for k in range(starts[r], starts[r + 1])]
    if not items:
        return None, None, ()
    if items == list(range(items[0], items[-1] + 1)):
        k0, k1 = items[0], items[-1] + 1
        return item_pixels(pixels, grids, items), grid_thw[k0:k1], grids[k0:k1]
    return (item_pixels(pixels, grids, items), grid_thw[torch.tensor(items, device=grid_thw.device)],
            tuple(grids[k] for k in items))
