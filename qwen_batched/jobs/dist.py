"""``torchrun`` environment: rank/world, process groups (nccl or gloo, plus gloo for control), collectives, device."""
from __future__ import annotations

import datetime
import os

import torch


class Dist:
    """Rank/world from the ``torchrun`` environment, with object collectives over a gloo group."""

    def __init__(self, timeout_s: float = 6 * 3600):
        env = os.environ
        self.world = int(env.get("WORLD_SIZE", "1"))
        self.rank = int(env.get("RANK", "0"))
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        self.timeout_s = timeout_s
        self.group = None
        self.initialized = False
        self.owns = False  # whether we created the process group (and so destroy it)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if not self.enabled or self.initialized:
            return
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=self.timeout_s)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kwargs = {"device_id": device} if backend == "nccl" else {}
            dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
            self.owns = True
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.group = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
        self.initialized = True

    def barrier(self) -> None:
        if self.initialized:
            import torch.distributed as dist
            dist.barrier(group=self.group)

    def broadcast(self, obj):
        if not self.initialized:
            return obj
        import torch.distributed as dist
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_gather(self, obj) -> list:
        if not self.initialized:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def close(self) -> None:
        if self.initialized:
            import torch.distributed as dist
            if self.owns and dist.is_initialized():
                dist.destroy_process_group()
            self.initialized = False


def resolve_device(spec: str, dist: Dist) -> torch.device:
    spec = (spec or "auto").lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev
