"""Real-time feature step benchmark: per-step latency of ``model.feature_step`` (eager; on CUDA also the eager step
in a CUDA graph; compiled, in a CUDA graph on GPU) against ``extract_features(images=, texts=)`` and
transformers, all on the same uint8 frames in one interleaved run.

Cases: B = 1 and 8 samples of (a) 3 cameras 224x224 and (b) 2 cameras 480x640, a 16-token instruction, last layer.
transformers: its default image processor on the same frames (the torchvision one where it imports, else the
PIL one) + ``model.model(..., output_hidden_states=True)`` (the base model: no LM head over every token), with
the prompt ids built once outside the timed region. Medians and p90 over --reps steps after warm-up, CUDA
synchronised around every step; the first call of the graph / compiled steps (capture, compilation) is reported
apart (``*_build_s``). The cases run once without the compiled step (written to --json), then again with it
(replacing those rows), so a compilation cut short by a time limit leaves the rest measured.
--quick: case (a) only, no compiled step, fewer reps.

CPU: a small real-geometry config (the vision tower of bench_vit.py's cpu-small, depth 8, width 256, and a
4-layer width-256 decoder), float32. CUDA: the 3B shapes with random weights in bf16, prompts through the
byte-level tokenizer (a random-weight preset has no tokenizer.json); --model PATH for a checkpoint.

  python bench/bench_step.py                                   # CPU
  python bench/bench_step.py --device cuda --config 3b --json bench/results/step.json
  python bench/bench_step.py --device cuda --model /path/to/Qwen2.5-VL-3B-Instruct
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_vit import CPU_SMALL  # noqa: E402
from bench.common import header, markdown_table, run_settings, sync, time_fns, write_json  # noqa: E402
from bench.models import byte_vocab_config, random_pair  # noqa: E402
from qwen_batched import QwenBatchedVL  # noqa: E402
from qwen_batched.config import ModelConfig, tiny_config  # noqa: E402

CASES = {"a": (3, 224, 224), "b": (2, 480, 640)}  # cameras, height, width
WORDS = "pick up the cube and put it in the green bowl on the left side of the table then open the drawer".split()


def instruction(tokenizer, n: int = 16) -> str:
    """The longest prefix of WORDS with at most ``n`` tokens (exactly 16 with the byte-level tokenizer)."""
    text = ""
    for k in range(1, len(WORDS) + 1):
        longer = " ".join(WORDS[:k])
        if len(tokenizer.encode(longer)) > n:
            break
        text = longer
    return text


def model_config(name: str) -> ModelConfig:
    if name == "cpu-small":  # real geometry at width 256: bench_vit's cpu-small tower, a 4-layer decoder
        tiny = tiny_config()
        text = dataclasses.replace(tiny.text, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, mrope_section=(8, 12, 12))
        vision = dataclasses.replace(CPU_SMALL, out_hidden_size=256)
        return dataclasses.replace(tiny, vision=vision, text=text).validate()
    return byte_vocab_config(ModelConfig.from_name(name))


def build(cfg: ModelConfig | None, device, dtype, hf_attn: str, path: str | None = None):
    """The transformers model (random init from ``cfg``, or the checkpoint at ``path``) and ours sharing its
    tensors; a random-weight model gets a byte-level prompt tokenizer."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if path:
        from qwen_batched.processor import load_processor

        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=hf_attn)
        ours = QwenBatchedVL.from_hf(hf.to(device).eval().requires_grad_(False))
        ours.processor = load_processor(path, ours.cfg)
        return hf, ours
    return random_pair(cfg, device, dtype, hf_attn)


def hf_image_processor():
    """transformers' default Qwen2-VL image processor with the published pixel limits."""
    from qwen_batched.config import default_preprocessor_config

    pre = default_preprocessor_config()
    kw = dict(min_pixels=pre["min_pixels"], max_pixels=pre["max_pixels"])
    try:
        import torchvision  # noqa: F401
        from transformers import Qwen2VLImageProcessor
        return "torchvision", Qwen2VLImageProcessor(**kw)
    except ImportError:
        from transformers import Qwen2VLImageProcessorPil
        return "PIL", Qwen2VLImageProcessorPil(**kw)


def real_rel_err(a, mask_a, b, mask_b) -> float:
    """max |a - b| / max |b| over the real tokens of two (B, L, D) batches with their own padding."""
    x = torch.cat([a[i][mask_a[i].bool()] for i in range(a.shape[0])]).double()
    y = torch.cat([b[i][mask_b[i].bool()] for i in range(b.shape[0])]).double()
    return float((x - y).abs().max() / y.abs().max())


