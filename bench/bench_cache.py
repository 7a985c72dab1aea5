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
from bench.common import header, markdown_table, time_fns, write_json  # noqa: E402
from bench.bench_vit import CPU_SMALL  # noqa: E402
from qwen_batched import ModelConfig, QwenBatchedVL  # noqa: E402
from qwen_batched.tokenizer import ByteTokenizer  # noqa: E402


def frames(n: int, size: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8).to(device)


def static_cameras(batch: int, size: int, device):
    """Step i -> (batch, 4, 3, size, size): cameras 0-2 fixed per robot, camera 3 a new frame every step."""
    static = frames(batch * 3, size, 0, device).view(batch, 3, 3, size, size)
    return lambda i: torch.cat([static, frames(batch, size, 100 + i, device)[:, None]], dim=1)


def run(model: QwenBatchedVL, name: str, make_input, texts: list[str], device, reps: int) -> dict:
    """Time extract_features on ``make_input(step)`` (a fresh step each call) with and without the cache."""
    state = {"i": 0}

    def step():
        state["i"] += 1
        return model.extract_features(images=make_input(state["i"]), texts=texts, layers=[-1])

    model.disable_image_cache()
    ref = model.extract_features(images=make_input(0), texts=texts, layers=[-1]).hidden_states[0]
    model.enable_image_cache(max_bytes=1 << 30)
    cache = model.image_cache

    def off():  # the same model with its cache detached
        model.image_cache = None
        try:
            return step()
        finally:
            model.image_cache = cache

    t = time_fns({"off": off, "on": step}, device, warmup=1, reps=reps)  # interleaved
    t_off, t_on = t["off"], t["on"]
    cache.hits = cache.misses = 0
    for _ in range(3):  # steady-state hit rate
        step()
    out = model.extract_features(images=make_input(0), texts=texts, layers=[-1]).hidden_states[0]
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
        run(model, f"static cameras: {batch} robots x 4 cams {size}px, 3 static", static_cameras(batch, size, device),
            ["pick up the cube"] * batch, device, reps),
        run(model, f"one {2 * size}px image, {2 * batch} questions in a batch",
            lambda i, im=frames(1, 2 * size, 7, device)[0]: [[im]] * (2 * batch),
            [f"question {i}?" for i in range(2 * batch)], device, reps),
    ]
    dtype = str(model.dtype).replace("torch.", "")
    return [{"config": f"{cfg_name} ({dtype})", **r} for r in rows]

if __name__ == "__main__":
    main()
