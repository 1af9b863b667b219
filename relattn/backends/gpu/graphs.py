"""Capturing a planned GPU computation as a CUDA graph, replayed per call.

A planned call still costs Python: a few microseconds per launch, several
launches per layer. A CUDA graph records the launches once and replays them
with one driver call. Constraints (checked at capture):

* one input shape, dtype, device and memory layout: the graph reads a
  static input buffer the caller's array is copied into, and writes a static
  output buffer;
* memory the computation allocates comes from a pool owned by the graph, so
  no other allocation can reuse it while the graph lives;
* the parameters are those of the capture: a layer's graph is rebuilt after
  ``load_state_dict`` (its parameter generation changes).
"""

from __future__ import annotations

import threading


class CapturedGraph:
    """``g(x) -> out``: copy x into the static input, replay, return the
    static output (``copy=False``) or a copy of it (default)."""

    def __init__(self, fn, example):
        import cupy

        if not isinstance(example, cupy.ndarray):
            raise TypeError(f"x: expected a cupy.ndarray to capture, got {type(example).__name__}")
        self._lock = threading.Lock()
        self.shape, self.dtype, self.device = example.shape, example.dtype, example.device.id
        self._fn = fn
        self._pool = cupy.cuda.MemoryPool()
        self._stream = cupy.cuda.Stream(non_blocking=True)
        fn(example)   # compiles and plans; what the plans keep comes from the default pool
        cupy.cuda.get_current_stream().synchronize()
        with cupy.cuda.using_allocator(self._pool.malloc):
            self._input = cupy.empty_like(example)
            self._input[...] = example
            with self._stream:
                fn(self._input)   # the intermediates' blocks, in the graph's pool
            self._stream.synchronize()
            with self._stream:
                self._stream.begin_capture()
                try:
                    self._output = fn(self._input)
                finally:
                    self._graph = self._stream.end_capture()

    def __call__(self, x, copy=True):
        import cupy

        if not isinstance(x, cupy.ndarray) or x.shape != self.shape or x.dtype != self.dtype \
                or x.device.id != self.device:
            raise ValueError(f"x: expected a cupy.ndarray of shape {self.shape}, dtype {self.dtype} on device "
                             f"{self.device} (the captured signature), got "
                             f"{getattr(x, 'shape', type(x).__name__)} {getattr(x, 'dtype', '')}")
        stream = cupy.cuda.get_current_stream()
        with self._lock:   # one replay at a time: the buffers are shared
            cupy.copyto(self._input, x)
            self._graph.launch(stream)
            return self._output.copy() if copy else self._output
