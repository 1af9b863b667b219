"""Capturing a planned GPU computation as a CUDA graph, replayed per call:
a forward pass (:class:`CapturedGraph`) or a training step's forward and
pullback (:class:`CapturedVjp`, two graphs).

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


def _check_signature(name, a, shape, dtype, device):
    """``ValueError`` naming ``name`` unless ``a`` is a CuPy array of the captured
    shape, dtype and device."""
    import cupy

    if not isinstance(a, cupy.ndarray) or a.shape != shape or a.dtype != dtype or a.device.id != device:
        raise ValueError(f"{name}: expected a cupy.ndarray of shape {shape}, dtype {dtype} on device "
                         f"{device} (the captured signature), got "
                         f"{getattr(a, 'shape', type(a).__name__)} {getattr(a, 'dtype', '')}")


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

        _check_signature("x", x, self.shape, self.dtype, self.device)
        stream = cupy.cuda.get_current_stream()
        with self._lock:   # one replay at a time: the buffers are shared
            cupy.copyto(self._input, x)
            self._graph.launch(stream)
            return self._output.copy() if copy else self._output


class CapturedVjp:
    """A vjp ``fn(x) -> (y, pullback)``, ``pullback(dy) -> (dx, grads)``,
    captured as two graphs sharing one pool: the forward (which also writes
    what the pullback keeps) and the pullback. ``forward(x)`` copies x in
    and replays the first; ``backward(dy)`` copies dy in and replays the
    second, which reads the residuals the last forward replay wrote. The
    outputs are static buffers (``copy=True``: copies of them). The caller
    serialises replays (the buffers are shared)."""

    def __init__(self, fn, example):
        import cupy

        if not isinstance(example, cupy.ndarray):
            raise TypeError(f"x: expected a cupy.ndarray to capture, got {type(example).__name__}")
        self.shape, self.dtype, self.device = example.shape, example.dtype, example.device.id
        self._pool = cupy.cuda.MemoryPool()
        self._stream = stream = cupy.cuda.Stream(non_blocking=True)
        y, pullback = fn(example)   # compiles and plans (what the plans keep: the default pool)
        pullback(cupy.zeros_like(y))
        del y, pullback
        cupy.cuda.get_current_stream().synchronize()
        with cupy.cuda.using_allocator(self._pool.malloc):
            self._input = cupy.empty_like(example)
            self._input[...] = example
            with stream:
                y, pullback = fn(self._input)   # the residuals' and intermediates' blocks, in the pool
                self._dy = cupy.zeros_like(y)
                pullback(self._dy)
                del y, pullback
            stream.synchronize()
            with stream:
                stream.begin_capture()
                try:
                    self._y, pullback = fn(self._input)
                finally:
                    self._forward = stream.end_capture()
                self._forward.launch(stream)   # the residuals hold values before the pullback's capture
                stream.begin_capture()
                try:
                    self._dx, self._grads = pullback(self._dy)
                finally:
                    self._backward = stream.end_capture()
            stream.synchronize()
        self._pullback = pullback   # keeps the residuals (graph pool memory) alive

    def check_input(self, x):
        _check_signature("x", x, self.shape, self.dtype, self.device)

    def forward(self, x, copy=True):
        import cupy

        self.check_input(x)
        cupy.copyto(self._input, x)
        self._forward.launch(cupy.cuda.get_current_stream())
        return self._y.copy() if copy else self._y

    def backward(self, dy, copy=True):
        import cupy

        _check_signature("dy", dy, self._dy.shape, self._dy.dtype, self.device)
        cupy.copyto(self._dy, dy)
        self._backward.launch(cupy.cuda.get_current_stream())
        if not copy:
            return self._dx, self._grads
        return self._dx.copy(), {key: g.copy() for key, g in self._grads.items()}
