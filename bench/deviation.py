"""Numerical-deviation report: ours vs transformers' Qwen2.5-VL at every stage, in fp32 and bf16.

Stages: pixel values (our processor vs the reference's PIL processor, and its torchvision one where it
imports), vision features, every decoder hidden state, logits (non-pad positions) and greedy tokens.
Per stage: max abs, mean abs and mean relative error (mean |ours - ref| / mean |ref|).

bf16 rows compare against the fp32 reference and show the reference's own bf16 error next to ours, so a
reader sees how much of the deviation is bf16 itself. Greedy decoding in bf16 reports token agreement with the
bf16 and fp32 references.

  python bench/deviation.py                       # tiny config, CPU
  python bench/deviation.py --device cuda --config 3b --out bench/results
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import header, markdown_table  # noqa: E402
from qwen_batched import ModelConfig, QwenBatchedVL  # noqa: E402
from tests.helpers import hf_config_dict  # noqa: E402


def stats(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    o, r = ours.double(), ref.double()
    d = (o - r).abs()
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(),
            "mean_rel": (d.mean() / r.abs().mean().clamp_min(1e-30)).item(),
            "max_rel": (d.max() / r.abs().max().clamp_min(1e-30)).item()}


def build_reference(cfg: ModelConfig, device, seed: int = 0):
    """Random-weight fp32 reference and its bf16 copy (rotary buffers kept fp32, as from_pretrained does)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hf_cfg = Qwen2_5_VLConfig(**hf_config_dict(cfg))
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        hf32 = Qwen2_5_VLForConditionalGeneration._from_config(hf_cfg, dtype=torch.float32).eval()
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    for (name, b32), (_, b16) in zip(hf32.named_buffers(), hf16.named_buffers()):
        if "inv_freq" in name:
            b16.data = b32.data.clone()
    return hf32, hf16


def synthetic_images(seed: int = 0):
    """Smooth uint8 camera-like frames of mixed sizes: (sizes needing a resize and ones that don't)."""
    g = torch.Generator().manual_seed(seed)

    def frame(h, w):
        y = torch.linspace(0, 1, h)[:, None]
        x = torch.linspace(0, 1, w)[None, :]
        base = torch.stack([y * x, (1 - y) * x, y * (1 - x)])  # (3, h, w)
        noise = torch.rand(3, h // 8 + 1, w // 8 + 1, generator=g)
        noise = torch.nn.functional.interpolate(noise[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        return ((0.6 * base + 0.4 * noise) * 255).round().clamp(0, 255).to(torch.uint8)
    return [[], [frame(392, 392)], [frame(224, 224), frame(300, 200)]]


def build_inputs(model: QwenBatchedVL, images, seed: int = 0):
    """Token ids built by hand (works for any vocabulary): random text, one vision block per image, left pad."""
    cfg = model.cfg
    proc = model.processor
    flat = [im for sample in images for im in sample]
    pv, grid = proc.preprocess_images(flat)[:2]
    g = torch.Generator().manual_seed(seed)
    specials = (cfg.pad_token_id, cfg.bos_token_id, cfg.vision_start_token_id, cfg.image_token_id, *cfg.eos_token_ids)
    lo, hi = 0, min(cfg.text.vocab_size, 1000, *specials)  # plain text ids only
    rows, k = [], 0
    for sample in images:
        ids = torch.randint(lo, hi, (5,), generator=g).tolist()
        for _ in sample:
            t, h, w = grid[k].tolist()
            ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // 4) + [cfg.vision_end_token_id]
            k += 1
        ids += torch.randint(lo, hi, (7 + 3 * len(rows),), generator=g).tolist()
        rows.append(ids)
    L = max(map(len, rows))
    input_ids = torch.full((len(rows), L), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pv.float(), "image_grid_thw": grid,
            "mm_token_type_ids": (input_ids == cfg.image_token_id).long()}


def pixel_rows(model, images) -> list[dict]:
    """Our processor vs HF's PIL processor (and torchvision's where it imports) on the same uint8 frames."""
    import numpy as np
    from PIL import Image

    rows = []
    flat = [im for sample in images for im in sample]
    ours_pv, ours_grid = model.processor.preprocess_images(flat)[:2]
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in flat]
    try:
        from transformers import Qwen2VLImageProcessorPil as PilProc
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as PilProc
    ref = PilProc(min_pixels=model.processor.min_pixels, max_pixels=model.processor.max_pixels)(pil, return_tensors="pt")
    assert torch.equal(ref["image_grid_thw"].cpu(), ours_grid.cpu()), "image_grid_thw differs from the reference"
    rows.append({"stage": "pixel_values", "pair": "ours vs HF PIL processor", "precision": "fp32",
                 **stats(ours_pv.cpu(), ref["pixel_values"])})
    try:
        import torchvision  # noqa: F401
        from transformers import Qwen2VLImageProcessor

        tv = Qwen2VLImageProcessor(min_pixels=model.processor.min_pixels, max_pixels=model.processor.max_pixels)
        ref_tv = tv([np.asarray(p) for p in pil], return_tensors="pt")
        rows.append({"stage": "pixel_values", "pair": "ours vs HF torchvision processor", "precision": "fp32",
                     **stats(ours_pv.cpu(), ref_tv["pixel_values"])})
    except Exception as e:  # torchvision missing or broken with this torch
        rows.append({"stage": "pixel_values", "pair": "ours vs HF torchvision processor", "precision": "fp32",
                     "note": f"skipped: torchvision unavailable ({type(e).__name__})"})
    return rows


@torch.inference_mode()
def reference_outputs(hf, b, n_new: int):
    pv = b["pixel_values"].to(hf.dtype)
    vis = hf.model.get_image_features(pixel_values=pv, image_grid_thw=b["image_grid_thw"]).pooler_output
    out = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=pv,
             image_grid_thw=b["image_grid_thw"], mm_token_type_ids=b["mm_token_type_ids"], output_hidden_states=True)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = hf.config.text_config.pad_token_id
    gen = hf.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=pv,
                      image_grid_thw=b["image_grid_thw"], mm_token_type_ids=b["mm_token_type_ids"],
                      max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    return {"vision": torch.cat(list(vis)), "hidden": out.hidden_states, "logits": out.logits,
            "tokens": gen[:, b["input_ids"].shape[1]:]}


@torch.inference_mode()
def our_outputs(model: QwenBatchedVL, b, n_new: int):
    pv = b["pixel_values"].to(model.dtype)
    feats = model.extract_features(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=pv,
                                   image_grid_thw=b["image_grid_thw"])
    logits = model.lm_head(feats.hidden_states[-1])
    gen = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=pv,
                         image_grid_thw=b["image_grid_thw"], max_new_tokens=n_new, eos_token_id=[])
    return {"vision": model.encode_images(pv, b["image_grid_thw"]), "hidden": feats.hidden_states,
            "logits": logits, "tokens": gen.sequences}


