"""Tensor-parallel benchmark: 1 process vs 2 (time, per-rank memory), and per-rank memory of the presets.

  run:     the same model as one process and split over 2 ranks (torchrun, gloo on CPU / NCCL on CUDA); feature
           extraction (B=4, one 224x224 image + 64 text tokens each) and greedy generation (8 new tokens).
           Calls interleaved (2 ranks, then one process on rank 0 while rank 1 waits); medians after warm-up.
           On CPU each rank gets one thread; the single process runs with one thread and with all cores.
           Default model: the 3B decoder shapes (real vocabulary, 4 of its 36 layers) with a small vision tower.
  memory:  per-rank bytes of the weights and of the KV cache per token of every preset at tp_size 1/2/4/8,
           from meta tensors (no memory used), and how many KV-cache tokens fit which GPU.

  python bench/bench_tp.py                                   # CPU: run (spawns torchrun) + memory table
  python bench/bench_tp.py --part memory                     # the memory table only
  torchrun --nproc_per_node 2 bench/bench_tp.py --part run --device cuda --dtype bfloat16 --config 7b
                                                             # a machine with 2 GPUs (7B fits one GPU too)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import header, markdown_table, peak_memory, sync, write_json  # noqa: E402
from qwen_batched import QwenBatchedVL  # noqa: E402
from qwen_batched.config import ModelConfig, VisionConfig  # noqa: E402
from qwen_batched.tp import TensorParallel  # noqa: E402

GIB = 2**30
# usable memory as the driver reports it (MiB), not the marketing size
GPUS = {"L40S 48 GB": 46068, "A100/H100 80 GB": 81559, "H200 141 GB": 143771}
RESERVE_GIB = 8  # CUDA context, activations of one sub-batch, vision tower temporaries


# ---------------------------------------------------------------------------------------------- memory (meta)
def per_rank_bytes(cfg: ModelConfig, tp_size: int, dtype_bytes: int = 2) -> dict:
    """Weights of one rank (split as ``qwen_batched.tp`` splits them) and KV cache per token, from meta tensors."""
    with torch.device("meta"):
        model = QwenBatchedVL(cfg)
    if tp_size > 1:
        TensorParallel(size=tp_size, rank=0, group=None, device=torch.device("meta")).apply(model)
    params = {id(p): p for p in model.parameters()}.values()  # a tied lm_head counted once
    weights = sum(p.numel() for p in params) * dtype_bytes
    t = cfg.text
    kv = 2 * t.num_hidden_layers * (t.num_key_value_heads // tp_size) * t.head_dim * dtype_bytes
    embed = t.vocab_size * t.hidden_size * dtype_bytes
    return {"weights": weights, "kv_per_token": kv, "embed_split_saving": embed - embed // tp_size}


def memory_table(presets=("3b", "7b", "32b", "72b"), sizes=(1, 2, 4, 8)) -> list[dict]:
    rows = []
    for name in presets:
        cfg = ModelConfig.from_name(name)
        for n in sizes:
            if cfg.text.num_key_value_heads % n:
                continue
            b = per_rank_bytes(cfg, n)
            row = {"preset": name, "tp_size": n, "weights_gib": b["weights"] / GIB,
                   "kv_kib_per_token": b["kv_per_token"] / 1024, "embed_split_gib": b["embed_split_saving"] / GIB}
            for gpu, mib in GPUS.items():
                free = mib * 2**20 - b["weights"] - RESERVE_GIB * GIB
                row[gpu] = f"{free / b['kv_per_token'] / 1000:.0f}k" if free > 0 else "no"
            rows.append(row)
    return rows


def memory_report(rows: list[dict]) -> str:
    cols = [("preset", "preset"), ("tp_size", "tp_size"), ("weights_gib", "weights / rank (GiB)"),
            ("kv_kib_per_token", "KV / token / rank (KiB)"), ("embed_split_gib", "saved if embeddings split (GiB)")]
    cols += [(g, f"{g}: KV tokens") for g in GPUS]
    return (f"bf16; KV tokens = (GPU memory - weights - {RESERVE_GIB} GiB reserve) / KV bytes per token "
            f"(summed over the batch: rows x (prompt + new tokens)); 'no' = the weights do not fit\n\n"
            + markdown_table(rows, cols))


# ---------------------------------------------------------------------------------------------- run (torchrun)
SMALL_VISION = VisionConfig(depth=8, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=2048,
                            fullatt_block_indexes=(1, 3, 5, 7))


def bench_config(name: str) -> ModelConfig:
    if name == "3b-4layers":
        cfg = ModelConfig.from_name("3b")
        return dataclasses.replace(cfg, vision=SMALL_VISION,
                                   text=dataclasses.replace(cfg.text, num_hidden_layers=4)).validate()
    return ModelConfig.from_name(name)


def make_batch(cfg: ModelConfig, n: int = 4, px: int = 224, n_text: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    side = px // cfg.vision.patch_size
    block = [cfg.vision_start_token_id] + [cfg.image_token_id] * (side * side // cfg.vision.merge_unit) \
        + [cfg.vision_end_token_id]
    ids = torch.stack([torch.cat([torch.randint(0, 256, (n_text // 2,), generator=g), torch.tensor(block),
                                  torch.randint(0, 256, (n_text // 2,), generator=g)]) for _ in range(n)])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), image_grid_thw=torch.tensor([[1, side, side]] * n),
                pixel_values=torch.randn(n * side * side, cfg.vision.patch_dim, generator=g))


def weight_bytes(model) -> int:
    """Bytes of the storages behind the parameters (a tied lm_head, a view of the embeddings, counted once)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def run(args) -> None:
    """One rank of the 1-vs-2 comparison (under torchrun with 2 processes)."""
    import torch.distributed as dist

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = bench_config(args.config)
    tp = QwenBatchedVL.from_config(cfg, tp_size=2, device=device, dtype=dtype)
    rank, cpu = dist.get_rank(), device.type == "cpu"
    single = QwenBatchedVL.from_config(cfg, device=tp.device, dtype=dtype) if rank == 0 else None
    batch = {k: v.to(tp.device) for k, v in make_batch(cfg).items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    impls = {"tp 2 (per rank)": (tp, 1), "1 process": (single, os.cpu_count())}
    if cpu:
        impls = {"tp 2 (per rank)": (tp, 1), "1 process, 1 thread": (single, 1),
                 f"1 process, {os.cpu_count()} threads": (single, os.cpu_count())}

    def features(m):
        return lambda: m.extract_features(**batch, layers=[-1]).hidden_states[0]

    def generate(m):
        return lambda: m.generate(**batch, max_new_tokens=8, eos_token_id=[]).sequences

    def timed(fn, n_threads) -> float:
        if cpu:
            torch.set_num_threads(n_threads)
        sync(tp.device)
        t0 = time.perf_counter()
        out = fn()
        sync(tp.device)
        timed.out = out
        return time.perf_counter() - t0

    rows = []
    names = list(impls)
    for task, make in (("features", features), ("generate 8", generate)):
        times = {n: [] for n in names}
        outs = {}
        for r in range(args.warmup + args.reps):
            for impl in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
                model, n_threads = impls[impl]
                if model is tp or rank == 0:  # rank 1 waits while rank 0 runs one process
                    t = timed(make(model), n_threads)
                    outs[impl] = timed.out
                    if r >= args.warmup:
                        times[impl].append(t)
                dist.barrier()
        if cpu:
            torch.set_num_threads(1)
        mem_tp = peak_memory(make(tp), tp.device)
        mem_single = peak_memory(make(single), tp.device) if rank == 0 else None
        if rank == 0:
            ref = outs[names[1]]
            for impl in names:
                a = outs[impl]
                agree = (a == ref).float().mean().item() if not a.is_floating_point() else \
                    ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
                model = impls[impl][0]
                rows.append({"task": task, "impl": impl, "median_s": statistics.median(times[impl]),
                             "weights": weight_bytes(model), "peak_extra": mem_tp if model is tp else mem_single,
                             "check": agree})
    if rank == 0:
        for r in rows:
            r["weights_mib"] = r.pop("weights") / 2**20
            r["peak_extra_mib"] = None if r["peak_extra"] is None else r.pop("peak_extra") / 2**20
        cols = [("task", "task"), ("impl", "run"), ("median_s", "median (s)"), ("weights_mib", "weights (MiB)"),
                ("peak_extra_mib", "peak extra (MiB)"), ("check", "agreement")]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        print(f"{args.config}, {args.dtype}, {tp.device}; {args.reps} reps after {args.warmup} warm-up; load average "
              f"{load}; agreement with one process: features max rel err, generate fraction of equal tokens")
        print(markdown_table(rows, cols))
        write_json(args.json, {**header(tp.device), "config": args.config, "load_average": load, "rows": rows})
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("all", "run", "memory"), default="all")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--config", default="3b-4layers", help="3b-4layers (default) or a preset name")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.part != "memory" and "WORLD_SIZE" in os.environ:  # a rank under torchrun
        return run(args)
    if args.part != "memory":  # launch the run part under torchrun
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.abspath(__file__), "--part", "run", "--device", args.device, "--dtype", args.dtype,
               "--config", args.config, "--warmup", str(args.warmup), "--reps", str(args.reps)]
        if args.json:
            cmd += ["--json", args.json]
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if args.part != "run":
        print()
        print(memory_report(memory_table()))


if __name__ == "__main__":
    main()
