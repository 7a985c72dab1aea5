"""Which reference image-processor path does ours match? Measured against transformers' own processors.

transformers' default image processor for Qwen2.5-VL (``Qwen2VLImageProcessor``) resizes with torchvision, whose
bicubic antialiased resize of a uint8 image depends on the device: on CUDA it interpolates in float32, then clamps,
rounds and casts back to uint8 (the "float path"); on a CPU it calls torch's native uint8 kernel, which rounds
to uint8 between the horizontal and the vertical pass. ``Qwen2VLImageProcessorPil`` resizes with PIL. All three
agree when no resize happens.

For uint8 images that need a resize this script runs, on the CPU, on the same pixels:
  - ours (``BatchedImageProcessor``, torch path);
  - ``Qwen2VLImageProcessor`` as it runs here (torchvision's uint8 CPU kernel);
  - ``Qwen2VLImageProcessor`` with torchvision's float path forced (``_do_native_uint8_resize_on_cpu`` patched to
    False: torchvision's own code path for CUDA and non-native CPUs, run on this CPU);
  - ``Qwen2VLImageProcessorPil``;
and reports max / mean |difference| of ``pixel_values`` (normalized units, and in uint8 steps: |diff| x 255 x
std of the channel), and the fraction of values that differ (> 1e-5). Grids must be identical.

Needs torchvision, which the package's environment does not: run it with any Python that has torch, torchvision,
transformers, pillow and numpy, e.g.

  python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch torchvision transformers pillow numpy
  PYTHONPATH=. /tmp/tv/bin/python bench/processor_paths.py --out bench/results
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import header, markdown_table  # noqa: E402
from qwen_batched.config import default_preprocessor_config  # noqa: E402
from qwen_batched.processor import CLIP_STD, BatchedImageProcessor, smart_resize  # noqa: E402

PUBLISHED_MAX = default_preprocessor_config()["max_pixels"]
CASES = [  # (name, height, width, max_pixels, images)
    ("200x300 -> 196x308", 200, 300, PUBLISHED_MAX, 4),
    ("480x640 -> 476x644", 480, 640, PUBLISHED_MAX, 4),
    ("720x1280 -> 728x1288", 720, 1280, PUBLISHED_MAX, 2),
    ("1080x1920, max_pixels 1003520 -> 756x1316", 1080, 1920, 1003520, 2),
    ("224x224 (no resize)", 224, 224, PUBLISHED_MAX, 4),
]


def make_images(kind: str, n: int, h: int, w: int, seed: int) -> list[torch.Tensor]:
    """n uint8 (3, h, w) images. noise: uniform pixels (worst case for rounding between passes); smooth: low
    frequencies only; scene: flat regions, hard edges and sensor noise (camera-like)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        return list(torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8))
    yy = torch.linspace(0, 1, h)[:, None]
    xx = torch.linspace(0, 1, w)[None, :]
    out = []
    for _ in range(n):
        a = torch.rand(3, 4, generator=g) * 2 * math.pi
        img = torch.stack([127.5 + 60 * torch.sin(3 * yy + a[c, 0]) * torch.cos(2 * xx + a[c, 1])
                           + 50 * torch.sin(2 * xx + 4 * yy + a[c, 2] + a[c, 3]) for c in range(3)])
        if kind == "scene":
            cy, cx, r = torch.rand(3, generator=g).tolist()
            disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < (0.1 + 0.2 * r) ** 2).float()
            bars = ((xx * 12).floor() % 2 == 0).float() * (yy > 0.7).float()
            img = img * (1 - disc) + 240 * disc - 90 * bars + 6 * torch.randn(3, h, w, generator=g)
        out.append(img.round().clamp(0, 255).to(torch.uint8))
    return out


