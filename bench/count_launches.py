"""Kernel launches per decoder layer and per vision block: what a batch-1 step's latency is bound by on a GPU.

Counts, in layer 0 of the decoder and block 0 of the vision tower, the aten ops that launch work (views and
allocations left out) and the Triton kernels, with the Triton kernels forced on (interpreted on a CPU). The
attention call itself (SDPA, the varlen kernel, KV-cache writes) is counted apart: this work does not change it.
Paths: padded prefill (SDPA), packed prefill (varlen backends; the varlen kernel stubbed on a CPU), the feature
step's prefill (cos/sin broadcast over the batch), a KV-cache decode step, and the vision block on 'sdpa' and on
a packed backend.

  TRITON_INTERPRET=1 python bench/count_launches.py [--ops] [--dtype float32] [--torch]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qwen_batched.fused as fused  # noqa: E402
from qwen_batched import QwenBatchedVL, generation, step, text, vision  # noqa: E402
from qwen_batched.rope import mrope_cos_sin  # noqa: E402

_ALLOC = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh")


def _storages(tree) -> set[int]:
    leaves = tree if isinstance(tree, (list, tuple)) else [tree]
    return {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}


def _does_work(func, args, out) -> bool:
    """Whether an op launches work: it returns a tensor that is not a view of an input (``contiguous`` of a
    contiguous tensor, ``to`` of the same dtype return their input), and is no bare allocation."""
    if func.overloadpacket.__name__ in _ALLOC:
        return False
    fresh = _storages(out)
    if not fresh:
        return False  # no tensor out: promote_types, sizes
    return not func.is_view or not fresh <= _storages(list(args))


class Counter(TorchDispatchMode):
    """Records (scope, op) for every aten op that does work, and (scope, 'triton:<kernel>') per Triton launch."""

    def __init__(self):
        super().__init__()
        self.scope: list[str] = []
        self.events: list[tuple[tuple[str, ...], str]] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused and _does_work(func, args, out):
            self.events.append((tuple(self.scope), func.overloadpacket.__name__))
        return out

    def record(self, name: str) -> None:
        self.events.append((tuple(self.scope), name))

    @contextlib.contextmanager
    def within(self, label: str):
        self.scope.append(label)
        try:
            yield
        finally:
            self.scope.pop()

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


def _patch_triton(mp: contextlib.ExitStack, counter: Counter) -> None:
    """Count each Triton launch once; the interpreter's own tensor traffic is not counted."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for cls in (InterpretedFunction, JITFunction):
        orig = cls.run

        def run(self, *a, _orig=orig, **kw):
            counter.record(f"triton:{self.__name__}")
            with counter.pause():
                return _orig(self, *a, **kw)
        cls.run = run
        mp.callback(setattr, cls, "run", orig)


def _wrap_call(mp: contextlib.ExitStack, counter: Counter, owner, name: str, stub=None) -> None:
    """owner.name(...) runs inside the 'attn' scope (replaced by ``stub`` with its work uncounted, if given)."""
    orig = getattr(owner, name)

    def call(*a, **kw):
        with counter.within("attn"):
            if stub is None:
                return orig(*a, **kw)
            counter.record("varlen_attention (stub)")
            with counter.pause():
                return stub(orig, *a, **kw)
    setattr(owner, name, call)
    mp.callback(setattr, owner, name, orig)


def _scoped(module: torch.nn.Module, counter: Counter, label: str) -> None:
    module.register_forward_pre_hook(lambda *_: counter.scope.append(label))
    module.register_forward_hook(lambda *_: counter.scope.pop() and None)  # a hook's result replaces the output


def _varlen_stub(orig, q, k, v, plan, backend, causal=False, scale=None):
    if causal:  # the decoder's packed prefill: only the shape matters here
        return torch.zeros_like(q)
    return orig(q, k, v, plan, "sdpa", causal, scale)  # the vision tower: its plan has the sdpa buckets


