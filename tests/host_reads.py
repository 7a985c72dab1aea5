"""Count host reads of tensor data (device -> host syncs on a GPU) with a ``TorchFunctionMode``.

On the CPU nothing syncs, but the same calls are the ones that would: ``tolist``, ``item``, ``bool`` / ``int`` /
``float`` of a tensor, ``nonzero``, ``cpu`` / ``numpy``, ``equal``, data-dependent shapes (``masked_select``,
``unique``, boolean indexing via ``__getitem__`` with a bool tensor) and ``repeat_interleave`` without
``output_size``. Tensors created on the host from Python values are not reads.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_READS = {
    torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
    torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.cpu, torch.Tensor.numpy,
    torch.equal, torch.Tensor.equal, torch.masked_select, torch.Tensor.masked_select, torch.unique,
    torch.Tensor.unique, torch.argwhere, torch.Tensor.argwhere,
}


class HostReadCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if func in _READS:
            self.calls.append(name)
        elif func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1 and _has_bool_mask(args[1]):
            self.calls.append(f"{name}[bool mask]")
        elif func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and "output_size" not in kwargs \
                and any(isinstance(a, torch.Tensor) and a.dim() > 0 for a in args[1:2]):
            self.calls.append("repeat_interleave")
        elif func in (torch.Tensor.to,) and _to_cpu(args, kwargs):
            self.calls.append("to(cpu)")
        return func(*args, **kwargs)

    @property
    def count(self) -> int:
        return len(self.calls)


def _has_bool_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _to_cpu(args, kwargs) -> bool:
    dev = kwargs.get("device")
    if dev is None and len(args) > 1 and isinstance(args[1], (str, torch.device)):
        dev = args[1]
    return dev is not None and torch.device(dev).type == "cpu" and args[0].device.type != "cpu"


@contextlib.contextmanager
def count_host_reads():
    """``with count_host_reads() as c: ...`` then ``c.count`` / ``c.calls``."""
    counter = HostReadCounter()
    with counter:
        yield counter
