"""Tensor parallelism on torch.distributed: one model split across the N ranks of a group (``tp_size=N``).

Every rank runs the same call on the same inputs (SPMD, as under ``torchrun``) and gets the same results.

Decoder, per layer (Megatron layout, as gpt-fast's ``tp.py``):
  q/k/v_proj, gate/up_proj  column-parallel: a rank holds 1/N of the output features (its attention heads and
                            KV heads, its slice of the MLP); no communication.
  o_proj, down_proj         row-parallel: 1/N of the input features, then one all-reduce (sum) of the (..., D)
                            output. Two all-reduces per layer, nothing else.
  lm_head                   split over the vocabulary (it is a matmul: 1/N of its weight and time per rank); the
                            (B, V/N) logits are all-gathered, so every rank samples the same token.
  embed_tokens, norms       replicated: a lookup costs no compute, and splitting it would add a masked lookup and
                            an all-reduce per call to save 1/N of one (V, D) table (1.2 GB per rank at 72B, bf16).
  KV cache                  each rank's KV heads only (``Attention.n_kv`` is the local count).
KV heads are split, never replicated: N must divide ``num_key_value_heads`` (and the head count, the MLP width
and the vocabulary); anything else is refused before a weight is read.

Vision tower: weights replicated. The images of a batch are cut into N contiguous runs of about equal patch
count, each rank encodes its run, and the merged features are all-gathered (vLLM's data-parallel encoder).
Each image's encoding does not depend on its neighbours, so the result equals one process's.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_GROUPS: dict[tuple[int, int], object] = {}  # (world size, tp_size) -> this rank's group, built once per process


def _funcol():
    from torch.distributed import _functional_collectives as funcol  # traceable by torch.compile

    return funcol


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """x (n, ...) of every rank, stacked along dim 0 -> (size * n, ...). ``all_gather_single`` where torch has it
    (``all_gather_tensor``, its deprecated name, is the only one in torch 2.11)."""
    funcol = _funcol()
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    return gather(x, 0, group)


# ---------------------------------------------------------------------------------------------- modules
class RowParallelLinear(nn.Linear):
    """A Linear holding 1/N of the input features; the partial products are summed across the group."""

    def __init__(self, in_features: int, out_features: int, group):
        super().__init__(in_features, out_features, bias=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in/N) -> (..., out)
        return _funcol().all_reduce(F.linear(x, self.weight), "sum", self.group)


class VocabParallelLinear(nn.Linear):
    """lm_head holding 1/N of the vocabulary; the logits of all ranks are gathered in vocabulary order."""

    def __init__(self, in_features: int, out_features: int, group, size: int):
        super().__init__(in_features, out_features, bias=False)
        self.group, self.size = group, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., V)
        y = F.linear(x, self.weight)  # (..., V/N)
        g = _all_gather(y.contiguous(), self.group)  # (N * ..., V/N), ranks along dim 0
        return g.view(self.size, *y.shape).movedim(0, -2).flatten(-2)


# ---------------------------------------------------------------------------------------------- the group
@dataclass(frozen=True, eq=False)
class TensorParallel:
    """This rank's place in its tensor-parallel group. ``rank`` is the rank within the group (0..size-1)."""
    size: int
    rank: int
    group: object  # torch.distributed ProcessGroup
    device: torch.device

    # ------------------------------------------------------------ which tensors are split, and how
    def split_dim(self, name: str) -> int | None:
        """The dimension along which parameter ``name`` is split across the group, or None if replicated."""
        if name == "lm_head.weight":
            return 0
        if not name.startswith("model.layers."):
            return None
        leaf = name.rsplit(".", 2)[-2]  # 'q_proj' from 'model.layers.3.self_attn.q_proj.weight'
        if leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            return 0  # weight (out, in) and bias (out,): output features
        if leaf in ("o_proj", "down_proj"):
            return 1  # weight (out, in): input features
        return None

    def select(self, name: str, shape) -> tuple[slice, ...] | None:
        """Index of this rank's slice of a full tensor of ``shape`` (None: the whole tensor)."""
        dim = self.split_dim(name)
        if dim is None or len(shape) <= dim or shape[dim] % self.size:
            return None  # replicated, or a mis-shaped tensor the loader reports whole
        n = shape[dim] // self.size
        return (slice(None),) * dim + (slice(self.rank * n, (self.rank + 1) * n),)

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of ``full`` (a view)."""
        idx = self.select(name, full.shape)
        return full if idx is None else full[idx]

    # ------------------------------------------------------------ the model
    def apply(self, model: nn.Module) -> None:
        """Replace the decoder's split linears of ``model`` (on the meta device) with their local shapes."""
        n, group = self.size, self.group
        with torch.device("meta"):
            for layer in model.model.layers:
                a, m = layer.self_attn, layer.mlp
                for lin in ("q_proj", "k_proj", "v_proj"):
                    setattr(a, lin, _column(getattr(a, lin), n))
                a.o_proj = RowParallelLinear(a.o_proj.in_features // n, a.o_proj.out_features, group)
                a.n_heads, a.n_kv = a.n_heads // n, a.n_kv // n
                m.gate_proj, m.up_proj = _column(m.gate_proj, n), _column(m.up_proj, n)
                m.down_proj = RowParallelLinear(m.down_proj.in_features // n, m.down_proj.out_features, group)
            head = model.lm_head
            model.lm_head = VocabParallelLinear(head.in_features, head.out_features // n, group, n)
        model.tp = self

    # ------------------------------------------------------------ vision, data-parallel
    def encode_images(self, encode, pixel_values: torch.Tensor, grids: tuple, vision_cfg, dtype: torch.dtype,
                      return_pre_merger: bool = False) -> torch.Tensor:
        """``encode(pixel_values, grids)`` (the vision tower) with the images split across the group, all-gathered.

        pixel_values (sum t*h*w, C*T*P*P) on the device, grids: host (t, h, w) per image. Returns what ``encode``
        returns for the whole batch, (sum t*h*w/mu, out) (or (sum t*h*w, hidden) with ``return_pre_merger``), on
        every rank.
        """
        patches = [t * h * w for t, h, w in grids]
        cuts = split_images(patches, self.size)
        starts = [0, *itertools.accumulate(patches)]
        div = 1 if return_pre_merger else vision_cfg.merge_unit
        counts = [(starts[cuts[k + 1]] - starts[cuts[k]]) // div for k in range(self.size)]  # output rows per rank
        width = vision_cfg.hidden_size if return_pre_merger else vision_cfg.out_hidden_size
        lo, hi = cuts[self.rank], cuts[self.rank + 1]
        if hi > lo:
            mine = encode(pixel_values[starts[lo]:starts[hi]], tuple(grids[lo:hi]))
        else:  # fewer images than ranks
            mine = torch.empty(0, width, device=pixel_values.device, dtype=dtype)
        most = max(counts)
        mine = F.pad(mine, (0, 0, 0, most - mine.shape[0]))  # all_gather wants equal shapes
        g = _all_gather(mine, self.group).view(self.size, most, width)
        return torch.cat([g[k, :c] for k, c in enumerate(counts)])

    # ------------------------------------------------------------ inputs
    def from_first(self, x: torch.Tensor) -> torch.Tensor:
        """The group's first rank's ``x`` on every rank (waited now: a greedy run never reads the seeds, and a
        collective's result that nothing waits for is reported as a leak when the process exits)."""
        g = _funcol().wait_tensor(_all_gather(x.contiguous(), self.group))
        return g.view(self.size, *x.shape)[0]

    def agree(self, batch, call: str, error: Exception | None = None) -> None:
        """Every rank must make the same call on the same batch (a mismatch would silently mix rows, or leave
        ranks waiting on each other forever): one small all-gather of, per rank, whether its checks passed, a hash
        of ``call`` (the call's arguments) and checksums of the batch's ids, mask and pixels. ``error``: this
        rank's checks failed; it is raised after the gather, and the other ranks raise a ValueError naming it."""
        h = int.from_bytes(hashlib.sha1(call.encode()).digest()[:7], "little")  # fits an int64
        if batch is None:
            mine = torch.tensor([0, h, 0, 0, 0, 0, 0, 0], device=self.device)
        else:
            ids, mask = batch.input_ids.long(), batch.attention_mask.long()
            sums = [_weighted_sum(ids), _weighted_sum(mask)]
            for pv, grid in ((batch.pixel_values, batch.image_grid_thw),
                             (batch.pixel_values_videos, batch.video_grid_thw)):
                if pv is None:
                    sums.append(torch.zeros((), dtype=torch.int64, device=ids.device))
                    continue
                bits = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[pv.element_size()]
                rows = pv.contiguous().view(bits).view(pv.shape[0], -1).sum(1, dtype=torch.int64)  # exact, per row
                sums.append(_weighted_sum(rows) + _weighted_sum(grid.long().to(ids.device)))  # order and grids count
            if batch.second_per_grid_ts is not None:  # its float32 bits
                sums[-1] = sums[-1] + _weighted_sum(batch.second_per_grid_ts.float().to(ids.device).view(torch.int32))
            mine = torch.cat([torch.tensor([1, h, *ids.shape], device=ids.device), torch.stack(sums)])
        every = _all_gather(mine.to(self.device), self.group).view(self.size, 8).tolist()
        if error is not None:
            raise error
        failed = [r for r, row in enumerate(every) if not row[0]]
        if failed:
            raise ValueError(f"tensor-parallel rank(s) {failed} of this group rejected the call (see their error); "
                             "every rank of the group must make the same call")
        if any(row != every[0] for row in every):
            what = ["arguments" if row[1] != every[0][1] else "inputs" for row in every if row != every[0]]
            raise ValueError(f"tensor-parallel ranks got different {' and '.join(sorted(set(what)))} (per rank: "
                             f"ok, call hash, batch, length, id/mask/pixel/video checksums: {every}); every rank of "
                             "the group must make the same call on the same batch")


def _weighted_sum(x: torch.Tensor) -> torch.Tensor:
    """sum of x's integer values, each weighted by its position (so an order change changes it), in int64 (exact,
    wrapping: the same on every rank)."""
    x = x.reshape(-1).long()
    return (x * (torch.arange(x.numel(), device=x.device) % 65521 + 1)).sum()


def _column(lin: nn.Linear, n: int) -> nn.Linear:
    return nn.Linear(lin.in_features, lin.out_features // n, bias=lin.bias is not None)


def split_images(patches: list[int], n: int) -> list[int]:
    """Cut images with ``patches`` patches each into ``n`` contiguous runs of about equal patch count.

    Returns n+1 image boundaries [0, c1, ..., n_images] (runs may be empty when there are fewer images than n).
    """
    cum = [0, *itertools.accumulate(patches)]
    total, cuts = cum[-1], [0]
    for k in range(1, n):
        target = total * k / n
        cuts.append(min(range(cuts[-1], len(patches) + 1), key=lambda j: (abs(cum[j] - target), -j)))  # ties: the earlier rank takes more
    return cuts + [len(patches)]


# ---------------------------------------------------------------------------------------------- set-up
def check_tp_size(tp_size, cfg: ModelConfig) -> int:
    """``tp_size`` as an int, checked against the model's shapes (no process group needed)."""
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be an int >= 1, got {tp_size!r}")
    t = cfg.text
    if t.num_key_value_heads % tp_size:
        raise ValueError(f"tp_size={tp_size} must divide num_key_value_heads={t.num_key_value_heads} (KV heads are "
                         f"split across ranks, not replicated); use a divisor of {t.num_key_value_heads}")
    dims = {"num_attention_heads": t.num_attention_heads, "intermediate_size": t.intermediate_size,
            "vocab_size": t.vocab_size}
    bad = {k: v for k, v in dims.items() if v % tp_size}
    if bad:
        raise ValueError(f"tp_size={tp_size} must divide {bad}")
    return tp_size


def setup(tp_size, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> TensorParallel | None:
    """Join (or start, from the torchrun environment) the process group and return this rank's TP group.

    tp_size 1: None (no distributed). World = data-parallel groups x tp_size, each group tp_size consecutive
    ranks. device 'cuda' means ``cuda:LOCAL_RANK``. Every rank must pass the same tp_size, config and dtype and
    one device type; each rank its own GPU. All checks run before any weight is read.
    """
    tp_size = check_tp_size(tp_size, cfg)
    if tp_size == 1:
        return None
    if not dist.is_available():
        raise RuntimeError("tp_size > 1 needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
        if missing:
            raise RuntimeError(f"tp_size={tp_size} needs a process group: launch under torchrun (e.g. torchrun "
                               f"--nproc_per_node {tp_size} script.py) or call torch.distributed.init_process_group "
                               f"first (no process group, and {missing} are not set)")
    if device.type == "cuda" and device.index is None:
        local = os.environ.get("LOCAL_RANK")
        index = int(local) if local is not None else (dist.get_rank() if dist.is_initialized() else 0)
        device = torch.device("cuda", index % max(torch.cuda.device_count(), 1))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    backend = str(dist.get_backend())
    if device.type == "cpu" and "gloo" not in backend:
        raise RuntimeError(f"tensor parallelism on CPU needs a gloo process group, got backend {backend!r}")
    world = dist.get_world_size()
    fingerprint = hashlib.sha1(repr(cfg).encode()).hexdigest()[:12]
    mine = (tp_size, device.type, device.index, socket.gethostname(), str(dtype).replace("torch.", ""), fingerprint)
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    _check_world(every, world)
    key = (world, tp_size)
    if key not in _GROUPS:
        _GROUPS[key] = dist.group.WORLD if tp_size == world else dist.new_subgroups(group_size=tp_size)[0]
    group = _GROUPS[key]
    return TensorParallel(size=tp_size, rank=dist.get_rank(group), group=group, device=device)


def _check_world(every: list[tuple], world: int) -> None:
    """Every rank's (tp_size, device type, device index, host, dtype, config) -> a clear error on every rank."""
    sizes = {r: e[0] for r, e in enumerate(every)}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"tp_size differs across ranks ({sizes}); every rank must pass the same tp_size")
    n = every[0][0]
    if world % n:
        raise ValueError(f"tp_size={n} must divide the world size {world} (world = data-parallel groups x tp_size)")
    for first in range(0, world, n):
        ranks = range(first, first + n)
        for field, what in ((1, "device type"), (4, "dtype"), (5, "model config")):
            seen = {r: every[r][field] for r in ranks}
            if len(set(seen.values())) > 1:
                raise ValueError(f"the ranks of a tensor-parallel group must use one {what}; got "
                                 f"{ {r: v for r, v in seen.items()} }")
    cuda = [(e[3], e[2], r) for r, e in enumerate(every) if e[1] == "cuda"]
    for (host, idx), users in itertools.groupby(sorted(cuda), key=lambda x: x[:2]):
        users = [u[2] for u in users]
        if len(users) > 1:
            raise ValueError(f"ranks {users} all use cuda:{idx} on {host}; each rank needs its own GPU "
                             f"(pass device='cuda' to use cuda:LOCAL_RANK)")
