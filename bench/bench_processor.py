"""Processor benchmark: uint8 image tensors -> model-ready ``pixel_values`` / ``image_grid_thw`` on one device.

Ours (``BatchedImageProcessor.preprocess_images``, one resize + one patchify per image size) against
transformers' Qwen2-VL image processors on the same input tensors with the published preprocessor config:
the PIL one (always) and the torchvision one (where torchvision imports). Every path starts from the same
tensor on ``--device`` and ends with tensors on ``--device``.

  python bench/bench_processor.py                      # CPU
  python bench/bench_processor.py --device cuda --json bench/results/processor.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import fmt_mem, header, markdown_table, peak_memory, time_fns, write_json  # noqa: E402
from qwen_batched.config import default_preprocessor_config  # noqa: E402
from qwen_batched.processor import BatchedImageProcessor  # noqa: E402

CASES = {  # name: (batch, images per sample, height, width)
    "8 x 4 cameras, 224x224": (8, 4, 224, 224),
    "8 x 2, 720x1280": (8, 2, 720, 1280),
}


def hf_processors() -> dict:
    """The transformers processors that import here, built from the published preprocessor config."""
    cfg = default_preprocessor_config()
    kw = dict(min_pixels=cfg["min_pixels"], max_pixels=cfg["max_pixels"])
    out = {}
    try:
        from transformers import Qwen2VLImageProcessorPil
        out["hf_pil"] = Qwen2VLImageProcessorPil(**kw)
    except Exception as e:  # noqa: BLE001 - report what is missing, run the rest
        print(f"HF PIL processor unavailable: {e}", file=sys.stderr)
    try:
        import torchvision  # noqa: F401
        from transformers import Qwen2VLImageProcessor
        out["hf_tv"] = Qwen2VLImageProcessor(**kw)
    except Exception as e:  # noqa: BLE001
        print(f"HF torchvision processor unavailable ({type(e).__name__}); skipped", file=sys.stderr)
    return out


def run_case(name: str, shape, ours: BatchedImageProcessor, hf: dict, device: torch.device, reps: int) -> dict:
    b, n, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (b, n, 3, h, w), generator=g, dtype=torch.uint8).to(device)  # (B, N, 3, H, W)

    def f_ours():
        return ours.preprocess_images(x)

    def f_pil():  # PIL works on host arrays: copy out, process, copy the result back
        out = hf["hf_pil"](images=list(x.flatten(0, 1).cpu().unbind(0)), return_tensors="pt")
        return out["pixel_values"].to(device), out["image_grid_thw"].to(device)

    def f_tv():
        out = hf["hf_tv"](images=list(x.flatten(0, 1).unbind(0)), return_tensors="pt", device=str(device))
        return out["pixel_values"].to(device), out["image_grid_thw"].to(device)

    res = f_ours()
    row = {"case": name, "images": b * n, "out_rows": res.pixel_values.shape[0]}
    fns = {"ours": f_ours, **{k: f for k, f in (("hf_pil", f_pil), ("hf_tv", f_tv)) if k in hf}}
    for key, fn in fns.items():  # same grids as ours before anything is timed
        if key != "ours":
            pv, thw = fn()
            assert thw.equal(res.image_grid_thw), f"{key}: image_grid_thw differs"
            row[f"max_abs_diff_vs_{key}"] = float((pv.float() - res.pixel_values).abs().max())
    t = time_fns(fns, device, warmup=2, reps=reps)  # interleaved
    row["ours_ms"] = t["ours"]["median_s"] * 1e3
    row["ours_peak_mem"] = fmt_mem(peak_memory(f_ours, device))
    for key in fns:
        if key != "ours":
            row[f"{key}_ms"] = t[key]["median_s"] * 1e3
            row[f"x_vs_{key}"] = row[f"{key}_ms"] / row["ours_ms"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.reps < 5:
        raise SystemExit("--reps must be >= 5")
    device = torch.device(args.device)
    ours = BatchedImageProcessor.from_config_dict(default_preprocessor_config())
    hf = hf_processors()
    rows = [run_case(name, shape, ours, hf, device, args.reps) for name, shape in CASES.items()]
    meta = {**header(device), "reps": args.reps, "input": "uint8 (B, N, 3, H, W) tensor on the device",
            "timing": "median wall time after warm-up, CUDA-synchronised", "baselines": sorted(hf)}
    cols = [("case", "case"), ("images", "images"), ("ours_ms", "ours ms"), ("hf_pil_ms", "HF PIL ms"),
            ("x_vs_hf_pil", "x HF PIL"), ("hf_tv_ms", "HF torchvision ms"), ("x_vs_hf_tv", "x HF torchvision"),
            ("max_abs_diff_vs_hf_pil", "max |diff| vs PIL"), ("max_abs_diff_vs_hf_tv", "max |diff| vs torchvision"),
            ("ours_peak_mem", "our peak mem")]
    print(f"## Processor: {meta['device']}, {meta['date']}, commit {meta['commit']}")
    print(markdown_table(rows, [c for c in cols if any(c[0] in r for r in rows)]))
    write_json(args.json, {"meta": meta, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
