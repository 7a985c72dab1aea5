"""CUDA check of the tensor-parallel code paths on a machine with ONE GPU: 2 ranks share it over gloo.

Checks what a CPU run cannot: slices read by from_pretrained onto CUDA, the packed varlen prefill and bf16 with the
local head counts, and the compiled decode step (torch.compile over the functional collectives). Not a speed
test (both ranks share one GPU, and gloo copies through the host); a real run gives each rank its own GPU (NCCL).

  torchrun --standalone --nproc-per-node 2 bench/tp_gpu_check.py [OUT_DIR]
Prints and writes rank{r}.json: max relative errors against one process and the fraction of equal tokens.
"""
import json
import os
import sys
import time
import traceback
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
dist.init_process_group("gloo")
rank = dist.get_rank()
import qwen_batched.tp as tpm
tpm.socket.gethostname = lambda: f"host-{rank}"  # let two ranks share cuda:0 (refused otherwise, rightly)
from qwen_batched import QwenBatchedVL
from qwen_batched.config import tiny_config
from bench.bench_tp import bench_config, make_batch
from tests.helpers import hf_config_dict
res = {}
def err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
def step(name, fn):
    t = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            res[name] = fn()
            if w: res[name + "_warnings"] = [str(x.message)[:300] for x in w][:3]
    except Exception as e:
        res[name] = "FAILED " + "".join(traceback.format_exception_only(e))[-800:]
    res[name + "_s"] = round(time.perf_counter() - t, 1)
    dist.barrier()
# 1) from_pretrained slices on cuda (fp32, tiny): parity with one process
work = "/tmp/tpgpu"
if rank == 0:
    os.makedirs(work, exist_ok=True)
    from safetensors.torch import save_file
    m = QwenBatchedVL.from_config("tiny", seed=1)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f"{work}/model.safetensors")
    json.dump(hf_config_dict(tiny_config()), open(f"{work}/config.json", "w"))
dist.barrier()
def tiny_parity():
    tp = QwenBatchedVL.from_pretrained(work, tp_size=2, device="cuda", dtype=torch.float32)
    one = QwenBatchedVL.from_pretrained(work, device="cuda", dtype=torch.float32)
    cfg = tiny_config()
    b = {k: v.cuda() for k, v in make_batch(cfg, n=3, px=112, n_text=16).items()}
    a, r = (m.extract_features(**b).hidden_states for m in (tp, one))
    g = [m.generate(**b, max_new_tokens=8, eos_token_id=[]).sequences for m in (tp, one)]
    return {"device": str(tp.device), "backend": tp.backend, "max_rel_err_layers": max(err(x, y) for x, y in zip(a, r)),
            "greedy_equal": bool(torch.equal(*g)), "n_kv_local": tp.model.layers[0].self_attn.n_kv}
step("tiny_fp32_from_pretrained", tiny_parity)
# 2) 3B shapes (4 layers, real vocab) in bf16: packed prefill backend, generate, compile
cfg = bench_config("3b-4layers")
tp = QwenBatchedVL.from_config(cfg, tp_size=2, device="cuda", dtype=torch.bfloat16)
one = QwenBatchedVL.from_config(cfg, device="cuda", dtype=torch.bfloat16)
b = make_batch(cfg); b = {k: v.cuda() for k, v in b.items()}; b["pixel_values"] = b["pixel_values"].bfloat16()
res["backend_3b"] = tp.backend
step("bf16_features", lambda: err(tp.extract_features(**b, layers=[-1]).hidden_states[0],
                                  one.extract_features(**b, layers=[-1]).hidden_states[0]))
def gen(compile):
    x = tp.generate(**b, max_new_tokens=16, eos_token_id=[], compile=compile).sequences
    y = one.generate(**b, max_new_tokens=16, eos_token_id=[]).sequences
    return (x == y).float().mean().item()
step("bf16_greedy_match", lambda: gen(False))
step("bf16_greedy_match_compiled", lambda: gen(True))
res["mem_alloc_gib"] = torch.cuda.memory_allocated() / 2**30
out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
os.makedirs(out_dir, exist_ok=True)
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(res, f, indent=1)
print(rank, json.dumps(res, indent=1), flush=True)
dist.destroy_process_group()
