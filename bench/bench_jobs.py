"""Questions/s of ``python -m qwen_batched answer`` against a per-sample baseline.

Rows (same questions, same weights, greedy):
  * jobs, batched      -- the answer job: length-sorted batches, background decoding/preprocessing, shards
  * jobs, batch 1      -- the same job with --batch-size 1 --workers 0 (what batching and prefetch buy)
  * HF per-sample      -- transformers ``generate`` one question at a time, split into --hf-chunks chunks run
                          one after the other, each loading the model again, as the usual
                          ``for IDX in chunks: python model_vqa.py --chunk-idx IDX`` bash loop does
                          (the load is counted for checkpoint directories; for random-weight presets it is not)

  python bench/bench_jobs.py                                          # CPU, tiny random model
  python bench/bench_jobs.py --device cuda --model 3b --n 256 --max-new-tokens 64 --json bench/results/jobs.json
  python bench/bench_jobs.py --device cuda --model Qwen/Qwen2.5-VL-3B-Instruct --hf-chunks 4 --n 512
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import header, markdown_table, sync, write_json  # noqa: E402
from bench.models import byte_vocab_config, random_pair  # noqa: E402
from qwen_batched import QwenBatchedVL, jobs  # noqa: E402
from qwen_batched.config import ModelConfig  # noqa: E402
from qwen_batched.jobs.run import model_source  # noqa: E402


def make_dataset(root: str, n: int, lo: int, hi: int, seed: int) -> tuple[str, str]:
    """n questions over JPEGs with sides uniform in [lo, hi] px (smooth content plus noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "images")
    os.makedirs(folder, exist_ok=True)
    prompts = ["What is in this picture?", "Describe the image in one sentence.",
               "How many distinct colours can you see? Answer with a number.", "Is this photo taken indoors?"]
    with open(os.path.join(root, "questions.jsonl"), "w") as f:
        for i in range(n):
            h, w = (int(x) for x in rng.integers(lo, hi + 1, 2))
            yy, xx = np.mgrid[0:h, 0:w]
            img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) % 256)], -1)
            img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
            f.write(json.dumps({"question_id": i, "image": f"{i:05d}.jpg", "text": prompts[i % len(prompts)]}) + "\n")
    return os.path.join(root, "questions.jsonl"), folder