def compare(tag: str, precision: str, ours: dict, ref: dict, valid: torch.Tensor) -> list[dict]:
    rows = [{"stage": "vision features", "precision": precision, "pair": tag, **stats(ours["vision"], ref["vision"])}]
    for i, (a, r) in enumerate(zip(ours["hidden"], ref["hidden"])):
        name = "embeddings" if i == 0 else (f"layer {i} (+final norm)" if i == len(ref["hidden"]) - 1 else f"layer {i}")
        rows.append({"stage": f"hidden {name}", "precision": precision, "pair": tag, **stats(a[valid], r[valid])})
    rows.append({"stage": "logits", "precision": precision, "pair": tag,
                 **stats(ours["logits"][valid], ref["logits"][valid])})
    agree = (ours["tokens"].cpu() == ref["tokens"].cpu()).float()
    first_div = [int(torch.nonzero(1 - a).min()) if (a < 1).any() else a.numel() for a in agree]
    rows.append({"stage": "greedy tokens", "precision": precision, "pair": tag,
                 "token_agreement": agree.mean().item(), "identical_sequences": f"{sum(d == agree.shape[1] for d in first_div)}/{len(first_div)}",
                 "first_divergence": first_div})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", default=None, help="tiny | 3b | 7b (default: tiny on CPU, 3b on CUDA)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--out", default=None, help="directory for deviation-<device>-<date>.{json,md}")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cfg_name = args.config or ("3b" if device.type == "cuda" else "tiny")
    cfg = ModelConfig.from_name(cfg_name)
    hf32, hf16 = build_reference(cfg, device)
    ours32 = QwenBatchedVL.from_hf(hf32)
    images = synthetic_images()
    rows = pixel_rows(ours32, images)
    b = {k: v.to(device) for k, v in build_inputs(ours32, images).items()}
    valid = b["attention_mask"].bool()
    ref32 = reference_outputs(hf32, b, args.new_tokens)
    rows += compare("ours fp32 vs ref fp32", "fp32", our_outputs(ours32, b, args.new_tokens), ref32, valid)
    if not args.no_bf16:
        ours16 = QwenBatchedVL.from_hf(hf16)
        ref16 = reference_outputs(hf16, b, args.new_tokens)
        o16 = our_outputs(ours16, b, args.new_tokens)
        rows += compare("ours bf16 vs ref fp32", "bf16", o16, ref32, valid)
        rows += compare("ref bf16 vs ref fp32", "bf16", ref16, ref32, valid)
        rows += compare("ours bf16 vs ref bf16", "bf16", o16, ref16, valid)
    command = "python bench/deviation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {**header(device), "command": command.strip(), "config": cfg_name, "new_tokens": args.new_tokens,
            "weights": "random (seeded)", "batch": "3 samples: text-only, one 392x392 image, 224x224 + 300x200; left-padded"}
    cols = [("stage", "stage"), ("pair", "compared"), ("max_abs", "max abs"), ("mean_abs", "mean abs"),
            ("mean_rel", "mean rel"), ("max_rel", "max abs / max |ref|"), ("token_agreement", "token agreement"),
            ("identical_sequences", "identical seqs"), ("note", "note")]
    md = (f"## Numerical deviation: {meta['device']}, {cfg_name}, {meta['date']}, commit {meta['commit']}\n\n"
          f"Command: `{meta['command']}`\n\n"
          f"Random weights; {meta['batch']}; greedy {args.new_tokens} new tokens. mean rel = mean |ours - ref| / "
          f"mean |ref|; hidden states and logits over non-pad positions.\n\n" + markdown_table(rows, cols))
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        slug = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "-").lower()
        base = os.path.join(args.out, f"deviation-{slug}-{cfg_name}-{meta['date']}")
        with open(base + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        with open(base + ".md", "w") as f:
            f.write(md + "\n")
    return rows


if __name__ == "__main__":
    main()
