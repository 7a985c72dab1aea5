"""Decoder benchmark: feature extraction and generation, ours vs transformers (one batched call, and per sample).

  features:   B=8 samples, 4 camera images of 224x224 each + 32 text tokens; last hidden state.
  generation: B=32 samples, one 448x448 image each + a short prompt (lengths vary, left padded); greedy,
              64 new tokens, EOS off so every implementation decodes the same number of steps.
Both sides run the vision tower too. Medians over --runs runs after --warmup runs (CUDA synchronised), peak
memory of one extra run, and a check that the outputs agree (max rel err of the features, fraction of
identical generated tokens).

  python bench/bench_decoder.py --config tiny                              # CPU, small config
  python bench/bench_decoder.py --device cuda --config 3b --dtype bfloat16 --json out.json
  python bench/bench_decoder.py --device cuda --model /path/to/Qwen2.5-VL-3B-Instruct --compile
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import fmt_mem, header, markdown_table, peak_memory, time_fns, write_json  # noqa: E402
from bench.models import random_pair  # noqa: E402
from qwen_batched import QwenBatchedVL  # noqa: E402
from qwen_batched.config import ModelConfig  # noqa: E402


def build(args, device, dtype):
    """The reference model (random weights from the preset, or a checkpoint) and ours sharing its tensors."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if not args.model:
        return random_pair(ModelConfig.from_name(args.config), device, dtype, args.hf_attn)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model, dtype=dtype, attn_implementation=args.hf_attn)
    hf = hf.to(device).eval().requires_grad_(False)
    return hf, QwenBatchedVL.from_hf(hf)


