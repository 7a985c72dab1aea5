"""Multimodal rotary embedding (M-RoPE): 3-D position ids for a whole batch, and their cos/sin.

Positions follow the reference ``get_rope_index`` (transformers 5.x), per row over unmasked tokens:
  * text tokens count up by one, identically in (t, h, w);
  * a vision item (image or video) starting at position ``s`` with merged grid (t', h', w') gets
    ``t = s + floor(frame * interval)``, ``h = s + row``, ``w = s + col`` in raster order, where
    ``interval`` is 1 for images and ``tokens_per_second * second_per_grid`` for videos;
  * the token after it sits at ``s + max(h', w')``;
  * pad (masked) positions are 0; ``rope_deltas = max_position + 1 - n_unmasked``.
Everything is computed with tensor ops over the flattened batch (cumsums and a searchsorted), no loop
over samples or items.
"""
from __future__ import annotations

import torch

from qwen_batched.kernels.rotary import rope_reference


def inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies ``1 / theta^(2i/d)``."""
    exps = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta ** exps)


def section_index(mrope_section, device=None) -> torch.Tensor:
    """(head_dim/2,) long: which of (t, h, w) drives each frequency (section i uses axis i % 3)."""
    axes = torch.arange(len(mrope_section), device=device) % 3
    return axes.repeat_interleave(torch.tensor(list(mrope_section), device=device))


def mrope_cos_sin(position_ids: torch.Tensor, freqs: torch.Tensor, sections: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (3, *S) -> cos, sin (*S, head_dim) in ``dtype`` (angles and cos/sin in fp32, then cast)."""
    pos = position_ids.movedim(0, -1)[..., sections].float()  # (*S, hd/2): the t/h/w position per frequency
    angles = pos * freqs
    angles = torch.cat((angles, angles), dim=-1)  # (*S, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


apply_rope = rope_reference  # x (..., T, H, hd), cos/sin (..., T, hd) -> x * cos + rotate_half(x) * sin


def _item_offsets(input_ids, valid, token_id, grid_thw, interval, merge):
    """For the tokens of one modality: which tokens, their (t, h, w) offsets, and the width of each item.

    Items are assigned to tokens in (batch, sequence) order, as the features are scattered.
    Returns is_tok (B, L) bool and offsets/width (B, L) long (zero off the modality's tokens).
    """
    is_tok = (input_ids == token_id) & valid
    t = grid_thw[:, 0]
    h = torch.div(grid_thw[:, 1], merge, rounding_mode="floor")
    w = torch.div(grid_thw[:, 2], merge, rounding_mode="floor")
    n = t * h * w  # (n_items,) tokens per item
    ends = n.cumsum(0)
    rank = is_tok.flatten().long().cumsum(0).view_as(input_ids) - 1  # index among this modality's tokens
    item = torch.searchsorted(ends, rank.clamp_min(0), right=True).clamp_max(len(n) - 1)  # (B, L)
    j = rank - (ends - n)[item]  # offset inside the item
    hw, wi = (h * w)[item], w[item]
    frame = torch.div(j, hw, rounding_mode="floor")
    off_t = (frame.float() * interval[item]).long()  # fp32 product then truncation, as the reference
    off_h = torch.div(j % hw, wi, rounding_mode="floor")
    off_w = j % wi
    # an item advances the 1-D counter by max(h', w'), carried on its last token so every token of the item
    # sees the item's start in the exclusive cumsum
    width = torch.where(j == n[item] - 1, torch.maximum(h, w)[item], 0)
    zero = torch.zeros_like(input_ids)
    return (is_tok, torch.where(is_tok, off_t, zero), torch.where(is_tok, off_h, zero),
            torch.where(is_tok, off_w, zero), torch.where(is_tok, width, zero))


def rope_index(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               image_grid_thw: torch.Tensor | None = None, *, image_token_id: int, spatial_merge_size: int = 2,
               video_grid_thw: torch.Tensor | None = None, video_token_id: int | None = None,
               second_per_grid_ts: torch.Tensor | None = None, tokens_per_second: float = 2.0,
               start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D M-RoPE positions of a batch.

    input_ids, attention_mask: (B, L). image_grid_thw / video_grid_thw: (n, 3) patch grids, items in
    (batch, sequence) order; their token counts must match the ids (the caller validates).
    start: (B,) long, the 1-D position each row starts from (default 0): tokens continuing a cached prompt
    (see ``generation.prefill_on_cache``). Every axis shifts by it, as the reference's running counter does.
    Returns position_ids (3, B, L) long and rope_deltas (B, 1) long (max position + 1 - real tokens, so the
    position after a row's tokens is n + rope_deltas, ``start`` included).
    """
    B, L = input_ids.shape
    dev = input_ids.device
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    width = valid.long()  # text advances by one, pads by zero
    off = torch.zeros(3, B, L, dtype=torch.long, device=dev)
    media = []
    if image_grid_thw is not None and image_grid_thw.numel():
        ones = torch.ones(len(image_grid_thw), dtype=torch.float32, device=dev)
        media.append((image_token_id, image_grid_thw, ones))
    if video_grid_thw is not None and video_grid_thw.numel():
        if video_token_id is None:
            raise ValueError("video_grid_thw given without video_token_id")
        spg = (torch.ones(len(video_grid_thw), device=dev) if second_per_grid_ts is None
               else torch.as_tensor(second_per_grid_ts, device=dev).float())
        media.append((video_token_id, video_grid_thw, tokens_per_second * spg))
    for token_id, grid, interval in media:
        is_tok, ot, oh, ow, wd = _item_offsets(input_ids, valid, token_id, grid.to(dev).long(), interval,
                                               spatial_merge_size)
        width = torch.where(is_tok, wd, width)
        off += torch.stack((ot, oh, ow))
    first = width.cumsum(1) - width  # (B, L) exclusive cumsum: 1-D position of each text token / item start
    if start is not None:
        first = first + torch.as_tensor(start, device=dev).long().view(B, 1)
    pos = (first.unsqueeze(0) + off).masked_fill(~valid, 0)  # (3, B, L)
    deltas = pos.amax(dim=(0, 2)) + 1 - valid.sum(1)
    return pos, deltas.unsqueeze(1)
