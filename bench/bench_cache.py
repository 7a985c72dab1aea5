"""Per-image embedding cache: what it saves on repeated images, with and without the cache, same inputs.

  static cameras   B robots x 4 cameras per step, 3 of them static (the same frame every step), 1 moving.
  one image, many questions   B prompts about one image in one batch (in-batch duplicates encoded once).

Each row times ``extract_features`` end to end (processor, vision tower, decoder; last layer) and checks that
the cached result equals the uncached one.

  python bench/bench_cache.py                  # CPU, tiny config
  python bench/bench_cache.py --device cuda --config 3b --json out.json
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import header, markdown_table, time_fn, write_json  # noqa: E402
from bench.bench_vit import CPU_SMALL  # noqa: E402
from qwen_batched import ModelConfig, QwenBatchedVL  # noqa: E402
from qwen_batched.tokenizer import ByteTokenizer  # noqa: E402


def frames(n: int, size: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8).to(device)


def static_cameras(model, batch: int, size: int, steps: int, device):
    """Per step: (batch, 4, 3, size, size) with cameras 0-2 fixed per robot and camera 3 new."""
    static = frames(batch * 3, size, 0, device).view(batch, 3, 3, size, size)
    return [torch.cat([static, frames(batch, size, 100 + s, device)[:, None]], dim=1) for s in range(steps)]


def run(model: QwenBatchedVL, name: str, inputs: list, texts: list[str], device, reps: int) -> dict:
    """Time extract_features over ``inputs`` (one call per element, cycled) with and without the cache."""
    state = {"i": 0}

    def step():
        x = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        return model.extract_features(images=x, texts=texts, layers=[-1])

    model.disable_image_cache()
    ref = model.extract_features(images=inputs[-1], texts=texts, layers=[-1]).hidden_states[0]
    t_off = time_fn(step, device, warmup=1, reps=reps)
    model.enable_image_cache(max_bytes=1 << 30)
    state["i"] = 0
    t_on = time_fn(step, device, warmup=1, reps=reps)
    out = model.extract_features(images=inputs[-1], texts=texts, layers=[-1]).hidden_states[0]
    cache = model.image_cache
    row = {"case": name, "no_cache_ms": t_off["median_s"] * 1e3, "cache_ms": t_on["median_s"] * 1e3,
           "speedup": t_off["median_s"] / t_on["median_s"], "hit_rate": cache.hits / max(1, cache.hits + cache.misses),
           "cache_MiB": cache.bytes / 2**20,
           "max_rel_err": ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()}
    model.disable_image_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", default=None,
                    help="tiny | vit-small (tiny decoder, bench_vit's CPU vision tower) | 3b | 7b "
                         "(default: tiny and vit-small on CPU, 3b on CUDA)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    names = [args.config] if args.config else (["3b"] if device.type == "cuda" else ["tiny", "vit-small"])
    rows = [r for name in names for r in bench_config(name, device, args.reps)]
    meta = {**header(device), "config": "+".join(names), "reps": args.reps}
    print(f"## Image cache: {meta['device']}, {meta['date']}, commit {meta['commit']}")
    print(markdown_table(rows, [("config", "config"), ("case", "case"), ("no_cache_ms", "no cache ms"),
                                ("cache_ms", "cache ms"), ("speedup", "speedup"), ("hit_rate", "hit rate"),
                                ("cache_MiB", "cache MiB"), ("max_rel_err", "max rel err")]))
    write_json(args.json, {"meta": meta, "rows": rows})
    return rows


def bench_config(cfg_name: str, device, reps: int) -> list[dict]:
    if cfg_name == "vit-small":
        tiny = ModelConfig.from_name("tiny")
        cfg = ModelConfig(**{**tiny.__dict__, "vision": CPU_SMALL.__class__(**{**CPU_SMALL.__dict__,
                                                                              "out_hidden_size": tiny.text.hidden_size})})
    else:
        cfg = ModelConfig.from_name(cfg_name)
    model = QwenBatchedVL.from_config(cfg, device=device)
    if model.processor.tokenizer is None:  # random-weight real shapes: byte-level prompts, same sequence lengths
        model.processor.tokenizer = ByteTokenizer()
        for k in ("image_token_id", "vision_start_token_id", "vision_end_token_id", "pad_token_id"):
            setattr(model.processor, k, getattr(model.cfg, k))
    batch, size = 8, 224
    rows = [
        run(model, f"static cameras: {batch} robots x 4 cams {size}px, 3 static", static_cameras(model, batch, size, 6, device),
            ["pick up the cube"] * batch, device, reps),
        run(model, f"one {2 * size}px image, {2 * batch} questions in a batch",
            [[[frames(1, 2 * size, 7, device)[0]]] * (2 * batch)], [f"question {i}?" for i in range(2 * batch)],
            device, reps),
    ]
    dtype = str(model.dtype).replace("torch.", "")
    return [{"config": f"{cfg_name} ({dtype})", **r} for r in rows]

if __name__ == "__main__":
    main()
