"""Where the device time of a feature step and of the vision tower goes: kernels per step, device time per
kernel class (GEMM, attention, our Triton kernels, other elementwise/copy kernels), the top kernels by time.

The latency goals of the real-time step are about launches as much as arithmetic; this profile tells which one
a change must attack. ``torch.profiler`` around a few warm calls of each target (our model only, random
weights, the byte tokenizer), CUDA-synchronised; the step is profiled eager (a CUDA graph hides its kernels
from the profiler) and its graph replay is timed apart.

Targets: ``step`` (B=1, 3 x 224x224, 16 text tokens, last layer), ``vit`` (16 x 448x448 through the tower).

  python bench/profile_gpu.py --device cuda --config 3b --json bench/results/profile.json
  python bench/profile_gpu.py --device cpu            # dry run (cpu-small; aten ops stand in for kernels)
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_step import instruction, model_config  # noqa: E402
from bench.common import header, markdown_table, run_settings, sync, time_fn, time_fns, write_json  # noqa: E402
from bench.models import byte_processor  # noqa: E402
from qwen_batched import QwenBatchedVL  # noqa: E402
from qwen_batched.vision import align_mlp  # noqa: E402

CLASSES = (  # first match wins; names as CUDA kernels (and, in a CPU dry run, aten ops) are called
    ("attention", ("flash", "fmha", "attention", "varlen", "sdpa")),
    ("gemm", ("gemm", "cutlass", "nvjet", "sm90_xmma", "sm80_xmma", "cublas", "aten::mm", "aten::addmm",
              "aten::bmm", "aten::linear")),
    ("triton (ours)", ("_rms_norm_kernel", "_rotary", "_rope", "_silu", "_add_rms", "_patchify", "_resize")),
    ("copy / index", ("copy", "index", "gather", "scatter", "cat", "memcpy", "memset", "fill")),
)


_NO_KERNEL = {"empty", "empty_strided", "empty_like", "as_strided", "view", "reshape", "_reshape_alias", "t",
              "transpose", "expand", "unsqueeze", "squeeze", "permute", "select", "slice", "unbind", "split",
              "chunk", "narrow", "flatten", "unflatten", "detach", "alias", "lift_fresh", "to", "_to_copy",
              "resolve_conj", "resolve_neg", "contiguous", "linear", "matmul", "scaled_dot_product_attention",
              "result_type", "_unsafe_view", "is_nonzero", "item", "_local_scalar_dense", "view_as", "expand_as"}


def _kernel_op(ev) -> bool:
    return ev.name.startswith("aten::") and ev.name[6:] not in _NO_KERNEL


def _has_kernel_op_parent(ev) -> bool:
    p = ev.cpu_parent
    while p is not None:
        if _kernel_op(p):
            return True
        p = p.cpu_parent
    return False


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k.lower() in low for k in keys):
            return cls
    return "elementwise / other"


def profile(fn, device: torch.device, steps: int) -> dict:
    """Kernels (CUDA) or aten ops (CPU dry run) of ``steps`` warm calls: per-step count and time per class and per
    kernel name, and the wall time per step around them."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    for _ in range(2):
        fn()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        wall = (time.perf_counter() - t0) / steps
    per_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # name -> [calls, us]
    for ev in prof.events():
        if cuda:
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        else:
            if not _kernel_op(ev) or _has_kernel_op_parent(ev):
                continue  # outermost aten ops that compute: one kernel each on a GPU, roughly
            us = ev.cpu_time_total
        per_name[ev.name][0] += 1
        per_name[ev.name][1] += us
    by_class: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, (n, us) in per_name.items():
        c = by_class[kernel_class(name)]
        c[0] += n
        c[1] += us
    total_us = sum(us for _, us in per_name.values())
    kernels = sum(n for n, _ in per_name.values())
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])
    return {
        "wall_ms": wall * 1e3, "device_ms": total_us / steps / 1e3, "kernels": kernels / steps,
        "classes": [{"class": c, "kernels": n / steps, "ms": us / steps / 1e3, "share": us / max(total_us, 1e-9)}
                    for c, (n, us) in sorted(by_class.items(), key=lambda kv: -kv[1][1])],
        "top": [{"kernel": name[:110], "class": kernel_class(name), "calls": n / steps, "us": us / steps,
                 "us_per_call": us / max(n, 1)} for name, (n, us) in top],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config", default=None, help="3b (CUDA default) or cpu-small (CPU default)")
    ap.add_argument("--targets", default="step,vit")
    ap.add_argument("--steps", type=int, default=5, help="profiled calls per target")
    ap.add_argument("--top", type=int, default=25, help="kernels listed per target")
    ap.add_argument("--vit-images", type=int, default=None, help="448x448 images for the vit target "
                                                                 "(default 16 CUDA, 2 CPU)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device, config, dtype = run_settings(args.device, args.config)
    cuda = device.type == "cuda"
    cfg = model_config(config)
    t0 = time.perf_counter()
    model = QwenBatchedVL.from_config(cfg, device=device, dtype=dtype, seed=0)
    if model.processor is None or model.processor.tokenizer is None:
        model.processor = byte_processor(cfg)
    print(f"model {config} {dtype} on {device} built in {time.perf_counter() - t0:.1f} s, backend {model.backend}",
          flush=True)
    rows, tops = [], {}
    g = torch.Generator().manual_seed(0)
    if "step" in args.targets:
        B, N, H, W = 1, 3, 224, 224
        frames = torch.randint(0, 256, (B, N, 3, H, W), generator=g, dtype=torch.uint8).to(device)
        text = instruction(model.processor.tokenizer)
        step = model.feature_step(B, N, H, W, texts=text, max_text_tokens=16, cuda_graph=False)
        p = profile(lambda: step(frames), device, args.steps)
        row = {"target": f"step eager B={B}, {N} x {H}x{W}", **{k: p[k] for k in ("wall_ms", "device_ms", "kernels")}}
        if cuda:
            graph = model.feature_step(B, N, H, W, texts=text, max_text_tokens=16)  # a CUDA graph by default
            row["graph_wall_ms"] = time_fn(lambda: graph(frames), device, warmup=3, reps=20)["median_s"] * 1e3
        rows.append({**row, **{f"{c['class']} ms": c["ms"] for c in p["classes"]},
                     **{f"{c['class']} kernels": c["kernels"] for c in p["classes"]}})
        tops["step"] = p
    if "vit" in args.targets:
        n = args.vit_images or (16 if cuda else 2)
        px = torch.randint(0, 256, (n, 3, 448, 448), generator=g, dtype=torch.uint8).to(device)
        batch = model.processor.preprocess_images(list(px), device=device)
        pv, grid = batch.pixel_values.to(dtype), batch.image_grid_thw
        p = profile(lambda: model.encode_images(pv, grid), device, args.steps)
        width = model.visual.blocks[0].mlp.down_proj.in_features
        ab = {}
        if width != cfg.vision.intermediate_size:  # the MLP alignment (vision.align_mlp) against none, interleaved
            towers = {"aligned": model.visual, "config": copy.deepcopy(model.visual)}
            align_mlp(towers["config"], 1)

            def at(tower):
                def run():
                    model.visual = tower
                    model.encode_images(pv, grid)
                return run
            t = time_fns({k: at(v) for k, v in towers.items()}, device, warmup=2, reps=6)
            model.visual = towers["aligned"]
            del towers
            ab = {f"mlp {width} ms": t["aligned"]["median_s"] * 1e3,
                  f"mlp {cfg.vision.intermediate_size} ms": t["config"]["median_s"] * 1e3}
        rows.append({"target": f"vit {n} x 448x448", **ab, **{k: p[k] for k in ("wall_ms", "device_ms", "kernels")},
                     **{f"{c['class']} ms": c["ms"] for c in p["classes"]},
                     **{f"{c['class']} kernels": c["kernels"] for c in p["classes"]}})
        tops["vit"] = p
    cols = sorted({k for r in rows for k in r}, key=lambda k: (k != "target", k))
    print(markdown_table(rows, [(k, k) for k in cols]))
    for name, p in tops.items():
        print(f"\n### {name}: top kernels per call\n")
        print(markdown_table(p["top"][:args.top], [(k, k) for k in ("kernel", "class", "calls", "us", "us_per_call")]))
    write_json(args.json, {"meta": {**header(device), "config": config, "dtype": str(dtype),
                                    "attn_backend": model.backend},
                           "rows": rows, "top": {k: p["top"][:args.top] for k, p in tops.items()}})


if __name__ == "__main__":
    main()
