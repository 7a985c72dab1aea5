"""The benchmarks' models: transformers' reference with random weights and ours sharing its tensors, and the
byte-level prompt tokenizer a random-weight preset needs (it has no tokenizer.json)."""
from __future__ import annotations

import dataclasses

import torch

from qwen_batched import QwenBatchedVL
from qwen_batched.config import ModelConfig
from tests.helpers import hf_config_dict


def byte_vocab_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg``'s shapes with the tiny preset's special-token ids, so the built-in byte tokenizer can drive it
    (a random-weight preset has no tokenizer.json; its vocabulary size, and so the cost, is unchanged)."""
    from qwen_batched.config import TINY_SPECIAL_TOKENS

    sid = {tok: 256 + i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    return dataclasses.replace(
        cfg, image_token_id=sid["<|image_pad|>"], video_token_id=sid["<|video_pad|>"],
        vision_start_token_id=sid["<|vision_start|>"], vision_end_token_id=sid["<|vision_end|>"],
        eos_token_ids=(sid["<|im_end|>"], sid["<|endoftext|>"]), pad_token_id=sid["<|endoftext|>"],
        bos_token_id=sid["<|endoftext|>"]).validate()


def byte_processor(cfg: ModelConfig):
    """Our processor with the built-in byte tokenizer and ``cfg``'s special-token ids."""
    from qwen_batched.config import default_preprocessor_config
    from qwen_batched.processor import BatchedImageProcessor
    from qwen_batched.tokenizer import ByteTokenizer

    return BatchedImageProcessor.from_config_dict(
        default_preprocessor_config(), tokenizer=ByteTokenizer(), image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id, vision_start_token_id=cfg.vision_start_token_id,
        vision_end_token_id=cfg.vision_end_token_id, pad_token_id=cfg.pad_token_id)


def random_pair(cfg: ModelConfig, device, dtype, hf_attn: str = "sdpa", seed: int = 0):
    """(transformers model with random weights from ``cfg``, built on ``device`` in ``dtype``; ours sharing its
    tensors, with the byte tokenizer when the config has none)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hf_cfg = Qwen2_5_VLConfig(**hf_config_dict(cfg))
    hf_cfg._attn_implementation = hf_attn
    torch.manual_seed(seed)
    with torch.device(device):
        hf = Qwen2_5_VLForConditionalGeneration._from_config(hf_cfg, dtype=dtype).eval().requires_grad_(False)
    ours = QwenBatchedVL.from_hf(hf)
    if ours.processor is None or ours.processor.tokenizer is None:
        ours.processor = byte_processor(cfg)
    return hf, ours
