"""What compiled modules share at run time, whole graph and regional alike: the swap lock (many calls, or one
weight swap alone) and CUDA graph replay. Its own module so that both serve/module.py and serve/regional.py use
it without importing each other."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch


class SwapLock:
    """Many calls at once, or one swap alone (a readers-writer lock; a waiting swap holds back new calls)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._calls = 0
        self._swapping = False
        self._waiting = 0

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        with self._cond:
            while self._swapping or self._waiting:
                self._cond.wait()
            self._calls += 1
        try:
            yield
        finally:
            with self._cond:
                self._calls -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def swap(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._swapping or self._calls:
                self._cond.wait()
            self._waiting -= 1
            self._swapping = True
        try:
            yield
        finally:
            with self._cond:
                self._swapping = False
                self._cond.notify_all()


_GRAPHS = threading.Lock()  # one graph captured or replayed at a time in this process


class CudaGraphs:
    """Replays the compiled module as CUDA graphs, one per input signature (names, shapes, dtypes), so that
    a step costs one launch instead of one per kernel. Inputs are copied into the graph's static buffers and
    outputs cloned out, under one process-wide lock: a graph's buffers are shared by every caller, and a capture
    must not see another thread's launches. Written for GPUs; exercised by tests/test_gpu.py when a GPU is there."""

    def __init__(self, compiled: Any, max_graphs: int = 8) -> None:
        self.compiled, self.max_graphs = compiled, max_graphs
        self.graphs: dict[tuple, tuple[Any, dict, Any]] = {}

    def clear(self) -> None:  # after load_constants: the graphs hold the old weights' addresses
        with _GRAPHS:
            self.graphs.clear()

    def __call__(self, inputs: dict[str, torch.Tensor]) -> Any:
        with _GRAPHS:
            return self._run(inputs)

    def _run(self, inputs: dict[str, torch.Tensor]) -> Any:
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items())
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                return self.compiled(inputs)  # a shape seen too late to capture: plain replay-free call
            static = {k: v.clone() for k, v in inputs.items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm up outside the capture (allocations, lazy init)
                    self.compiled(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.compiled(static)
            entry = self.graphs[key] = (graph, static, out)
        graph, static, out = entry
        for k, v in inputs.items():
            static[k].copy_(v)
        graph.replay()
        return [o.clone() for o in out] if isinstance(out, (list, tuple)) else out.clone()
