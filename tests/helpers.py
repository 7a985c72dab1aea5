"""Reference models for parity tests: tiny random-weight ``transformers`` Qwen2.5-VL models."""
from __future__ import annotations

import dataclasses

import torch

from qwen_batched.config import ModelConfig, tiny_config


def tiny_model_config(**vision_overrides) -> ModelConfig:
    cfg = tiny_config()
    if vision_overrides:
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **vision_overrides))
    return cfg


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The nested ``config.json`` dict transformers 5 writes for ``cfg`` (to build reference models)."""
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "text_config": {
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
            "hidden_act": t.hidden_act, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
            "pad_token_id": cfg.pad_token_id,
            "rope_parameters": {"rope_type": "default", "mrope_section": list(t.mrope_section),
                                "rope_theta": t.rope_theta},
        },
        "vision_config": {
            "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads, "in_channels": v.in_channels, "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
            "window_size": v.window_size, "out_hidden_size": v.out_hidden_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes), "tokens_per_second": int(v.tokens_per_second) if float(v.tokens_per_second).is_integer()
            else v.tokens_per_second,  # newer transformers type-check it as an int
            "hidden_act": v.hidden_act,
        },
    }


def make_hf_model(cfg: ModelConfig | None = None, seed: int = 0, attn: str = "sdpa"):
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` (fp32, eval) for ``cfg`` (default: tiny).

    Norm weights and biases are randomised too, so a parity test notices a missing or misplaced term.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = cfg or tiny_config()
    torch.manual_seed(seed)
    hf_cfg = Qwen2_5_VLConfig(**hf_config_dict(cfg))
    hf_cfg._attn_implementation = attn
    model = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name or name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model


def saved_reference_pair(directory, device: str = "cpu"):
    """Save ``make_hf_model()`` to ``directory`` and load it back in fp32 and bf16 on ``device``.

    Loading with ``from_pretrained(dtype=...)`` keeps the rotary inverse frequencies in fp32, as users get them.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    make_hf_model().save_pretrained(directory)
    return tuple(Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, dtype=dt).to(device).eval()
                 for dt in (torch.float32, torch.bfloat16))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|"""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


IMAGE_SIZES = [(56, 56), (112, 168), (224, 84)]  # three images of different sizes in one sample


def build_batch(cfg, padding_side: str = "left", seed: int = 1):
    """Hand-built ids for a batch of three: text only; three images of different sizes; one 392x392 image.

    Returns dict(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, rows, grids) where
    rows[i] are the unpadded ids and grids[i] the (n, 3) grids of sample i.
    """
    g = torch.Generator().manual_seed(seed)
    IMG, VS, VE = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id

    def txt(n):
        return torch.randint(0, 256, (n,), generator=g).tolist()

    def image(h, w):  # pixel size -> (ids block, grid)
        grid = [1, h // 14, w // 14]
        return [VS] + [IMG] * (grid[1] * grid[2] // 4) + [VE], grid

    b = [image(h, w) for h, w in IMAGE_SIZES]
    big = image(392, 392)
    rows = [txt(23),
            txt(3) + b[0][0] + txt(2) + b[1][0] + txt(5) + b[2][0] + txt(4),
            txt(5) + big[0] + txt(6)]
    grids = [torch.zeros(0, 3, dtype=torch.long), torch.tensor([x[1] for x in b]), torch.tensor([big[1]])]
    pixels = [torch.randn(int(gr.prod(-1).sum()), cfg.vision.patch_dim, generator=g) for gr in grids]
    return dict(**pad_rows(cfg, rows, padding_side), pixel_values=torch.cat(pixels), image_grid_thw=torch.cat(grids),
                rows=rows, grids=grids, pixels=pixels)


def pad_rows(cfg, rows, padding_side="left"):
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(L - len(r), L) if padding_side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == cfg.image_token_id).long())


def model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}


def count_vision_rows(model) -> list[int]:
    """Patch rows of every vision-tower call on ``model`` from now on."""
    calls = []
    orig = model.visual.forward

    def wrapped(pv, *args, **kw):
        calls.append(pv.shape[0])
        return orig(pv, *args, **kw)

    model.visual.forward = wrapped
    return calls
