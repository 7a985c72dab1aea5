"""Capturing a step as a CUDA graph, one recipe for the feature step and the decode step."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def capture(run: Callable[[], Any], device: torch.device) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, its outputs) of ``run()``, whose inputs are static buffers it reads. Two warm-up runs on a side
    stream first (they build kernels, compile, and fill the allocator's caches; ``run`` must be safe to repeat),
    then the capture, in thread-local error mode: other threads' CUDA calls (a data loader pinning memory) stay
    legal meanwhile. A replay overwrites the outputs in place."""
    stream = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    stream.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = run()
    return graph, out