def build_models(spec: str, device: torch.device, dtype: torch.dtype, need_hf: bool):
    """(ours, hf or None) sharing one set of weights. A checkpoint directory is loaded by both; a preset name
    gets random weights (transformers' init) and the byte tokenizer."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if os.path.isdir(spec):
        ours = QwenBatchedVL.from_pretrained(spec, device=device, dtype=dtype)
        hf = None
        if need_hf:
            hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(spec, dtype=dtype).to(device).eval()
        return ours, hf
    cfg = byte_vocab_config(ModelConfig.from_name(spec))
    hf, ours = random_pair(cfg, device, dtype, "flash_attention_2" if device.type == "cuda" and _has_flash() else "sdpa")
    if not need_hf:
        del hf
        hf = None
    return ours, hf


def _has_flash() -> bool:
    try:
        import flash_attn  # noqa: F401
        return True
    except ImportError:
        return False


def run_jobs(model, spec, q, folder, out, *, batch_size, workers, max_new_tokens, device, extra=()):
    argv = ["answer", "--model", spec, "--questions", q, "--image-folder", folder, "--answers", out,
            "--batch-size", str(batch_size), "--workers", str(workers), "--max-new-tokens", str(max_new_tokens),
            "--shard-size", "64", "--overwrite", "--no-progress", *extra]
    sync(device)
    t0 = time.perf_counter()
    jobs.main(argv, model=model)
    sync(device)
    dt = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(out)]
    return dt, rows


def run_hf_per_sample(hf, ours, spec, q, folder, *, chunks, max_new_tokens, device, dtype):
    """transformers generate, one question at a time, in ``chunks`` sequential chunks (reload per chunk)."""
    from PIL import Image

    questions = [json.loads(line) for line in open(q)]
    eos = list(ours.cfg.eos_token_ids)
    hf_proc = None
    if os.path.isdir(spec):
        from transformers import AutoProcessor
        hf_proc = AutoProcessor.from_pretrained(spec)
    texts, new_tokens, load_s = [], 0, 0.0
    t0 = time.perf_counter()
    per = -(-len(questions) // chunks)
    for c in range(chunks):
        if os.path.isdir(spec) and c > 0:  # each chunk is a fresh process that loads the checkpoint
            from transformers import Qwen2_5_VLForConditionalGeneration
            tl = time.perf_counter()
            del hf
            if device.type == "cuda":
                torch.cuda.empty_cache()
            hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(spec, dtype=dtype).to(device).eval()
            sync(device)
            load_s += time.perf_counter() - tl
        for d in questions[c * per:(c + 1) * per]:
            img = Image.open(os.path.join(folder, d["image"])).convert("RGB")
            if hf_proc is not None:
                msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": d["text"]}]}]
                prompt = hf_proc.apply_chat_template(msgs, add_generation_prompt=True)
                inputs = hf_proc(text=[prompt], images=[img], return_tensors="pt").to(device)
            else:
                x = ours.processor.prepare([[img]], [d["text"]], chat_template=True, padding_side="left")
                inputs = {k: getattr(x, k) for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                                      "mm_token_type_ids") if getattr(x, k, None) is not None}
                inputs = {k: v.to(device) for k, v in inputs.items()}
            with torch.inference_mode():
                out = hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                  pad_token_id=ours.cfg.pad_token_id)
            gen = out[0, inputs["input_ids"].shape[1]:].tolist()
            n = next((i + 1 for i, t in enumerate(gen) if t in eos), len(gen))
            new_tokens += n - int(bool(gen) and gen[n - 1] in eos)
            texts.append(ours.processor.tokenizer.decode(gen[:n], skip_special_tokens=True).strip()
                         if hf_proc is None else hf_proc.decode(gen[:n], skip_special_tokens=True).strip())
    sync(device)
    return time.perf_counter() - t0, load_s, texts, new_tokens


def _loadavg():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="preset (random weights), checkpoint directory or hub id")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--n", type=int, default=None, help="questions (default 48 on CPU, 256 on CUDA)")
    ap.add_argument("--min-side", type=int, default=None, help="image side range, px (default 56..224 CPU)")
    ap.add_argument("--max-side", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 16 on CPU, 64 on CUDA")
    ap.add_argument("--batch-size", type=int, default=None, help="jobs batch size (default 16 CPU, 32 CUDA)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--hf-chunks", type=int, default=1, help="chunks of the bash-loop-style baseline")
    ap.add_argument("--skip-hf", action="store_true", help="leave out the transformers baseline")
    ap.add_argument("--skip-bs1", action="store_true", help="leave out the batch-size-1 row")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    a.model = model_source(a.model)  # a preset name, or a directory (a hub id: its snapshot in the hub cache)

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if (a.dtype == "auto" and cuda) or a.dtype == "bfloat16" else torch.float32
    n = a.n or (256 if cuda else 48)
    lo, hi = a.min_side or (224 if cuda else 56), a.max_side or (896 if cuda else 224)
    max_new = a.max_new_tokens or (64 if cuda else 16)
    bs = a.batch_size or (32 if cuda else 16)
    if a.threads:
        torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory() as tmp:
        q, folder = make_dataset(tmp, n, lo, hi, a.seed)
        ours, hf = build_models(a.model, device, dtype, need_hf=not a.skip_hf)
        model_spec = a.model
        results = []
        # warm-up (kernels, allocator, thread pools) on a few questions
        run_jobs(ours, model_spec, q, folder, os.path.join(tmp, "warm.jsonl"), batch_size=bs, workers=a.workers,
                 max_new_tokens=max_new, device=device, extra=("--limit", str(min(n, 2 * bs))))
        dt, rows = run_jobs(ours, model_spec, q, folder, os.path.join(tmp, "a.jsonl"), batch_size=bs,
                            workers=a.workers, max_new_tokens=max_new, device=device)
        toks = sum(r["metadata"].get("n_new_tokens", 0) for r in rows)
        results.append({"method": f"jobs, batched (batch {bs}, {a.workers} workers)", "n": n, "seconds": dt,
                        "qps": n / dt, "new_tokens": toks, "tps": toks / dt})
        batched_texts = [r["text"] for r in rows]
        if not a.skip_bs1:
            dt, rows = run_jobs(ours, model_spec, q, folder, os.path.join(tmp, "b.jsonl"), batch_size=1, workers=0,
                                max_new_tokens=max_new, device=device)
            toks = sum(r["metadata"].get("n_new_tokens", 0) for r in rows)
            results.append({"method": "jobs, batch 1, no prefetch", "n": n, "seconds": dt, "qps": n / dt,
                            "new_tokens": toks, "tps": toks / dt,
                            "same_answers": sum(r["text"] == t for r, t in zip(rows, batched_texts)) / n})
        if hf is not None:
            with open(os.path.join(tmp, "warm-q.jsonl"), "w") as f:  # the baseline gets a warm-up too
                f.writelines(open(q).readlines()[:2])
            run_hf_per_sample(hf, ours, a.model, os.path.join(tmp, "warm-q.jsonl"), folder, chunks=1,
                              max_new_tokens=max_new, device=device, dtype=dtype)
            dt, load_s, texts, toks = run_hf_per_sample(hf, ours, a.model, q, folder, chunks=a.hf_chunks,
                                                        max_new_tokens=max_new, device=device, dtype=dtype)
            results.append({"method": f"HF generate per sample, {a.hf_chunks} chunk(s)", "n": n, "seconds": dt,
                            "load_s": load_s if os.path.isdir(a.model) else None, "qps": n / dt,
                            "new_tokens": toks, "tps": toks / dt,
                            "same_answers": sum(x == t for x, t in zip(texts, batched_texts)) / n})
    base, base_tps = results[-1]["qps"], results[-1]["tps"]
    for r in results:  # per question, and per new token (rows may stop at EOS at other steps in bf16)
        r["speedup"] = r["qps"] / base
        r["speedup_tps"] = r["tps"] / base_tps if base_tps else None
    meta = {**header(device), "model": a.model, "dtype": str(dtype).replace("torch.", ""), "questions": n,
            "torch_threads": torch.get_num_threads(), "load_average": _loadavg(),
            "image_sides_px": [lo, hi], "max_new_tokens": max_new, "random_weights": not os.path.isdir(a.model),
            "method": "one timed run per method (a whole job each, after a warm-up run on a few questions), one "
                      "after another: not interleaved"}
    print(f"# answer job throughput: {meta['device']}, model {a.model}"
          f"{' (random weights)' if meta['random_weights'] else ''}, {meta['dtype']}, {n} questions, "
          f"images {lo}-{hi} px, max_new_tokens {max_new}; {meta['torch_threads']} torch threads, "
          f"load average {meta['load_average']}\n")
    print(markdown_table(results, [("method", "method"), ("seconds", "seconds"), ("load_s", "model loads (s)"),
                                   ("qps", "questions/s"), ("new_tokens", "new tokens"), ("tps", "new tokens/s"),
                                   ("speedup", "speedup vs last row"), ("speedup_tps", "speedup in new tokens/s"),
                                   ("same_answers", "same text as batched")]))
    write_json(a.json, {"meta": meta, "rows": results})
    return results


if __name__ == "__main__":
    main()