def run_case(name: str, B: int, hf, ours, hf_proc, device, reps: int, warmup: int, variants: list[str]) -> dict:
    """One case: the step variants (eager always; 'graph' = the eager step in a CUDA graph, 'compiled' =
    torch.compile, in a CUDA graph on GPU), extract_features and transformers, timed interleaved."""
    N, H, W = CASES[name]
    g = torch.Generator().manual_seed(B)
    frames = torch.randint(0, 256, (B, N, 3, H, W), generator=g, dtype=torch.uint8).to(device)
    texts = [instruction(ours.processor.tokenizer)] * B
    step = ours.feature_step(B, N, H, W, texts=texts, max_text_tokens=16, cuda_graph=False)  # eager
    row = {"case": f"({name}) B={B}, {N} x {H}x{W}", "tokens": step.length,
           "text_tokens": len(ours.processor.tokenizer.encode(texts[0]))}
    fns = {"step": lambda: step(frames),
           "extract_features": lambda: ours.extract_features(images=frames, texts=texts, layers=[-1])}
    out = step(frames)
    for v in variants:  # first call: capture / compilation, timed apart
        built = ours.feature_step(B, N, H, W, texts=texts, max_text_tokens=16, compile=v == "compiled",
                                  cuda_graph=True if v == "graph" else None)
        t0 = time.perf_counter()
        c = built(frames)
        sync(device)
        row[f"{v}_build_s"] = time.perf_counter() - t0
        row[f"err_{v}_vs_eager"] = float((c.hidden_states[0] - out.hidden_states[0]).abs().max()
                                         / out.hidden_states[0].abs().max())
        fns[f"step_{v}"] = lambda built=built: built(frames)

    inputs = ours.processor.prepare(frames, texts, device=device)  # the prompt ids (not timed)
    images = list(frames.flatten(0, 1).unbind(0))
    kind, proc = hf_proc

    def f_hf():
        if kind == "PIL":  # PIL works on host arrays
            px = proc(images=[x.cpu() for x in images], return_tensors="pt")
        else:
            px = proc(images=images, return_tensors="pt", device=str(device))
        with torch.inference_mode():
            return hf.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                            mm_token_type_ids=inputs.mm_token_type_ids,
                            pixel_values=px["pixel_values"].to(device=device, dtype=hf.dtype),
                            image_grid_thw=px["image_grid_thw"].to(device), output_hidden_states=True)
    fns["transformers"] = f_hf

    ref, theirs = fns["extract_features"](), f_hf()
    row["err_vs_extract_features"] = real_rel_err(out.hidden_states[0], out.attention_mask, ref.hidden_states[0],
                                                  ref.attention_mask)
    row["err_vs_transformers"] = real_rel_err(out.hidden_states[0], out.attention_mask, theirs.last_hidden_state,
                                              inputs.attention_mask)  # PIL's resize differs by ~1 uint8 step
    t = time_fns(fns, device, warmup=warmup, reps=reps)
    for k, v in t.items():
        row[f"{k}_ms"] = v["median_s"] * 1e3
        row[f"{k}_p90_ms"] = v["p90_s"] * 1e3
        row[f"{k}_min_ms"] = v["min_s"] * 1e3
    for k in [k for k in fns if k.startswith("step")]:
        row[f"{k}_x_vs_extract_features"] = row["extract_features_ms"] / row[f"{k}_ms"]
        row[f"{k}_x_vs_transformers"] = row["transformers_ms"] / row[f"{k}_ms"]
    print(markdown_table([row], [(k, k) for k in row]), flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default=None, help="cpu-small (CPU default) or a preset, e.g. 3b (CUDA default)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--batches", default="1,8", help="batch sizes, comma separated")
    ap.add_argument("--cases", default="a,b", help="a: 3 x 224x224, b: 2 x 480x640")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per implementation (default 30 CUDA, "
                                                           "15 CPU at B=1, 5 CPU otherwise)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled step")
    ap.add_argument("--quick", action="store_true", help="case (a) only, no compiled step, fewer reps (a smoke run)")
    ap.add_argument("--model", default=None, help="checkpoint directory (instead of random weights)")
    ap.add_argument("--hf-attn", default="sdpa")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device, config, dtype = run_settings(args.device, args.config, args.dtype, args.threads)
    cuda = device.type == "cuda"
    if args.model:
        config = args.model
    hf, ours = build(None if args.model else model_config(config), device, dtype, args.hf_attn, args.model)
    hf_proc = hf_image_processor()
    variants = ["graph"] if cuda else []
    passes = [variants] + ([] if args.no_compile or args.quick else [variants + ["compiled"]])
    cases = "a" if args.quick else args.cases
    meta = {**header(device), "config": config, "dtype": str(dtype), "threads": torch.get_num_threads(),
            "hf_image_processor": hf_proc[0], "attn_backend": ours.backend}
    for vs in passes:  # without the compiled step first: its cold compilation may outlast a time limit
        rows = []
        for name in cases.split(","):
            for B in (int(b) for b in args.batches.split(",")):
                default = (10 if args.quick else 30) if cuda else (5 if args.quick or B > 1 else 15)
                rows.append(run_case(name, B, hf, ours, hf_proc, device, args.reps or default,
                                     warmup=3 if cuda else 1, variants=vs))
        print(markdown_table(rows, [(k, k) for k in rows[0]]))
        write_json(args.json, {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
