"""Vision tower benchmark: ours (one varlen pass) vs transformers' ``model.visual`` (one call, and per image).

CPU: a small config with the real geometry (patch 14, merge 2, window 112, 4 full-attention blocks).
CUDA: the real 3B/7B vision tower (random weights, bf16).

  python bench/bench_vit.py                      # CPU, small config
  python bench/bench_vit.py --device cuda --config 3b --json bench/results/vit.json
  python bench/bench_vit.py --scaling            # images/s for 1..128 images and 224..1344 px
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import (bf16_peak_tflops, fmt_mem, header, markdown_table, peak_memory, time_fns,  # noqa: E402
                          write_json)
from qwen_batched.config import ModelConfig, VisionConfig  # noqa: E402
from qwen_batched.attention import resolve_backend  # noqa: E402
from qwen_batched.caches import ModelCaches  # noqa: E402
from qwen_batched.validation import host_grids  # noqa: E402
from qwen_batched.vision import VisionTransformer, align_mlp  # noqa: E402
from tests.helpers import hf_config_dict  # noqa: E402

CPU_SMALL = VisionConfig(depth=8, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=256,
                         fullatt_block_indexes=(1, 3, 5, 7))


def vision_config(name: str) -> VisionConfig:
    return CPU_SMALL if name == "cpu-small" else ModelConfig.from_name(name).vision


def grid_for(px_h: int, px_w: int, cfg: VisionConfig) -> tuple[int, int, int]:
    f = cfg.patch_size * cfg.spatial_merge_size
    assert px_h % f == 0 and px_w % f == 0, "bench sizes are multiples of 28"
    return (1, px_h // cfg.patch_size, px_w // cfg.patch_size)


def vit_flops(cfg: VisionConfig, grids) -> float:
    """Multiply-adds x2 of one forward: linears, attention (per window / per frame), patch embed, merger."""
    D, I, mu = cfg.hidden_size, cfg.intermediate_size, cfg.merge_unit
    W = cfg.window_merged
    total = 0.0
    for t, h, w in grids:
        n = t * h * w
        per_layer = 2 * n * (D * 3 * D + D * D + 3 * D * I)
        hm, wm = h // cfg.spatial_merge_size, w // cfg.spatial_merge_size
        win = 0
        for r0 in range(0, hm, W):
            for c0 in range(0, wm, W):
                L = min(W, hm - r0) * min(W, wm - c0) * mu
                win += 4 * L * L * D
        win *= t
        full = t * 4 * (h * w) ** 2 * D
        n_full = len(cfg.fullatt_block_indexes)
        total += cfg.depth * per_layer + (cfg.depth - n_full) * win + n_full * full
        total += 2 * n * cfg.patch_dim * D + 2 * (n // mu) * (mu * D * mu * D + mu * D * cfg.out_hidden_size)
    return total


def build(cfg: VisionConfig, device, dtype, hf_attn: str = "sdpa"):
    """The HF vision tower (random init) and ours with the same tensors."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    hf_cfg = Qwen2_5_VLVisionConfig(**hf_config_dict(ModelConfig(vision=cfg))["vision_config"])
    hf_cfg._attn_implementation = hf_attn
    torch.manual_seed(0)
    with torch.device(device):
        hf = Qwen2_5_VisionTransformerPretrainedModel._from_config(hf_cfg, dtype=dtype).eval()
    ours = VisionTransformer(cfg).to(device=device, dtype=dtype).eval()
    sd = {k: (v.reshape(v.shape[0], -1) if k == "patch_embed.proj.weight" else v) for k, v in hf.state_dict().items()}
    ours.load_state_dict(sd, strict=True)
    if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        align_mlp(ours, 64)  # what QwenBatchedVL runs there (its _adapt); the FLOP count stays the config's
    caches = ModelCaches(ModelConfig(vision=cfg))
    backend = resolve_backend("auto", torch.device(device), dtype)

    def encode(pv, g):  # what encode_images runs: host grids (one read), cached geometry, one varlen pass
        return ours(pv, caches.geometry(host_grids(g), torch.device(device), backend), backend)
    return hf, encode


def make_inputs(grids, cfg: VisionConfig, device, dtype, seed=0):
    n = sum(t * h * w for t, h, w in grids)
    g = torch.Generator(device="cpu").manual_seed(seed)
    pv = torch.randn(n, cfg.patch_dim, generator=g).to(device=device, dtype=dtype)
    return pv, torch.tensor(grids, device=device)


def run_case(name, grids, hf, ours, cfg, device, dtype, reps, per_image=True) -> dict:
    pv, g = make_inputs(grids, cfg, device, dtype)
    offsets = torch.tensor([0] + [t * h * w for t, h, w in grids]).cumsum(0).tolist()
    # our model's output must match the reference before anything is timed
    with torch.inference_mode():
        ref = hf(pv, grid_thw=g).pooler_output
        out = ours(pv, g)
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()

    def f_ours():
        with torch.inference_mode():
            ours(pv, g)

    def f_hf_batch():
        with torch.inference_mode():
            hf(pv, grid_thw=g)

    def f_hf_each():
        with torch.inference_mode():
            for i, grid in enumerate(grids):
                hf(pv[offsets[i]:offsets[i + 1]], grid_thw=g[i:i + 1])

    row = {"case": name, "images": len(grids), "rel_err": err}
    fns = {"ours": f_ours, "batch": f_hf_batch}
    if per_image:
        fns["each"] = f_hf_each
    t = time_fns(fns, device, warmup=1, reps=reps)
    t_ours, t_batch = t["ours"], t["batch"]
    row.update(ours_ms=t_ours["median_s"] * 1e3, ours_spread=f"{t_ours['min_s']*1e3:.3g}-{t_ours['max_s']*1e3:.3g}",
               hf_batch_ms=t_batch["median_s"] * 1e3,
               ms_per_image=t_ours["median_s"] * 1e3 / len(grids),
               speedup_vs_hf_batch=t_batch["median_s"] / t_ours["median_s"])
    if per_image:
        t_each = t["each"]
        row.update(hf_per_image_ms=t_each["median_s"] * 1e3, speedup_vs_hf_per_image=t_each["median_s"] / t_ours["median_s"])
    flops = vit_flops(cfg, grids)
    row["tflops"] = flops / t_ours["median_s"] / 1e12
    peak = bf16_peak_tflops(device) if dtype == torch.bfloat16 else None
    row["frac_bf16_peak"] = row["tflops"] / peak if peak else None
    row["ours_peak_mem"] = fmt_mem(peak_memory(f_ours, device))
    row["hf_batch_peak_mem"] = fmt_mem(peak_memory(f_hf_batch, device))
    return row


