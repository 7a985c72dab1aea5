"""qwen_batched end to end: multi-camera frames -> decoder features, generated tokens, feature-extraction throughput.

  python example.py                                  # embedded default: random-weight tiny model, CPU
  python example.py --model /path/to/Qwen2.5-VL-3B-Instruct --device cuda --dtype bfloat16
  python example.py --step                           # the real-time feature step (fixed cameras, one call per step)
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from qwen_batched import QwenBatchedVL


def synthetic_frames(batch: int, cameras: int, size: int, device, step: int = 0) -> torch.Tensor:
    """(batch, cameras, 3, size, size) uint8 frames: a gradient background with a moving bright disc."""
    y = torch.linspace(0, 1, size, device=device)[:, None]
    x = torch.linspace(0, 1, size, device=device)[None, :]
    frames = torch.empty(batch, cameras, 3, size, size, dtype=torch.uint8, device=device)
    for b in range(batch):
        for c in range(cameras):
            phase = 2 * math.pi * (step + b * cameras + c) / 17
            cy, cx = 0.5 + 0.3 * math.sin(phase), 0.5 + 0.3 * math.cos(phase)
            disc = (((y - cy) ** 2 + (x - cx) ** 2) < 0.02).float()
            img = torch.stack([x * (1 - y), y.expand(size, size), 0.5 * (x + y)]) * 0.7 + 0.3 * disc
            frames[b, c] = (img * 255).round().clamp(0, 255).to(torch.uint8)
    return frames


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_step(model, args) -> None:
    """The real-time path: a fixed-shape feature step built once, then one call per control step."""
    B, N, size = args.batch, args.cameras, args.size
    instruction = "pick up the red cube"
    step = model.feature_step(B, N, size, size, texts=instruction)  # one captured CUDA graph per step on a GPU
    print(f"\nfeature step: {step}")
    cams = [f"cam{c}" for c in range(N)]  # LeRobot style: one (B, 3, H, W) tensor per camera
    frames = [synthetic_frames(B, N, size, model.device, step=s) for s in range(args.iters + 1)]
    observation = [{c: f[:, i] for i, c in enumerate(cams)} for f in frames]
    out = step(observation[0])  # warm-up (captures the CUDA graph on a GPU)
    h = out.hidden_states[0]
    print(f"  hidden_states[0] {tuple(h.shape)} {h.dtype}, attention_mask {tuple(out.attention_mask.shape)}, "
          f"image tokens per sample: {step.n_cameras * step.tokens_per_image}, "
          f"last-token features {tuple(h[:, -1].shape)}")
    times = []
    for s in range(1, args.iters + 1):
        sync(model.device)
        t0 = time.perf_counter()
        step(observation[s])
        sync(model.device)
        times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    print(f"  latency (median of {args.iters} steps, fresh frames each): {med * 1e3:.1f} ms per step, "
          f"{1 / med:.1f} steps/s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory or hub id (default: random-weight tiny model)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--batch", type=int, default=4, help="samples per batch")
    ap.add_argument("--cameras", type=int, default=3, help="camera frames per sample")
    ap.add_argument("--size", type=int, default=224, help="frame side in pixels")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5, help="timed feature-extraction batches")
    ap.add_argument("--step", action="store_true", help="run the real-time feature step (model.feature_step) only")
    args = ap.parse_args(argv)
    for name in ("batch", "cameras", "size", "new_tokens", "iters"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")

    if args.model:
        model = QwenBatchedVL.from_pretrained(args.model, device=args.device, dtype=args.dtype)
        print(f"model: {args.model}")
    else:
        model = QwenBatchedVL.from_config("tiny", device=args.device, dtype=args.dtype, seed=0)
        print("model: embedded default 'tiny' -- RANDOM WEIGHTS, real Qwen2.5-VL geometry at a small width.\n"
              "       Its generated tokens are meaningless (shown as ids); use --model PATH for a real checkpoint.")
    print(f"device: {model.device}, dtype: {model.dtype}, attention backend: {model.backend}")
    if args.step:
        return run_step(model, args)

    frames = synthetic_frames(args.batch, args.cameras, args.size, model.device)
    texts = [f"Camera views from robot {i}. What should the gripper do next?" for i in range(args.batch)]
    print(f"\ninput: frames {tuple(frames.shape)} {frames.dtype} on {frames.device}")

    # ---- features: last layer and a middle one, with the image-token mask
    mid = model.cfg.text.num_hidden_layers // 2
    feats = model.extract_features(images=frames, texts=texts, layers=[mid, -1])
    print("\nfeatures:")
    for layer, h in zip(feats.layers, feats.hidden_states):
        print(f"  layer {layer:>3}: {tuple(h.shape)} {h.dtype}")
    print(f"  attention_mask {tuple(feats.attention_mask.shape)}, tokens per sample: "
          f"{feats.attention_mask.sum(1).tolist()}")
    print(f"  image_mask {tuple(feats.image_mask.shape)}, image tokens per sample: {feats.image_mask.sum(1).tolist()}")
    print(f"  vision_embeds {tuple(feats.vision_embeds.shape)}")

    # ---- generation: token ids always; text only for a real checkpoint (random weights decode to noise bytes)
    gen = model.generate(images=frames, texts=texts, max_new_tokens=args.new_tokens)
    print(f"\ngeneration ({args.new_tokens} new tokens max, greedy):")
    for i, (row, n) in enumerate(zip(gen.sequences.tolist(), gen.lengths.tolist())):
        print(f"  [{i}] {n:>3} token ids: {row[:n]}")
        if args.model and gen.texts is not None:
            print(f"      text: {gen.texts[i]!r}")

    # ---- feature-extraction throughput (processor + vision + decoder), fresh frames every step
    steps = [synthetic_frames(args.batch, args.cameras, args.size, model.device, step=s) for s in range(args.iters + 1)]
    model.extract_features(images=steps[0], texts=texts, layers=[-1])  # warm-up
    times = []
    for s in range(1, args.iters + 1):
        sync(model.device)
        t0 = time.perf_counter()
        model.extract_features(images=steps[s], texts=texts, layers=[-1])
        sync(model.device)
        times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    print(f"\nfeature extraction throughput (extract_features: processor + vision + decoder, last layer; median of "
          f"{args.iters}): {med * 1e3:.1f} ms per batch, {args.batch / med:.1f} samples/s, "
          f"{args.batch * args.cameras / med:.1f} frames/s")


if __name__ == "__main__":
    main()
