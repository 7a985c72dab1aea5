"""Many questions per image: ``generate(share_prefix=True)`` against ``share_prefix=False`` and per-sample
transformers ``generate``, same questions, same weights, greedy, same run.

A POPE-like set: N images x k questions each ("Is there a <object> in the image?"), chat template, short
answers (max_new_tokens new tokens, no EOS so every row decodes all of them). Questions are batched as the
answer job batches them (the questions of one image together, batch_size per batch); each batch is prepared
once (processor time is not counted: it is the same for every row and runs in the job's background workers).
Rows: questions/s with sharing on, with it off, and transformers per sample; "same tokens" compares every
answer with the sharing-off one. Implementations are interleaved, medians after a warm-up. On the CPU the
speedups are taken from the process's CPU time (wall time is reported too): on a shared machine other
processes' load moves wall time by far more than the differences measured here; run with --threads 1 so that
CPU time is the time the work takes.

  python bench/bench_prefix.py                                   # CPU: cpu-small config, k = 1, 3, 5
  python bench/bench_prefix.py --device cuda --config 3b --images 16 --px 448
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_vit import CPU_SMALL  # noqa: E402
from bench.common import header, markdown_table, run_settings, sync, time_fns, write_json  # noqa: E402
from bench.models import byte_vocab_config, random_pair  # noqa: E402
from qwen_batched import ModelConfig  # noqa: E402

OBJECTS = ["dog", "car", "person", "chair", "bottle", "cup", "bicycle", "umbrella", "clock", "bench"]


def model_config(name: str) -> ModelConfig:
    """cpu-small: the tiny decoder with bench_vit's CPU vision tower (real patch/merge/window geometry)."""
    if name == "cpu-small":
        tiny = ModelConfig.from_name("tiny")
        return dataclasses.replace(tiny, vision=dataclasses.replace(CPU_SMALL, out_hidden_size=tiny.text.hidden_size))
    return byte_vocab_config(ModelConfig.from_name(name))


def build(name: str, device, dtype, need_hf: bool):
    """(ours, transformers reference or None) sharing one set of random weights, with the byte tokenizer."""
    hf, ours = random_pair(model_config(name), device, dtype)
    return ours, (hf if need_hf else None)


def make_set(n_images: int, k: int, px: int, seed: int):
    """(images (n, 3, px, px) uint8, [(image index, question)] grouped by image)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(px), torch.arange(px), indexing="ij")
    smooth = torch.stack([xx * 255 // (px - 1), yy * 255 // (px - 1), (xx + yy) % 256]).float()
    images = (smooth[None] + 12 * torch.randn(n_images, 3, px, px, generator=g)).clamp(0, 255).to(torch.uint8)
    qs = [(i, f"Is there a {OBJECTS[(i * 7 + j * 3) % len(OBJECTS)]} in the image? Answer yes or no.")
          for i in range(n_images) for j in range(k)]
    return images, qs


def run_case(ours, hf, n_images: int, k: int, px: int, batch_size: int, max_new: int, device, reps: int,
             seed: int) -> list[dict]:
    images, qs = make_set(n_images, k, px, seed)
    batches = [qs[s:s + batch_size] for s in range(0, len(qs), batch_size)]
    prepared = [ours.validate(ours.processor.prepare([[images[i]] for i, _ in b], [q for _, q in b],
                                                     chat_template=True, padding_side="left", device=device))
                for b in batches]
    singles = [ours.processor.prepare([[images[i]]], [q], chat_template=True, padding_side="left", device=device)
               for i, q in qs]
    kw = dict(max_new_tokens=max_new, eos_token_id=[])
    out: dict[str, list] = {}

    def ours_fn(share: bool):
        def f():
            out[share] = [ours.generate(x, share_prefix=share, **kw).sequences for x in prepared]
        return f

    def hf_fn():
        res = []
        for x in singles:
            with torch.inference_mode():
                y = hf.generate(input_ids=x.input_ids, attention_mask=x.attention_mask, pixel_values=x.pixel_values,
                                image_grid_thw=x.image_grid_thw, mm_token_type_ids=x.mm_token_type_ids,
                                max_new_tokens=max_new, do_sample=False, eos_token_id=None,
                                pad_token_id=ours.cfg.pad_token_id)
            res.append(y[:, x.input_ids.shape[1]:])
        out["hf"] = res

    fns = {"share_prefix=True": ours_fn(True), "share_prefix=False": ours_fn(False)}
    if hf is not None:
        hf.generation_config.eos_token_id = None
        fns["transformers per sample"] = hf_fn
    t = {n: {"wall_s": st["median_s"], "cpu_s": st["cpu_s"]}  # interleaved, one warm-up each
         for n, st in time_fns(fns, device, warmup=1, reps=reps).items()}
    off = torch.cat(out[False])
    same = {"share_prefix=True": torch.equal(torch.cat(out[True]), off), "share_prefix=False": True}
    if hf is not None:
        same["transformers per sample"] = torch.equal(torch.cat(out["hf"]), off)
    n = len(qs)
    clock = "cpu_s" if device.type == "cpu" else "wall_s"
    rows = [{"case": f"{n_images} images x {k} questions, {px}px, batch {batch_size}", "k": k, "impl": name,
             "wall_s": st["wall_s"], "cpu_s": st["cpu_s"] if device.type == "cpu" else None,
             "questions_per_s": n / st[clock], "same_tokens": same[name]} for name, st in t.items()]
    base = t["share_prefix=False"][clock]
    for r in rows:
        r["speedup_vs_off"] = base / (r[clock])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", default=None, help="cpu-small | tiny | 3b | 7b (default: cpu-small on CPU, 3b on CUDA)")
    ap.add_argument("--images", type=int, default=None, help="images per case (default 4 CPU, 32 CUDA)")
    ap.add_argument("--k", default="1,3,5", help="questions per image, comma-separated")
    ap.add_argument("--px", type=int, default=448)
    ap.add_argument("--batch-size", type=int, default=None, help="questions per batch (default 15 CPU, 60 CUDA)")
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    device, name, dtype = run_settings(a.device, a.config, threads=a.threads)
    cuda = device.type == "cuda"
    n_images = a.images or (32 if cuda else 4)
    bs = a.batch_size or (60 if cuda else 15)
    ours, hf = build(name, device, dtype, need_hf=not a.skip_hf)
    rows = []
    for k in (int(x) for x in a.k.split(",")):
        rows += run_case(ours, hf, n_images, k, a.px, bs, a.max_new_tokens, device, a.reps, a.seed)
        sync(device)
    meta = {**header(device), "config": name, "dtype": str(dtype).replace("torch.", ""), "reps": a.reps,
            "max_new_tokens": a.max_new_tokens, "torch_threads": torch.get_num_threads(),
            "speedups_from": "process CPU time" if device.type == "cpu" else "wall time (CUDA-synchronised)",
            "command": "python bench/bench_prefix.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(f"## Shared prefixes: {meta['device']}, {meta['date']}, commit {meta['commit']}, {name} ({meta['dtype']}), "
          f"{a.max_new_tokens} new tokens, {meta['torch_threads']} torch thread(s); speedups from "
          f"{meta['speedups_from']}\n\nCommand: `{meta['command']}`\n")
    print(markdown_table(rows, [("case", "case"), ("impl", "impl"), ("wall_s", "median wall s"),
                                ("cpu_s", "median CPU s"), ("questions_per_s", "questions/s"),
                                ("speedup_vs_off", "x vs off"), ("same_tokens", "same tokens as off")]))
    write_json(a.json, {"meta": meta, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
