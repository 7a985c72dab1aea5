"""Capturing a step as a CUDA graph, one recipe for the feature step and the decode step."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def capture(run: Callable[[], Any], device: torch.device) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, its outputs) of ``run()``, whose inputs are static buffers it reads. Two warm-up runs on a side
    stream first (they build kernels, compile, and fill the allocator's caches; ``run`` must be safe to repeat),
    then the capture, in thread-local error mode: other threads' CUDA calls (a data loader pinning memory) stay
    legal meanwhile. A replay overwrites the outputs in place.

    Everything runs with ``device`` current and on a side stream of it, the capture too (``stream=``): torch's
    default capture stream belongs to whichever device was current first, so a model on another GPU would launch
    its kernels outside the capture (an empty graph, replays that do nothing). The stream contexts are restored
    even when the capture fails."""
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                out = run()
        stream.wait_stream(side)
    return graph, out