def count(fn, counter: Counter, where: str = "layer") -> dict:
    """Run ``fn``; the work recorded inside scope ``where``: aten ops, attention-call ops, Triton launches."""
    counter.events.clear()
    fn()
    inside = [(s, op) for s, op in counter.events if where in s]
    ops = collections.Counter(op for s, op in inside if "attn" not in s and not op.startswith("triton:"))
    attn = collections.Counter(op for s, op in inside if "attn" in s)
    triton = collections.Counter(op for s, op in inside if op.startswith("triton:"))
    return {"ops": ops, "attn": attn, "triton": triton}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ops", action="store_true", help="list the ops of each row")
    ap.add_argument("--torch", action="store_true", help="the torch path (kernels off) instead")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = QwenBatchedVL.from_config("tiny", seed=0, dtype=dtype)
    cfg, dev = model.cfg, model.device
    counter = Counter()
    rows = {}
    with contextlib.ExitStack() as mp, torch.inference_mode():
        mp.callback(setattr, fused, "_use_kernel", fused._use_kernel)
        fused._use_kernel = lambda x: not args.torch  # the CUDA policy, on this CPU
        _patch_triton(mp, counter)
        for cls in (text.PaddedAttention, text.PackedAttention, generation.DecodeAttention,
                    generation.CachedPrefillAttention):
            _wrap_call(mp, counter, cls, "__call__")
        _wrap_call(mp, counter, step, "_causal_sdpa")
        _wrap_call(mp, counter, text, "varlen_attention", _varlen_stub)
        _wrap_call(mp, counter, vision, "varlen_attention", _varlen_stub)
        _scoped(model.model.layers[0], counter, "layer")
        _scoped(model.visual.blocks[0], counter, "layer")
        mp.enter_context(counter)

        B, L, D = 1, 24, cfg.text.hidden_size
        h = torch.randn(B, L, D, dtype=dtype)
        pos = torch.arange(L).expand(3, B, L)
        valid = torch.ones(B, L, dtype=torch.bool)
        rope = model.caches.rope(dev)
        for backend in ("sdpa", "torch_varlen"):
            rows[f"decoder prefill, {backend}"] = count(lambda: text.run_batch(
                model.model, h, pos, valid, rope=rope, backend=backend, lengths=[L] * B), counter)
        cos, sin = mrope_cos_sin(pos[:, :1], *rope, dtype)  # (1, L, hd): the feature step's tables, for 2 rows here
        rows["decoder prefill, feature step (sdpa)"] = count(lambda: model.model(
            torch.randn(2, L, D, dtype=dtype), cos, sin, step._causal_sdpa), counter)
        cache = generation.KVCache(cfg.text.num_hidden_layers, B, cfg.text.num_key_value_heads, L + 4,
                                   cfg.text.head_dim, dev, dtype)
        dec = generation.StaticDecoder(model.model, model.lm_head, cache, rope)
        rows["decoder decode step"] = count(lambda: dec(
            torch.zeros(B, dtype=torch.long), torch.full((3, B), L), torch.full((B,), L)), counter)

        grids = ((1, 8, 8),) * 3
        px = torch.randn(sum(t * hh * w for t, hh, w in grids), cfg.vision.patch_dim)
        geo = model.caches.geometry(grids, dev, "sdpa")
        for backend in ("sdpa", "torch_varlen"):
            rows[f"vision block, {backend}"] = count(lambda: model.visual(px, geo, backend), counter)

    print(f"per layer/block, {args.dtype}, Triton kernels {'off' if args.torch else 'on'} "
          "(launches = aten ops + Triton kernels)\n")
    print("| path | aten ops | Triton kernels | launches | attention call (unchanged) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        n_ops, n_tri = sum(r["ops"].values()), sum(r["triton"].values())
        print(f"| {name} | {n_ops} | {n_tri} | {n_ops + n_tri} | {sum(r['attn'].values())} |")
    if args.ops:
        for name, r in rows.items():
            print(f"\n{name}:\n  ops: {dict(r['ops'])}\n  triton: {dict(r['triton'])}\n  attention: {dict(r['attn'])}")


if __name__ == "__main__":
    main()