def make_batch(cfg: ModelConfig, n_samples: int, images_per_sample: int, px: int, text_lens: list[int], seed: int):
    """Hand-built ids (text, then vision_start, image pads, vision_end per image), left padded."""
    g = torch.Generator().manual_seed(seed)
    side = px // cfg.vision.patch_size
    n_tok = side * side // cfg.vision.merge_unit
    block = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_tok + [cfg.vision_end_token_id]
    vocab = min(cfg.text.vocab_size, 256 if cfg.text.vocab_size < 1000 else 100_000)
    rows = []
    for i in range(n_samples):
        text = torch.randint(0, vocab, (text_lens[i % len(text_lens)],), generator=g).tolist()
        rows.append(text[: len(text) // 2] + block * images_per_sample + text[len(text) // 2:])
    L = max(map(len, rows))
    ids = torch.full((n_samples, L), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = 1
    n_img = n_samples * images_per_sample
    grid = torch.tensor([[1, side, side]] * n_img)
    pixels = torch.randn(n_img * side * side, cfg.vision.patch_dim, generator=g)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                rows=rows, images_per_sample=images_per_sample)


def to(batch, device, dtype):
    out = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def per_sample(batch, device, dtype):
    """The batch as B single-sample inputs (no padding)."""
    k, side = batch["images_per_sample"], int(batch["image_grid_thw"][0, 1])
    rows_px = k * side * side
    out = []
    for i, r in enumerate(batch["rows"]):
        one = dict(input_ids=torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long),
                   pixel_values=batch["pixel_values"][i * rows_px:(i + 1) * rows_px],
                   image_grid_thw=batch["image_grid_thw"][i * k:(i + 1) * k])
        out.append(to(one, device, dtype))
    return out


def hf_kwargs(hf, b):
    return dict(b, mm_token_type_ids=(b["input_ids"] == hf.config.image_token_id).long())


def rel_err(a, b, mask):
    a, b = a[mask].double(), b[mask].double()
    return ((a - b).abs().max() / b.abs().max()).item()


def bench_features(hf, ours, args, device, dtype):
    cfg = ours.cfg
    batch = make_batch(cfg, 8, 4, 224, [32], seed=1)
    b, singles = to(batch, device, dtype), per_sample(batch, device, dtype)

    def run_ours():
        return ours.extract_features(**b, layers=[-1]).hidden_states[0]

    @torch.inference_mode()
    def run_hf():
        return hf.model(**hf_kwargs(hf, b)).last_hidden_state

    @torch.inference_mode()
    def run_hf_single():
        return [hf.model(**hf_kwargs(hf, s)).last_hidden_state for s in singles]

    err = rel_err(run_ours(), run_hf(), b["attention_mask"].bool())
    impls = [("ours", run_ours), ("hf batched", run_hf)]
    if not args.skip_per_sample:
        impls.append(("hf per sample", run_hf_single))
    return _rows("features (B=8, 4x224x224 + 32 text)", 8, impls, args, device, {"max_rel_err_vs_hf": err})


def bench_generation(hf, ours, args, device, dtype):
    cfg = ours.cfg
    n_new = args.new_tokens
    batch = make_batch(cfg, 32, 1, 448, [12, 16, 20, 24], seed=2)
    b, singles = to(batch, device, dtype), per_sample(batch, device, dtype)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = cfg.pad_token_id

    def run_ours():
        return ours.generate(**b, max_new_tokens=n_new, eos_token_id=[], compile=args.compile).sequences

    @torch.inference_mode()
    def run_hf():
        return hf.generate(**hf_kwargs(hf, b), max_new_tokens=n_new, do_sample=False)[:, b["input_ids"].shape[1]:]

    @torch.inference_mode()
    def run_hf_single():
        return [hf.generate(**hf_kwargs(hf, s), max_new_tokens=n_new, do_sample=False) for s in singles]

    def run_ours_eager():  # the decode step without its CUDA graph (the default before graphs), same run
        from qwen_batched import generation

        generation.CUDA_GRAPHS = False
        try:
            return run_ours()
        finally:
            generation.CUDA_GRAPHS = True

    match = (run_ours() == run_hf()).float().mean().item()
    impls = [("ours", run_ours), ("hf batched", run_hf)]
    if device.type == "cuda" and not args.compile:
        impls.insert(1, ("ours, eager decode", run_ours_eager))
    if not (args.skip_per_sample or args.skip_per_sample_generation):
        impls.append(("hf per sample", run_hf_single))
    return _rows(f"generation (B=32, 448x448, {n_new} new)", 32, impls, args, device,
                 {"tokens_equal_hf": match}, new_tokens=32 * n_new)


def _rows(name, batch, impls, args, device, extra, new_tokens=None):
    rows = []
    times = time_fns(dict(impls), device, warmup=args.warmup, reps=args.runs)  # interleaved
    for impl, fn in impls:
        t = times[impl]
        row = {"bench": name, "impl": impl, "median_s": t["median_s"], "min_s": t["min_s"], "max_s": t["max_s"],
               "samples_per_s": batch / t["median_s"]}
        if new_tokens:
            row["new_tokens_per_s"] = new_tokens / t["median_s"]
        row["peak_mem"] = peak_memory(fn, device)
        rows.append(row)
    base = next(r for r in rows if r["impl"] == "hf batched")["median_s"]
    for r in rows:
        r["speedup_vs_hf_batched"] = base / r["median_s"]
    rows[0].update(extra)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="tiny", help="preset for random weights: tiny, 3b, 7b")
    p.add_argument("--model", default="", help="checkpoint directory (overrides --config)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--hf-attn", default="sdpa", help="transformers attention implementation")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="torch.compile our decode step (CUDA graphs on GPU)")
    p.add_argument("--skip-per-sample-generation", action="store_true")
    p.add_argument("--skip-per-sample", action="store_true", help="no per-sample transformers baseline at all")
    p.add_argument("--only", choices=["features", "generation"], default=None, help="run one of the two benchmarks")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.runs < 5:
        p.error("--runs must be >= 5 (medians over at least 5 runs)")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.set_grad_enabled(False)
    hf, ours = build(args, device, dtype)
    rows = []
    if args.only in (None, "features"):
        rows += bench_features(hf, ours, args, device, dtype)
    if args.only in (None, "generation"):
        rows += bench_generation(hf, ours, args, device, dtype)
    meta = {**header(device), "bench": "decoder", "config": args.model or args.config, "dtype": str(dtype),
            "hf_attn": args.hf_attn, "compile": args.compile, "runs": args.runs, "warmup": args.warmup}
    cols = [("bench", "benchmark"), ("impl", "impl"), ("median_s", "median s"), ("samples_per_s", "samples/s"),
            ("new_tokens_per_s", "new tok/s"), ("speedup_vs_hf_batched", "x vs HF batched"), ("peak", "peak mem"),
            ("max_rel_err_vs_hf", "max rel err"), ("tokens_equal_hf", "tokens = HF")]
    shown = [dict(r, peak=fmt_mem(r["peak_mem"])) for r in rows]
    print(f"Decoder, {meta['device']}, {meta['config']}, {dtype}, torch {meta['torch']}")
    print(markdown_table(shown, cols))
    write_json(args.json, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
