"""Result types of ``QwenBatchedVL.extract_features`` and ``QwenBatchedVL.generate``."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FeatureOutput:
    """Decoder hidden states of a batch.

    hidden_states: one (B, L, D) tensor per entry of ``layers`` (same order); pad positions are zero.
    attention_mask: (B, L) long, 1 for real tokens.
    image_mask: (B, L) bool, True where an image token sits.
    vision_embeds: (n_image_tokens, D) merged vision features scattered into the sequence, or None.
    layers: the requested indices, non-negative (0 = embeddings, i = output of layer i).
    video_mask: (B, L) bool, True where a video token sits.
    video_embeds: (n_video_tokens, D) merged video features scattered into the sequence, or None.
    """
    hidden_states: tuple[torch.Tensor, ...]
    attention_mask: torch.Tensor
    image_mask: torch.Tensor
    vision_embeds: torch.Tensor | None
    layers: tuple[int, ...]
    video_mask: torch.Tensor | None = None
    video_embeds: torch.Tensor | None = None


@dataclass
class GenerateOutput:
    """New tokens of a batch.

    sequences: (B, max_new_tokens) long, padded with the pad id after a sequence stops.
    lengths: (B,) long, tokens generated per sequence (a final EOS included).
    texts: decoded ``sequences[b, :lengths[b]]`` (special tokens skipped), or None without a tokenizer.
    """
    sequences: torch.Tensor
    lengths: torch.Tensor
    texts: list[str] | None = None