def hf_run(proc, images: list[torch.Tensor], pil: bool) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = [im.permute(1, 2, 0).numpy() for im in images] if pil else images
    out = proc(images=inputs, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def compare(a: torch.Tensor, b: torch.Tensor, patch_size: int = 14, temporal: int = 2) -> dict:
    """max / mean |a - b| (normalized units), the same in uint8 steps, and the fraction that differ."""
    d = (a.double() - b.double()).abs()  # (rows, C*T*P*P)
    std = torch.tensor(CLIP_STD, dtype=torch.float64).repeat_interleave(temporal * patch_size ** 2)
    steps = d * 255 * std
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(), "max_steps": steps.max().item(),
            "mean_steps": steps.mean().item(), "frac_differ": (d > 1e-5).double().mean().item()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="directory for processor-paths-<device>-<date>.{json,md}")
    ap.add_argument("--quick", action="store_true", help="first two cases only (a smoke run)")
    args = ap.parse_args(argv)
    try:
        import torchvision
        import transformers
        from torchvision.transforms.v2.functional import _geometry
        from transformers import Qwen2VLImageProcessor, Qwen2VLImageProcessorPil
    except ImportError as e:
        sys.exit(f"needs torchvision and transformers ({e}); see this file's docstring")

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    native_uint8 = _geometry._do_native_uint8_resize_on_cpu

    def forced_float(_interpolation) -> bool:
        return False

    rows = []
    for case, h, w, max_pixels, n in CASES[:2] if args.quick else CASES:
        kw = dict(min_pixels=3136, max_pixels=max_pixels)
        ours = BatchedImageProcessor(**kw, use_triton=False)
        fast, slow = Qwen2VLImageProcessor(**kw), Qwen2VLImageProcessorPil(**kw)
        resized = smart_resize(h, w, 28, 3136, max_pixels) != (h, w)
        for kind in ("noise", "smooth", "scene"):
            imgs = make_images(kind, n, h, w, seed=len(rows))
            mine = ours.preprocess_images([imgs])  # one sample holding the n images
            refs = {"HF torchvision, CPU uint8 kernel": hf_run(fast, imgs, pil=False),
                    "HF PIL": hf_run(slow, imgs, pil=True)}
            _geometry._do_native_uint8_resize_on_cpu = forced_float
            try:
                refs["HF torchvision, float path (as on CUDA)"] = hf_run(fast, imgs, pil=False)
            finally:
                _geometry._do_native_uint8_resize_on_cpu = native_uint8
            for pair, (pv, thw) in refs.items():
                assert thw.equal(mine.image_grid_thw), f"{case} {kind} {pair}: grids differ"
                rows.append({"case": case, "resized": resized, "image": kind, "ours vs": pair,
                             **compare(mine.pixel_values, pv)})
            cpu_vs_float = compare(refs["HF torchvision, CPU uint8 kernel"][0],
                                   refs["HF torchvision, float path (as on CUDA)"][0])
            rows.append({"case": case, "resized": resized, "image": kind,
                         "ours vs": "(reference against itself: CPU uint8 kernel vs float path)", **cpu_vs_float})
            print(f"{case:45s} {kind:6s} done", flush=True)

    head = {**header("cpu"), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "torchvision": torchvision.__version__,
            "transformers": transformers.__version__, "command": "python bench/processor_paths.py"
            + (" --quick" if args.quick else "")}
    cols = [("case", "case"), ("image", "image"), ("ours vs", "ours vs"), ("max_abs", "max abs"),
            ("mean_abs", "mean abs"), ("max_steps", "max (uint8 steps)"), ("mean_steps", "mean (uint8 steps)"),
            ("frac_differ", "fraction differing")]
    md = (f"## Processor paths: {head['device']}, {head['cpu_capability']}, {head['date']}, commit {head['commit']}\n\n"
          f"Command: `{head['command']}`; torch {head['torch']}, torchvision {head['torchvision']}, transformers "
          f"{head['transformers']}. `pixel_values` of ours vs transformers' processors on the same uint8 images "
          "(normalized units; uint8 steps = |diff| x 255 x channel std). Grids identical in every row.\n\n"
          + markdown_table(rows, cols) + "\n")
    print("\n" + md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"processor-paths-cpu-{head['date']}")
        with open(stem + ".json", "w") as f:
            json.dump({**head, "rows": rows}, f, indent=2)
        with open(stem + ".md", "w") as f:
            f.write(md)
        print(f"wrote {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()