def cases(device_type: str, cfg: VisionConfig):
    if device_type == "cuda":
        return {
            "64 x 448x448": [grid_for(448, 448, cfg)] * 64,
            "128 x 224x224": [grid_for(224, 224, cfg)] * 128,
            "32 mixed 224..896": [grid_for(224 + 28 * (i % 25), 224 + 28 * ((7 * i) % 25), cfg) for i in range(32)],
            "8 x 392x392 (unequal windows)": [grid_for(392, 392, cfg)] * 8,
        }
    return {
        "64 x 112x112": [grid_for(112, 112, cfg)] * 64,
        "8 x 448x448": [grid_for(448, 448, cfg)] * 8,
        "16 mixed 112..448": [grid_for(112 + 28 * (i % 13), 112 + 28 * ((5 * i) % 13), cfg) for i in range(16)],
        "8 x 392x392 (unequal windows)": [grid_for(392, 392, cfg)] * 8,
    }


def scaling(hf, ours, cfg, device, dtype, reps) -> list[dict]:
    rows = []
    counts = [1, 2, 4, 8, 16, 32, 64, 128]
    sizes = [224, 448, 672, 896, 1120, 1344]
    if torch.device(device).type == "cpu":
        counts, sizes = [1, 4, 16, 64], [224, 448, 672]
    for n in counts:
        rows.append({"sweep": "images", "n": n, "px": 224, **_ips(hf, ours, [grid_for(224, 224, cfg)] * n, cfg, device, dtype, reps)})
    for px in sizes:
        n = 8
        rows.append({"sweep": "size", "n": n, "px": px, **_ips(hf, ours, [grid_for(px, px, cfg)] * n, cfg, device, dtype, reps)})
    return rows


def _ips(hf, ours, grids, cfg, device, dtype, reps) -> dict:
    pv, g = make_inputs(grids, cfg, device, dtype)

    def f_ours():
        with torch.inference_mode():
            ours(pv, g)

    def f_hf():
        with torch.inference_mode():
            hf(pv, grid_thw=g)
    t = time_fns({"ours": f_ours, "hf": f_hf}, device, warmup=1, reps=reps)
    a, b = t["ours"]["median_s"], t["hf"]["median_s"]
    return {"ours_img_s": len(grids) / a, "hf_batch_img_s": len(grids) / b, "speedup": b / a}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", default=None, help="cpu-small | 3b | 7b (default: cpu-small on CPU, 3b on CUDA)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--scaling", action="store_true", help="also sweep image count and size")
    ap.add_argument("--no-per-image", action="store_true", help="skip the HF per-image baseline")
    ap.add_argument("--case", action="append", default=None, help="run only these cases (by name; repeatable)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cfg_name = args.config or ("3b" if device.type == "cuda" else "cpu-small")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = vision_config(cfg_name)
    hf, ours = build(cfg, device, dtype)
    todo = cases(device.type, cfg)
    if args.case:
        unknown = set(args.case) - set(todo)
        if unknown:
            ap.error(f"unknown --case {sorted(unknown)}; cases here: {list(todo)}")
        todo = {k: v for k, v in todo.items() if k in args.case}
    rows = [run_case(name, grids, hf, ours, cfg, device, dtype, args.reps, per_image=not args.no_per_image)
            for name, grids in todo.items()]
    meta = {**header(device), "config": cfg_name, "dtype": str(dtype).replace("torch.", ""), "reps": args.reps,
            "timing": "median wall time after warm-up, implementations interleaved, CUDA-synchronised"}
    print(f"## Vision tower: {meta['device']}, {cfg_name}, {meta['dtype']}, {meta['date']}, commit {meta['commit']}")
    print(markdown_table(rows, [("case", "case"), ("ours_ms", "ours ms"), ("ours_spread", "spread"),
                                ("hf_batch_ms", "HF batched ms"), ("hf_per_image_ms", "HF per image ms"),
                                ("speedup_vs_hf_batch", "x HF batched"), ("speedup_vs_hf_per_image", "x HF per image"),
                                ("ms_per_image", "ms/image"), ("tflops", "TFLOP/s"), ("frac_bf16_peak", "of bf16 peak"),
                                ("ours_peak_mem", "our peak mem"), ("hf_batch_peak_mem", "HF peak mem"),
                                ("rel_err", "max rel err")]))
    out = {"meta": meta, "rows": rows}
    if args.scaling:
        sc = scaling(hf, ours, cfg, device, dtype, max(3, args.reps // 2 + 1))
        print("\n### Scaling (images/s)")
        print(markdown_table(sc, [("sweep", "sweep"), ("n", "images"), ("px", "px"), ("ours_img_s", "ours img/s"),
                                  ("hf_batch_img_s", "HF batched img/s"), ("speedup", "speedup")]))
        out["scaling"] = sc
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
