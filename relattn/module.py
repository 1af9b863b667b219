"""``Attention``: SAM's image-encoder attention layer, with parameters as arrays."""

from __future__ import annotations

import math
import threading

import numpy as np

from relattn._arrays import (
    BFLOAT16,
    array_module,
    astype,
    check_alloc,
    check_alloc_total,
    check_float_array,
    check_positive_int,
    check_size2,
    compute_dtype,
    dtype_name,
    resolve_dtype,
)
from relattn.functional import rel_pos_attention
from relattn.window import _unshared, padded_size, window_partition, window_unpartition

__all__ = ["Attention"]

_PARAM_KEYS = {
    "qkv.weight": "qkv_weight",
    "qkv.bias": "qkv_bias",
    "proj.weight": "proj_weight",
    "proj.bias": "proj_bias",
    "rel_pos_h": "rel_pos_h",
    "rel_pos_w": "rel_pos_w",
}


def _host_array(key: str, value) -> np.ndarray:
    """A state-dict value as a numpy array: numpy, CuPy, torch (duck-typed) or array-like."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            value = value.float()
    if type(value).__module__.startswith("cupy"):
        value = value.get()
    try:
        arr = np.asarray(value)
    except Exception as exc:  # noqa: BLE001
        raise TypeError(f"{key}: expected an array, got {type(value).__name__} ({exc})") from None
    if arr.dtype.kind not in "fiu" and not (BFLOAT16 is not None and arr.dtype == BFLOAT16):
        raise TypeError(f"{key}: expected a numeric array, got dtype {arr.dtype}")
    return arr


def _check_cotangent(dy, kind, shape, dtype):
    """``dy`` as a numpy / CuPy array, checked against y: its type as returned
    (``kind``), and its ``shape`` and ``dtype`` as numpy / CuPy array."""
    if type(dy) is not kind:
        raise TypeError(f"dy: expected a {kind.__module__}.{kind.__name__} like y, "
                        f"got {type(dy).__module__}.{type(dy).__name__}")
    from relattn._interop import wrap_result

    dy = wrap_result("dy", dy)[0]   # a DLPack tensor (y's kind) as numpy / CuPy
    if dy.dtype != dtype:
        raise TypeError(f"dy: expected dtype {dtype_name(dtype)} (that of y), got {dtype_name(dy.dtype)}")
    if dy.shape != shape:
        raise ValueError(f"dy: expected shape {shape} (that of y), got {tuple(dy.shape)}")
    return dy


class _Generation:
    """One version of a layer's parameters and the arrays derived from them.

    ``params`` is never changed in place: a parameter write builds a new
    generation and swaps it in. A call reads the layer's generation once and
    uses its ``params`` and ``cache`` throughout, so it sees one consistent set
    of weights, and a cache entry built from old weights can only land in the
    old generation's ``cache``, which no later call reads.
    """

    __slots__ = ("params", "cache")

    def __init__(self, params):
        self.params = params
        self.cache = {}


class _HalfWeights:
    """What the half-precision GPU path reads of one set of parameters, for
    CuPy inputs of dtype ``half``: the weights and biases in ``half`` (``w``,
    keyed by attribute), the two weights transposed (``wT``: the pullback's
    dx = dy W as dy (W^T)^T), the tables the attention reads (``tables``) and
    the projections' ``HalfLinear`` operands (weight and bias column), one
    per projection, row count and input alignment, built on first use."""

    _MAX_LINEARS = 16

    def __init__(self, w, tables, half):
        from relattn.backends.gpu.cublas import contiguous

        self.w, self.tables, self.half = w, tables, half
        self.wT = {a: contiguous(w[a].T) for a in ("qkv_weight", "proj_weight")}
        self._linears = {}
        self._lock = threading.Lock()

    def linear(self, name, n, align):
        """The ``HalfLinear`` of projection ``name`` ("qkv" or "proj") for ``n``
        rows whose base address is ``align`` modulo 16."""
        key = (name, n, align)
        lin = self._linears.get(key)
        if lin is None:
            from relattn.backends.gpu.cublas import linear_half_plan

            lin = linear_half_plan(n, self.w[f"{name}_weight"], self.w[f"{name}_bias"], self.half)
            with self._lock:
                if len(self._linears) >= self._MAX_LINEARS:
                    self._linears.clear()
                lin = self._linears.setdefault(key, lin)
        return lin


class _StepWeights(_HalfWeights):
    """The weights of a captured training step: device parameters of its own
    (``params``, keyed by attribute, in the layer's dtype), from which
    :meth:`derive` computes every form the half-precision path reads, in
    place, so that a graph that starts with ``derive`` follows the values
    written into ``params`` between replays. The forms are those of
    :meth:`Attention._half_weights`, rounded the same way, except the tables:
    16-bit where the layer's dtype is the input's, else float32 (the eager
    path takes 16-bit tables also where float32 values happen to fit)."""

    def __init__(self, layer, params, half):
        import cupy

        from relattn.backends.gpu.cublas import cast_into

        self.params = {a: None if v is None else cupy.asarray(v) for a, v in params.items()}
        same = layer.dtype == half
        w = {a: None if v is None else (v if same else cupy.empty(v.shape, dtype=half))
             for a, v in self.params.items() if a not in ("rel_pos_h", "rel_pos_w")}
        tables = (None, None)
        if layer.use_rel_pos:
            tables = tuple(self.params[a] if same else cupy.empty(self.params[a].shape, dtype=np.float32)
                           for a in ("rel_pos_h", "rel_pos_w"))
        self._casts = [(self.params[a], w[a]) for a in w if w[a] is not None and w[a] is not self.params[a]]
        self._casts += [(self.params[a], t) for a, t in zip(("rel_pos_h", "rel_pos_w"), tables)
                        if t is not None and t is not self.params[a]]
        for src, dst in self._casts:
            cast_into(src, dst)
        super().__init__(w, tables, half)

    def load(self, params):
        """Copy the host arrays ``params`` (keyed by attribute) into :attr:`params`."""
        for a, dst in self.params.items():
            if dst is not None:
                dst.set(np.ascontiguousarray(params[a]))

    def derive(self):
        """Every form read by the half-precision path, recomputed from :attr:`params` in place."""
        import cupy

        from relattn.backends.gpu.cublas import cast_into

        for src, dst in self._casts:
            cast_into(src, dst)
        for a, t in self.wT.items():
            cupy.copyto(t.view(cupy.uint16), self.w[a].view(cupy.uint16).T)
        for (name, _, _), lin in list(self._linears.items()):
            lin.load(self.w[f"{name}_weight"], self.w[f"{name}_bias"])


class Attention:
    """Multi-head attention with 2-D decomposed relative position, as in SAM's ViT.

    A framework-free drop-in for ``segment_anything.modeling.image_encoder.Attention``
    (and the DeepSeek-OCR SDPA form of it): the same constructor arguments, the
    same parameter layout (PyTorch ``nn.Linear``: ``y = x @ W.T + b``) and the same
    state-dict keys, so weights load straight from a SAM checkpoint.

    Parameters
    ----------
    dim : int
        Channels ``C``; must be divisible by ``num_heads``.
    num_heads : int
        Number of heads; ``head_dim = dim // num_heads``.
    qkv_bias : bool
        Whether the qkv projection has a bias.
    use_rel_pos : bool
        Whether to add the decomposed relative-position bias.
    rel_pos_zero_init : bool
        Zero tables (SAM's default) rather than ``N(0, 0.02)`` ones.
    input_size : (int, int), optional
        Grid the tables are sized for (``2 * size - 1`` rows); required with
        ``use_rel_pos``. Other grids interpolate the tables on the fly.
    dtype : str or dtype
        Parameter dtype: ``"float32"`` (default), ``"float64"``, ``"float16"``
        or ``"bfloat16"``.
    backend : str
        Attention-core backend, as for :func:`relattn.rel_pos_attention`.
    window_size : int
        ``0`` for global attention; ``> 0`` runs windowed as SAM's ``Block``
        does (pad, partition, attend, unpartition, crop).
    rng : numpy.random.Generator or int, optional
        Source of the initial weights (PyTorch's default ``nn.Linear`` init:
        ``U(-1/sqrt(dim), 1/sqrt(dim))`` for weights and biases).
    resize_dtype : {"float32", "table"}
        Arithmetic of the table resize on grids other than ``input_size``, as
        for :func:`relattn.resize_rel_pos`. ``"float32"`` (default):
        PyTorch's float32 interpolate, bit for bit, which is what SAM, timm
        and HF compute for float32 checkpoints and DeepSeek-OCR's encoder for
        any. ``"table"``: when the call computes in float64 (a float64 layer
        or float64 input), the tables are resized in float64, bit for bit as
        PyTorch's float64 interpolate (SAM's code run in float64); otherwise
        the same as ``"float32"``.

    Attributes
    ----------
    qkv_weight : ndarray, shape (3 * dim, dim)
    qkv_bias : ndarray, shape (3 * dim,) or None
    proj_weight : ndarray, shape (dim, dim)
    proj_bias : ndarray, shape (dim,)
    rel_pos_h : ndarray, shape (2 * input_size[0] - 1, head_dim) or None
    rel_pos_w : ndarray, shape (2 * input_size[1] - 1, head_dim) or None

    Raises
    ------
    ValueError
        When the parameters plus the float64 temporaries their initialisation
        draws would exceed ``relattn._arrays.MAX_ALLOC_BYTES`` (naming ``dim``,
        or ``input_size`` when the tables are the larger part); checked before
        anything is allocated. Also for malformed values, naming the argument.
    TypeError
        For arguments of the wrong type, naming the argument.

    Notes
    -----
    Calls may run concurrently with each other and with parameter writes
    (``load_state_dict``, assigning an attribute): each call uses one
    consistent set of parameters, and every call that starts after a write has
    returned uses the new parameters.

    Examples
    --------
    >>> import numpy as np, relattn
    >>> attn = relattn.Attention(64, num_heads=4, use_rel_pos=True, input_size=(8, 8),
    ...                          rel_pos_zero_init=False, rng=np.random.default_rng(0))
    >>> x = np.random.default_rng(1).standard_normal((2, 8, 8, 64), dtype=np.float32)
    >>> attn(x).shape
    (2, 8, 8, 64)
    >>> attn(x[:, :6, :5]).shape                   # another grid: tables interpolate
    (2, 6, 5, 64)
    >>> attn(x, window_size=3).shape               # SAM's windowed block
    (2, 8, 8, 64)
    """

    def __init__(
        self,
        dim,
        num_heads=8,
        qkv_bias=True,
        use_rel_pos=False,
        rel_pos_zero_init=True,
        input_size=None,
        *,
        dtype="float32",
        backend="auto",
        window_size=0,
        rng=None,
        resize_dtype="float32",
    ):
        from relattn.relpos import _check_resize_dtype

        self.resize_dtype = _check_resize_dtype(resize_dtype)
        dim = check_positive_int("dim", dim)
        num_heads = check_positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"dim: expected a multiple of num_heads={num_heads}, got {dim}")
        check_alloc("dim", (3 * dim, dim), 8, "the qkv weight")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.use_rel_pos = bool(use_rel_pos)
        self.dtype = resolve_dtype("dtype", dtype)
        from relattn import backends

        if not isinstance(backend, str) or backend not in ("auto", *backends.names()):
            raise ValueError(f"backend: expected one of {['auto', *backends.names()]}, got {backend!r}")
        self.backend = backend
        self.window_size = self._check_window("window_size", window_size)
        if self.use_rel_pos:
            if input_size is None:
                raise ValueError("input_size: required when use_rel_pos=True, got None")
            self.input_size = check_size2("input_size", input_size)
            for size in self.input_size:
                check_alloc("input_size", (2 * size - 1, self.head_dim), 8, "a relative-position table")
        else:
            self.input_size = None if input_size is None else check_size2("input_size", input_size)
        self._check_init_memory(bool(qkv_bias), bool(rel_pos_zero_init))
        try:
            rng = np.random.default_rng(rng)
        except (TypeError, ValueError):
            raise TypeError(f"rng: expected a numpy.random.Generator, an int seed or None, got {rng!r}") from None
        bound = 1.0 / math.sqrt(dim)

        def uniform(*shape):
            return rng.uniform(-bound, bound, size=shape).astype(self.dtype)

        params = {
            "qkv_weight": uniform(3 * dim, dim),
            "qkv_bias": uniform(3 * dim) if qkv_bias else None,
            "proj_weight": uniform(dim, dim),
            "proj_bias": uniform(dim),
            "rel_pos_h": None,
            "rel_pos_w": None,
        }
        if self.use_rel_pos:
            for key, size in (("rel_pos_h", self.input_size[0]), ("rel_pos_w", self.input_size[1])):
                shape = (2 * size - 1, self.head_dim)
                if rel_pos_zero_init:
                    table = np.zeros(shape)
                else:  # SAM: trunc_normal_(std=0.02), truncated at +-2 (never reached)
                    table = np.clip(rng.standard_normal(shape) * 0.02, -2.0, 2.0)
                params[key] = table.astype(self.dtype)
        self._lock = threading.Lock()   # serializes parameter writes; calls never take it
        self._gen = _Generation(params)

    def _check_init_memory(self, qkv_bias, rel_pos_zero_init):
        """Refuse, before allocating, a layer whose initialisation would not fit in
        ``MAX_ALLOC_BYTES``: every parameter in the layer's dtype, plus the float64
        temporaries the initialisation holds at its peak (one weight drawn before
        its cast; a table's random draw and its scaled copy)."""
        dim, itemsize = self.dim, self.dtype.itemsize
        linear = [((3 * dim, dim), itemsize), ((dim, dim), itemsize), ((dim,), itemsize)]
        if qkv_bias:
            linear.append(((3 * dim,), itemsize))
        tables = []
        if self.use_rel_pos:
            tables = [((2 * size - 1, self.head_dim), itemsize) for size in self.input_size]
        temporaries = [((3 * dim, dim), 8)]
        for shape, _ in tables:
            temporaries.append((shape, 8 if rel_pos_zero_init else 16))
        largest = max(temporaries, key=lambda t: t[1] * math.prod(t[0]))
        table_part = sum(math.prod(shape) * size for shape, size in tables)
        linear_part = sum(math.prod(shape) * size for shape, size in linear)
        name = "input_size" if table_part > linear_part else "dim"
        check_alloc_total(name, [*linear, *tables, largest],
                          f"the parameters of Attention(dim={dim}, num_heads={self.num_heads}"
                          f"{f', input_size={self.input_size}' if self.use_rel_pos else ''}, "
                          f"dtype={dtype_name(self.dtype)}) and their float64 initialisation temporaries")

    # -- parameters ---------------------------------------------------------------

    @property
    def _params(self):
        """The current parameters (a dict never modified in place: writes replace it)."""
        return self._gen.params

    @property
    def _cache(self):
        """Arrays derived from the current parameters (device copies, GPU plans)."""
        return self._gen.cache

    def _replace_params(self, changes):
        """Swap in a new generation with ``changes`` applied; returns when every later call sees it."""
        with self._lock:
            self._gen = _Generation({**self._gen.params, **changes})

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]
        state["_gen"] = self._gen.params   # the cache (device arrays, plans) is not pickled
        return state

    def __setstate__(self, state):
        state = dict(state)
        params = state.pop("_gen")
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._gen = _Generation(params)

    def _expected_shapes(self):
        shapes = {
            "qkv_weight": (3 * self.dim, self.dim),
            "qkv_bias": (3 * self.dim,),
            "proj_weight": (self.dim, self.dim),
            "proj_bias": (self.dim,),
        }
        if self.use_rel_pos:
            shapes["rel_pos_h"] = (2 * self.input_size[0] - 1, self.head_dim)
            shapes["rel_pos_w"] = (2 * self.input_size[1] - 1, self.head_dim)
        return shapes

    def _validated(self, attr, value, key):
        """``value`` checked against the parameter's shape, as a private copy."""
        expected = self._expected_shapes().get(attr)
        if expected is None:
            raise ValueError(f"{key}: this layer has no such parameter (use_rel_pos={self.use_rel_pos})")
        arr = _host_array(key, value)
        if arr.shape != expected:
            raise ValueError(f"{key}: expected shape {expected}, got {arr.shape}")
        return np.array(arr, dtype=self.dtype)

    def _set_param(self, attr, value):
        if attr == "qkv_bias" and value is None:
            self._replace_params({attr: None})
        else:
            self._replace_params({attr: self._validated(attr, value, attr)})

    def _get(attr):  # noqa: N805 - property factory
        def getter(self):
            value = self._params[attr]
            if value is None:
                return None
            view = value.view()
            view.flags.writeable = False  # device copies are cached: edits go through the setter
            return view

        def setter(self, value):
            self._set_param(attr, value)

        return property(getter, setter, doc=f"The ``{attr}`` parameter (a read-only numpy view; assign "
                                            f"a new array to change it).")

    qkv_weight = _get("qkv_weight")
    qkv_bias = _get("qkv_bias")
    proj_weight = _get("proj_weight")
    proj_bias = _get("proj_bias")
    rel_pos_h = _get("rel_pos_h")
    rel_pos_w = _get("rel_pos_w")
    del _get

    def state_dict(self):
        """Parameters under SAM's key names, as a dict of numpy arrays (copies).

        Examples
        --------
        >>> import relattn
        >>> sorted(relattn.Attention(32, 4).state_dict())
        ['proj.bias', 'proj.weight', 'qkv.bias', 'qkv.weight']
        """
        params = self._params   # one generation: a consistent set even during a concurrent write
        return {key: params[attr].copy() for key, attr in _PARAM_KEYS.items() if params[attr] is not None}

    def load_state_dict(self, mapping, strict=True):
        """Load parameters saved under SAM's key names.

        Parameters
        ----------
        mapping : Mapping[str, array-like]
            ``qkv.weight``, ``qkv.bias`` (when ``qkv_bias``), ``proj.weight``,
            ``proj.bias``, ``rel_pos_h``, ``rel_pos_w`` (when ``use_rel_pos``).
            Values may be numpy or CuPy arrays, torch tensors, or anything
            ``numpy.asarray`` takes; they are copied and cast to the layer's dtype.
        strict : bool
            Raise on missing or unexpected keys (shapes are always checked).

        Returns
        -------
        (missing, unexpected) : (list[str], list[str])

        Examples
        --------
        >>> import relattn
        >>> a, b = relattn.Attention(32, 4, rng=0), relattn.Attention(32, 4, rng=1)
        >>> b.load_state_dict(a.state_dict())
        ([], [])
        """
        return self._load(mapping, strict)

    def _load(self, mapping, strict, prefix=""):
        """``load_state_dict`` of the keys ``prefix + name``; messages name whole keys."""
        if not hasattr(mapping, "keys"):
            raise TypeError(f"mapping: expected a mapping of names to arrays, got {type(mapping).__name__}")
        shapes = self._expected_shapes()
        wanted = [k for k, a in _PARAM_KEYS.items() if a in shapes]
        if self._params["qkv_bias"] is None:
            wanted.remove("qkv.bias")
        full = {prefix + k: k for k in wanted}
        missing = [key for key in full if key not in mapping]
        unexpected = [key for key in mapping.keys() if key not in full]
        if strict and (missing or unexpected):
            raise ValueError(f"mapping: missing keys {missing}, unexpected keys {unexpected}")
        # Check every value before changing anything: a bad key leaves the layer as it was.
        staged = {
            _PARAM_KEYS[name]: self._validated(_PARAM_KEYS[name], mapping[key], key)
            for key, name in full.items()
            if key in mapping
        }
        self._replace_params(staged)
        return missing, unexpected

    @classmethod
    def from_state_dict(cls, mapping, prefix="", *, num_heads=None, **kwargs):
        """Build a layer whose shape is read from a SAM-style state dict, and load it.

        Parameters
        ----------
        mapping : Mapping[str, array-like]
            A whole checkpoint or one layer's parameters (see :meth:`load_state_dict`).
        prefix : str
            Key prefix of the layer, e.g. ``"image_encoder.blocks.7.attn."``.
        num_heads : int, optional
            Needed only without relative-position tables (the tables' width is
            ``head_dim``, so ``num_heads = dim // head_dim`` otherwise).
        **kwargs
            Passed to the constructor (``dtype``, ``backend``, ``window_size``).

        Raises
        ------
        ValueError, TypeError
            Naming the argument, or the whole offending key (``prefix``
            included, e.g. ``blocks.3.attn.rel_pos_h: expected shape ...``) for a
            malformed, missing or unpaired parameter.

        Examples
        --------
        >>> import relattn
        >>> src = relattn.Attention(64, 4, use_rel_pos=True, input_size=(14, 14), rng=0)
        >>> sd = {"blocks.0.attn." + k: v for k, v in src.state_dict().items()}
        >>> relattn.Attention.from_state_dict(sd, "blocks.0.attn.", window_size=14)
        Attention(dim=64, num_heads=4, qkv_bias=True, use_rel_pos=True, input_size=(14, 14), window_size=14, dtype=float32, backend='auto')
        """
        from relattn.checkpoint import _check_mapping, attention_layers

        _check_mapping("mapping", mapping)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected a string, got {type(prefix).__name__} {prefix!r}")
        layer = {k: v for k, v in mapping.items() if k.startswith(prefix)}   # whole keys, for the messages
        infos = [i for i in attention_layers(layer) if i.prefix == prefix]
        if not infos:
            raise ValueError(f"prefix: no qkv.weight/proj.weight under {prefix!r}")
        info = infos[0]
        tables = [prefix + "rel_pos_h", prefix + "rel_pos_w"]
        for key in tables:
            if key in layer and layer[key] is None:
                raise TypeError(f"{key}: expected an array, got None")
        present = [key in layer for key in tables]
        if present[0] != present[1]:
            have, lack = tables if present[0] else tables[::-1]
            raise ValueError(f"{lack}: expected alongside {have} (a layer has both tables or neither), "
                             f"got no such key")
        if info.num_heads is None and num_heads is None:
            raise ValueError("num_heads: required for a layer without rel_pos_h/rel_pos_w tables, got None")
        if info.num_heads is not None and num_heads is not None and num_heads != info.num_heads:
            raise ValueError(f"num_heads: the tables say {info.num_heads} (head_dim {info.head_dim}), got {num_heads}")
        attn = cls(info.dim, info.num_heads or num_heads, qkv_bias=info.qkv_bias, use_rel_pos=info.use_rel_pos,
                   input_size=info.input_size, **kwargs)
        wanted = {prefix + k for k, attr in _PARAM_KEYS.items() if attn._params[attr] is not None}
        attn._load({k: v for k, v in layer.items() if k in wanted}, strict=True, prefix=prefix)
        return attn

    # -- forward ------------------------------------------------------------------

    @staticmethod
    def _check_window(name, window_size):
        if window_size is None or window_size == 0:
            return 0
        return check_positive_int(name, window_size)

    def _device_params(self, gen, xp, work):
        """Parameters of generation ``gen`` in array library ``xp`` and dtype
        ``work``, cached in that generation."""
        device = None
        if xp is not np:
            device = xp.cuda.Device().id
        key = (xp.__name__, device, work.str)
        cached = gen.cache.get(key)
        if cached is None:
            cached = {
                attr: None if value is None else xp.asarray(value.astype(work, copy=False))
                for attr, value in gen.params.items()
            }
            cached = gen.cache.setdefault(key, cached)
        return cached

    def _gpu_tables(self, gen, xp, dtype):
        """The rel-pos tables for a half-precision GPU call: in the input's
        dtype when that holds them exactly (the fused attention kernel reads
        16-bit tables of q's dtype), else in float32. Cached with the params."""
        if not self.use_rel_pos:
            return None, None
        key = ("tables", xp.__name__, xp.cuda.Device().id, dtype.str)
        cached = gen.cache.get(key)
        if cached is None:
            exact = all(
                np.array_equal(t.astype(dtype).astype(np.float32), t.astype(np.float32))
                for t in (gen.params["rel_pos_h"], gen.params["rel_pos_w"])
            )
            params = self._device_params(gen, xp, dtype if exact else np.dtype(np.float32))
            cached = gen.cache.setdefault(key, (params["rel_pos_h"], params["rel_pos_w"]))
        return cached

    def _checked_input(self, x, window_size):
        """x as an array checked against the layer, and the window size of the call."""
        x = check_float_array("x", x, ndim=4)
        if x.shape[3] != self.dim:
            raise ValueError(f"x: expected shape (B, H, W, {self.dim}), got {tuple(x.shape)}")
        if x.shape[1] < 1 or x.shape[2] < 1:
            raise ValueError(f"x: expected H, W >= 1, got shape {tuple(x.shape)}")
        ws = self.window_size if window_size is None else self._check_window("window_size", window_size)
        return x, ws

    def __call__(self, x, window_size=None):
        """Run the layer on ``x`` of shape ``(B, H, W, dim)``; see :meth:`forward`."""
        return self.forward(x, window_size=window_size)

    def forward(self, x, window_size=None):
        """Attention over the tokens of a channels-last feature map.

        Parameters
        ----------
        x : array, shape (B, H, W, dim)
            numpy or CuPy array (or a DLPack tensor, returned as the same kind).
            Any ``H, W``: the tables are interpolated when the grid differs from
            ``input_size``.
        window_size : int, optional
            Overrides the layer's ``window_size`` for this call (0 = global).

        Returns
        -------
        array, shape (B, H, W, dim)
            Same array type and dtype as ``x``; computed in float32 (float64 for
            float64 input) and rounded once. float16 / bfloat16 CuPy input takes
            the planned GPU path, in the arithmetic of PyTorch's half-precision
            layer: the weights and biases in x's dtype, float32 accumulation,
            q, k, v and the attention's output rounded to x's dtype.
        """
        from relattn._interop import wrap_result

        x, restore = wrap_result("x", x)
        gen = self._gen   # read once: this call uses these parameters throughout
        plan = self._gpu_plan(gen, x, window_size)
        if plan is not None:
            return restore(plan(x))
        x, ws = self._checked_input(x, window_size)
        if ws:
            height, width = x.shape[1:3]
            windows, pad_hw = window_partition(x, ws)
            out = window_unpartition(self._forward(gen, windows), ws, pad_hw, (height, width))
        else:
            out = self._forward(gen, x)
        return restore(out)

    # ------------------------------------------------------------ GPU plans
    # A float16 / bfloat16 CuPy call is planned per signature of x (shape,
    # strides, dtype, device, 16-byte alignment) and window size: the window
    # copies, both projections and the attention are decided once and a
    # repeated call only allocates and launches. Plans live in the cache of the
    # parameters' generation, which every parameter change replaces.
    _MAX_PLANS = 32

    def _gpu_plan(self, gen, x, window_size):
        """The plan for a half-precision CuPy ``x``, or None (any other call)."""
        t = type(x)
        if not (t.__name__ == "ndarray" and t.__module__.startswith("cupy")) or x.dtype.itemsize != 2 \
                or x.ndim != 4:
            return None
        if window_size is not None and type(window_size) is not int:
            window_size = self._check_window("window_size", window_size)   # a numpy integer, say
        from relattn.backends import gpu as cupy_gpu

        if cupy_gpu.unavailable_reason() is not None:
            return None
        mem = x.data
        key = ("plan", x.shape, x.strides, x.dtype, mem.device_id, mem.ptr & 15, window_size,
               self.window_size, self.backend, self.scale, cupy_gpu.plan_key())
        cache = gen.cache
        plan = cache.get(key)
        if plan is None:
            plan = self._build_gpu_plan(gen, x, window_size)   # checks x as forward does; may raise
            plans = [k for k in list(cache) if k[0] == "plan"]
            if len(plans) >= self._MAX_PLANS:
                for k in plans:
                    cache.pop(k, None)
            cache[key] = plan
        return plan

    def _build_gpu_plan(self, gen, x, window_size):
        import cupy

        from relattn import functional
        from relattn.backends.gpu import windows as _window_gpu
        from relattn.backends.gpu.cublas import contiguous, linear_half_plan

        x, ws = self._checked_input(x, window_size)
        B, H, W, C = (int(n) for n in x.shape)
        heads = self.num_heads
        batch, gh, gw = B, H, W
        if ws:
            hp, wp = padded_size(x.shape, x.dtype.itemsize, ws)
            batch, gh, gw = B * (hp // ws) * (wp // ws), ws, ws
        n = batch * gh * gw
        weights = self._device_params(gen, cupy, x.dtype)   # the biases too: a half nn.Linear's
        qkv_lin = linear_half_plan(n, weights["qkv_weight"], weights["qkv_bias"], x.dtype)
        proj_lin = linear_half_plan(n, weights["proj_weight"], weights["proj_bias"], x.dtype)
        # the projections' inputs carry the bias's tail column where there is a bias
        # (HalfLinear); the window partition and the heads' merge write it as they copy
        tail = _window_gpu.TAIL
        if ws:
            part = _window_gpu.partition_plan(x, ws, hp, wp, tail=qkv_lin.tail)
            qkv = qkv_lin.tailed if qkv_lin.tail else qkv_lin
            qkv_in = C + (tail if qkv_lin.tail else 0)
            unpart = _window_gpu.unpartition_plan(cupy.empty((batch, ws, ws, C), dtype=x.dtype), ws, hp, wp, H, W)
        else:
            part, qkv, qkv_in, unpart = contiguous, qkv_lin, C, None
        merge = _window_gpu.merge_heads_plan(cupy.empty((batch, heads, gh * gw, C // heads), dtype=x.dtype),
                                             tail=proj_lin.tail)
        proj = proj_lin.tailed if proj_lin.tail else proj_lin
        proj_in = C + (tail if proj_lin.tail else 0)
        tables = self._gpu_tables(gen, cupy, x.dtype)
        sizes = ((gh, gw), (gh, gw)) if self.use_rel_pos else (None, None)
        scale, backend, split_heads = self.scale, self.backend, self._split_heads
        attention = []   # the functional plan, taken after the first call made it

        def run(x):
            q, k, v = split_heads(qkv(part(x).reshape(n, qkv_in)), batch, gh * gw)
            if attention:
                out = attention[0](q, k, v, *tables)
            else:
                out = rel_pos_attention(q, k, v, *tables, *sizes, scale=scale, backend=backend)
                planned = functional.planned(q, k, v, *tables, *sizes, scale, backend)
                if planned is not None:
                    attention.append(planned)
            y = proj(merge(out).reshape(n, proj_in))
            return y.reshape(B, H, W, C) if unpart is None else unpart(y.reshape(batch, gh, gw, C))

        return run

    def capture(self, x, window_size=None):
        """The forward pass on CuPy inputs of ``x``'s signature, captured as a CUDA graph.

        For float16 / bfloat16 inputs (the layer's planned GPU path: cuBLAS
        projections with float32 accumulation, the fused attention kernel).
        Every launch of the layer (window copies, both projections, the terms
        and the attention kernel) is recorded once and replayed per call by
        one driver call, so a call costs about the GPU's time instead of
        Python's. Constraints: inputs of ``x``'s shape, dtype and device only
        (``ValueError`` otherwise); the call copies its input into the graph's
        own buffer and returns a copy of the graph's output (``copy=False``:
        the buffer itself, overwritten by the next call); one replay at a time
        per graph; the graph is rebuilt on the next call after the parameters
        change (``load_state_dict``, setting a parameter).

        Parameters
        ----------
        x : cupy.ndarray, shape (B, H, W, dim)
            An example input (its values are not kept).
        window_size : int, optional
            As for :meth:`forward`.

        Returns
        -------
        callable
            ``g(x, copy=True) -> cupy.ndarray`` of shape (B, H, W, dim).
        """
        self._check_capturable(x)
        return _LayerGraph(self, x, window_size)

    def capture_vjp(self, x, window_size=None):
        """A training step (:meth:`vjp` and its pullback) on CuPy inputs of ``x``'s signature, captured as CUDA graphs.

        For float16 / bfloat16 inputs, as :meth:`capture`. The forward pass,
        which also keeps what the pullback needs, is one graph; the pullback
        another; each replays with one driver call, so a step costs about the
        GPU's time instead of Python's (the eager :meth:`vjp` launches some
        forty kernels a step). ``step = layer.capture_vjp(x)``, then per
        step ``y, pullback = step(x)`` and ``dx, grads = pullback(dy)``, with
        the bits and the keys of :meth:`vjp`.

        Parameters: the graphs read ``step.parameters``, device copies of
        the layer's parameters (CuPy arrays in the layer's dtype, keyed like
        :meth:`state_dict`), and derive what they multiply by (the weights in
        x's dtype, transposed, with the bias column) from them at the start
        of every forward replay. An optimizer updates them in place between
        steps, on the current stream (``p -= lr * g``, ``cupy.copyto``), and
        the next step uses the new values, with no new recording; the layer
        itself keeps its parameters until they are loaded back
        (``layer.load_state_dict(step.parameters)``). Parameters set on the
        layer (``load_state_dict``, assignment) are copied into
        ``step.parameters`` on the next call. The bits are those of
        :meth:`vjp` with the same parameters, but for one case: where the
        layer's dtype is not x's, the graphs give the attention float32
        tables, while :meth:`vjp` takes x's dtype for tables whose values
        happen to be exact in it (zero tables, say).

        Constraints, besides those of :meth:`capture`: the residuals live in
        the graphs' buffers, so a ``pullback`` is valid until the next call of
        ``step`` (``RuntimeError`` after it); it may be called several times
        before that. ``dy`` must have ``y``'s shape, dtype and device
        (``ValueError`` otherwise). ``copy=False`` on either call returns the
        graphs' own output buffers (overwritten by the next replay).

        Parameters
        ----------
        x : cupy.ndarray, shape (B, H, W, dim)
            An example input (its values are not kept).
        window_size : int, optional
            As for :meth:`forward`.

        Returns
        -------
        callable
            ``step(x, copy=True) -> (y, pullback)``, ``pullback(dy, copy=True)
            -> (dx, grads)``, with the attribute ``step.parameters``.
        """
        self._check_capturable(x)
        return _LayerVjpGraph(self, x, window_size)

    @staticmethod
    def _check_capturable(x):
        t = type(x)
        if not (t.__name__ == "ndarray" and t.__module__.startswith("cupy")) or x.dtype.itemsize != 2:
            raise ValueError("x: capture takes a float16 or bfloat16 CuPy array (the layer's planned GPU path), "
                             f"got {t.__name__} of dtype {getattr(x, 'dtype', '?')}")

    def _forward(self, gen, x):
        xp = array_module(x)
        work = compute_dtype(x.dtype, self.dtype)
        p = self._device_params(gen, xp, work)
        q, k, v = self._project_qkv(p, self._tokens(x, work), x.shape[0], x.shape[1] * x.shape[2])
        args, kwargs = self._attention_args(p, x.shape[1], x.shape[2])
        out = rel_pos_attention(q, k, v, *args, **kwargs)
        return self._project_out(p, self._merge_heads(out), x.shape, x.dtype)

    # The steps of ``_forward``, shared with ``vjp`` so that both compute the same bits.

    @staticmethod
    def _tokens(x, work):
        """``x`` (B, H, W, dim) as (B * H * W, dim) in dtype ``work`` (a view when it can be)."""
        return astype(x.reshape(x.shape[0] * x.shape[1] * x.shape[2], x.shape[3]), work)

    def _project_qkv(self, p, tokens, batch, seq):
        """q, k, v of ``tokens`` (B * S, dim), in their dtype: three strided
        (B, heads, S, head_dim) views of one qkv buffer, no copy."""
        qkv = tokens @ p["qkv_weight"].T
        if p["qkv_bias"] is not None:
            qkv += p["qkv_bias"]
        return self._split_heads(qkv, batch, seq)

    def _split_heads(self, qkv, batch, seq):
        """q, k, v of a (B * S, 3 * dim) qkv buffer (read as (B, S, 3, heads,
        head_dim)): three strided (B, heads, S, head_dim) views, no copy."""
        qkv = qkv.reshape(batch, seq, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _attention_args(self, p, height, width):
        """``(args, kwargs)`` after q, k, v of the attention call on an H x W grid."""
        if self.use_rel_pos:
            return (p["rel_pos_h"], p["rel_pos_w"], (height, width), (height, width)), dict(
                scale=self.scale, backend=self.backend,
                resize_dtype=getattr(self, "resize_dtype", "float32"),   # absent from older pickles
            )
        return (), dict(scale=self.scale, backend=self.backend)

    def _merge_heads(self, out):
        """(B, heads, S, head_dim) -> (B * S, dim), a new array."""
        batch, _, tokens, _ = out.shape
        return out.transpose(0, 2, 1, 3).reshape(batch * tokens, self.dim)

    @staticmethod
    def _project_out(p, merged, shape, dtype):
        out = merged @ p["proj_weight"].T
        out += p["proj_bias"]
        return astype(out.reshape(shape), dtype)

    # -- backward -----------------------------------------------------------------

    def vjp(self, x, window_size=None):
        """The forward pass and its pullback (vector-Jacobian product).

        ``y`` is ``self(x, window_size=window_size)``: the same steps on the
        same backend (the layer's ``backend``), so the same bits on the CPU
        backends (``"numpy"``, ``"numba"``, and ``"auto"``, which picks as
        :func:`relattn.rel_pos_attention_vjp` does: numba where it runs).
        ``pullback(dy)`` goes back through every step of the forward: the
        output projection, the attention (:func:`relattn.rel_pos_attention_vjp`,
        tables through their resize when the grid is not ``input_size``), the
        qkv projection and, windowed, the partition: padded tokens (zeros, so
        their q, k, v are the qkv bias) take part as keys and queries, and the
        gradients reaching them are dropped, as padding's adjoint does.

        Parameters
        ----------
        x : array, shape (B, H, W, dim)
            As for :meth:`forward`: numpy, or CuPy where
            :func:`relattn.rel_pos_attention_vjp` takes CuPy arrays (the
            pullback's results then stay on the device); a DLPack tensor comes
            back as the same kind, and so do ``dx`` and the gradients.
        window_size : int, optional
            As for :meth:`forward`.

        Returns
        -------
        y : array, shape (B, H, W, dim)
            The layer's output, as :meth:`forward` returns it.
        pullback : callable
            ``pullback(dy) -> (dx, grads)`` for a cotangent ``dy`` of ``y``'s
            array type, dtype and shape (``TypeError`` / ``ValueError`` naming
            ``dy`` otherwise). ``dx`` has ``x``'s shape and dtype; ``grads`` is
            a dict keyed as :meth:`state_dict` (``qkv.weight``, ``qkv.bias``
            when present, ``proj.weight``, ``proj.bias``, ``rel_pos_h``,
            ``rel_pos_w`` with ``use_rel_pos``), each gradient of that
            parameter's shape and dtype. Differentiated in the forward's
            arithmetic (float64 when ``x`` or the layer is float64, else
            float32) and rounded once at the end. The pullback uses the
            parameters the forward used, even after a later parameter write,
            and may be called any number of times.

        Raises
        ------
        BackendError
            Where :func:`relattn.rel_pos_attention_vjp` has no backward for the
            call: the layer's ``backend`` is one of the other array library
            (``"cupy"`` on numpy input, which :meth:`forward` serves by copying
            to the GPU), or ``"numba"`` where numba cannot run.

        Notes
        -----
        ``y`` equals the forward's bits wherever both run the same code: numpy
        inputs on every CPU backend, float32 / float64 CuPy inputs on the cupy
        backend, and CuPy float16 / bfloat16 inputs, which both take the
        planned GPU path (cuBLAS projections with float32 accumulation, the
        fused kernel, 16-bit intermediates). The pullback of the latter keeps
        that arithmetic: 16-bit operands with float32 accumulation in every
        product (the attention's fused backward included), the weights'
        gradients and the bias sums in float32, each rounded once to its
        parameter's dtype; the other inputs are differentiated in float32 (or
        float64) and rounded once.

        Memory: besides what the attention's pullback keeps (see
        :func:`relattn.rel_pos_attention_vjp`), the pullback holds the qkv
        projection's input (the windows when windowed, else a copy of ``x``
        in the compute dtype) and the output projection's input, each
        ``B x H x W x dim`` values (padded when windowed).

        Examples
        --------
        >>> import numpy as np, relattn
        >>> attn = relattn.Attention(16, num_heads=2, use_rel_pos=True, input_size=(4, 4),
        ...                          rel_pos_zero_init=False, rng=0)
        >>> x = np.random.default_rng(1).standard_normal((1, 5, 7, 16), dtype=np.float32)
        >>> y, pullback = attn.vjp(x, window_size=3)   # padded to 6 x 9, six windows
        >>> bool(np.array_equal(y, attn(x, window_size=3)))
        True
        >>> dx, grads = pullback(np.ones_like(y))
        >>> dx.shape, sorted(grads) == sorted(attn.state_dict()), grads["rel_pos_h"].shape
        ((1, 5, 7, 16), True, (7, 8))
        """
        return self._layer_vjp(self._gen, x, window_size)   # one read: every pullback uses these parameters

    def _layer_vjp(self, gen, x, window_size, weights=None):
        """:meth:`vjp` with the parameters of generation ``gen``, or, for the
        half-precision GPU path, the device weights ``weights`` (a captured step's)."""
        from relattn._interop import wrap_result

        x, restore = wrap_result("x", x)
        x, ws = self._checked_input(x, window_size)
        height, width = x.shape[1:3]
        if ws:
            windows, pad_hw = window_partition(x, ws)   # a new array, the pullback's to keep
            out, core_pullback = self._vjp(gen, windows, private=True, weights=weights)
            y = window_unpartition(out, ws, pad_hw, (height, width))
        else:
            y, core_pullback = self._vjp(gen, x, private=False, weights=weights)
        y_user = restore(y)
        kind, shape, x_dtype = type(y_user), tuple(y.shape), y.dtype   # y's (the pullback keeps no y)
        dtypes = {attr: value.dtype for attr, value in gen.params.items() if value is not None}

        def pullback(dy):
            dy = _check_cotangent(dy, kind, shape, x_dtype)
            if ws:
                d_out = window_partition(dy, ws)[0]   # unpartition's adjoint: pad with zeros, split
                d_windows, grads = core_pullback(d_out)
                dx = window_unpartition(d_windows, ws, pad_hw, (height, width))   # merge, crop
            else:
                dx, grads = core_pullback(dy)
            named = {key: restore(astype(grads[attr], dtypes[attr]))
                     for key, attr in _PARAM_KEYS.items() if attr in dtypes}
            return restore(astype(dx, x_dtype)), named

        return y_user, pullback

    def _vjp(self, gen, x, private, weights=None):
        """``_forward`` on ``x`` (B, H, W, dim) with its pullback: ``dy`` (x's
        shape and dtype) -> (dx, grads) in the compute dtype, grads keyed by
        attribute name. ``private``: ``x`` is the caller's own array (False),
        copied before the pullback keeps it, or one made for this call (True)."""
        from relattn.autodiff import rel_pos_attention_vjp

        xp = array_module(x)
        if xp is not np and x.dtype.itemsize == 2:
            return self._vjp_half(gen, x, private, weights)
        shape = batch, height, width, dim = x.shape
        n, heads, head_dim = batch * height * width, self.num_heads, self.head_dim
        work = compute_dtype(x.dtype, self.dtype)
        p = self._device_params(gen, xp, work)
        tokens = self._tokens(x, work)
        q, k, v = self._project_qkv(p, tokens, batch, height * width)
        if not private:   # the caller may write to x after the forward: keep a copy
            tokens = _unshared(xp, tokens, x)
        args, kwargs = self._attention_args(p, height, width)
        out, core_pullback = rel_pos_attention_vjp(q, k, v, *args, **kwargs)
        merged = self._merge_heads(out)                      # (n, dim): the output projection's input
        y = self._project_out(p, merged, x.shape, x.dtype)
        del q, k, v, out

        def pullback(dy):
            # y = merged @ Wp^T + bp
            d_y = astype(dy, work).reshape(n, dim)
            grads = {"proj_weight": d_y.T @ merged, "proj_bias": d_y.sum(axis=0)}
            d_merged = d_y @ p["proj_weight"]
            d_out = xp.ascontiguousarray(d_merged.reshape(batch, height * width, heads, head_dim)
                                         .transpose(0, 2, 1, 3))
            dq, dk, dv, grads["rel_pos_h"], grads["rel_pos_w"] = core_pullback(d_out)
            # qkv = x @ Wqkv^T + bqkv, read as (B, S, 3, heads, head_dim)
            d_qkv = xp.empty((batch, height * width, 3, heads, head_dim), dtype=work)
            for i, d in enumerate((dq, dk, dv)):
                d_qkv[:, :, i] = d.transpose(0, 2, 1, 3)
            d_qkv = d_qkv.reshape(n, 3 * dim)
            grads["qkv_weight"] = d_qkv.T @ tokens
            if p["qkv_bias"] is not None:
                grads["qkv_bias"] = d_qkv.sum(axis=0)
            dx = (d_qkv @ p["qkv_weight"]).reshape(shape)
            return dx, grads

        return y, pullback

    def _vjp_half(self, gen, x, private, weights=None):
        """``_vjp`` for a float16 / bfloat16 CuPy ``x``: the forward's planned
        GPU path (16-bit weights and biases, cuBLAS projections with float32
        accumulation rounded once to x's dtype, the attention on 16-bit q, k, v, so its
        fused backward), and a pullback in the same arithmetic: each product
        on 16-bit operands with float32 accumulation (the weights' gradients
        and the bias sums in float32), dx and the attention's cotangent
        rounded to x's dtype, as PyTorch's autocast backward does.
        ``weights``: the :class:`_HalfWeights` to read (default: those of
        ``gen``, cached in it)."""
        import cupy

        from relattn.autodiff import rel_pos_attention_vjp
        from relattn.backends.gpu.cublas import column_sums, contiguous, linear_half, linear_tn, ones_column
        from relattn.backends.gpu.windows import copy_rows

        half = x.dtype
        shape = batch, height, width, dim = x.shape
        n, heads, head_dim, seq = batch * height * width, self.num_heads, self.head_dim, height * width
        if weights is None:
            weights = self._half_weights(gen, half)
        w, wT = weights.w, weights.wT
        tokens = contiguous(x.reshape(n, dim))
        if not private:   # the pullback keeps tokens; the caller may write to x after the forward
            tokens = tokens.view(cupy.uint16).copy().view(half)
        qkv = weights.linear("qkv", n, tokens.data.ptr & 15)(tokens)
        q, k, v = self._split_heads(qkv, batch, seq)
        sizes = ((height, width), (height, width)) if self.use_rel_pos else (None, None)
        out, core_pullback = rel_pos_attention_vjp(q, k, v, *weights.tables, *sizes, scale=self.scale,
                                                   backend=self.backend)
        merged = contiguous(out.transpose(0, 2, 1, 3)).reshape(n, dim)
        y = weights.linear("proj", n, merged.data.ptr & 15)(merged).reshape(shape)
        del q, k, v, out
        ones = ones_column(n, half)   # the bias sums' operand (the pullback keeps it, as a graph reads it)

        def pullback(dy):
            d_y = contiguous(dy.reshape(n, dim))
            grads = {"proj_weight": linear_tn(d_y, merged),   # dy^T merged
                     "proj_bias": column_sums(d_y, ones)}
            d_merged = linear_half(d_y, wT["proj_weight"], None, half)                # dy Wp
            d_out = contiguous(d_merged.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3))
            dq, dk, dv, grads["rel_pos_h"], grads["rel_pos_w"] = core_pullback(d_out)
            bits = cupy.empty((batch, seq, 3, heads, head_dim), dtype=cupy.uint16)
            for i, d in enumerate((dq, dk, dv)):
                copy_rows(d.view(cupy.uint16).transpose(0, 2, 1, 3), bits[:, :, i])
            d_qkv = bits.reshape(n, 3 * dim).view(half)
            grads["qkv_weight"] = linear_tn(d_qkv, tokens)   # d_qkv^T x
            if w["qkv_bias"] is not None:
                grads["qkv_bias"] = column_sums(d_qkv, ones)
            dx = linear_half(d_qkv, wT["qkv_weight"], None, half).reshape(shape)      # d_qkv Wqkv
            return dx, grads

        return y, pullback

    def _half_weights(self, gen, half):
        """The :class:`_HalfWeights` of generation ``gen`` for CuPy inputs of
        dtype ``half`` on the current device, built once and cached in it."""
        import cupy

        key = ("half-weights", cupy.cuda.runtime.getDevice(), half.str)
        cached = gen.cache.get(key)
        if cached is None:
            cached = gen.cache.setdefault(key, _HalfWeights(self._device_params(gen, cupy, half),
                                                            self._gpu_tables(gen, cupy, half), half))
        return cached

    def __repr__(self):
        extra = f", input_size={self.input_size}" if self.use_rel_pos else ""
        window = f", window_size={self.window_size}" if self.window_size else ""
        return (
            f"Attention(dim={self.dim}, num_heads={self.num_heads}, qkv_bias={self._params['qkv_bias'] is not None}, "
            f"use_rel_pos={self.use_rel_pos}{extra}{window}, dtype={dtype_name(self.dtype)}, backend={self.backend!r})"
        )


class _LayerGraph:
    """A layer's forward pass captured as a CUDA graph (see Attention.capture)."""

    def __init__(self, layer, x, window_size):
        self._layer, self._window_size = layer, window_size
        self._capture(x)

    def _capture(self, x):
        from relattn.backends.gpu.graphs import CapturedGraph

        self._gen = self._layer._gen   # the parameters the graph reads: kept alive with it
        self._graph = CapturedGraph(lambda a: self._layer.forward(a, window_size=self._window_size), x)

    def __call__(self, x, copy=True):
        if self._layer._gen is not self._gen:   # new parameters: record again
            self._capture(x)
        return self._graph(x, copy=copy)


class _LayerVjpGraph:
    """A layer's training step captured as CUDA graphs (see Attention.capture_vjp)."""

    def __init__(self, layer, x, window_size):
        self._layer, self._window_size = layer, window_size
        self._lock = threading.Lock()
        self._capture(x)

    def _capture(self, x):
        from relattn.backends.gpu.graphs import CapturedVjp

        layer = self._layer
        gen = self._gen = layer._gen
        weights = self._weights = _StepWeights(layer, gen.params, x.dtype)

        def step(a):
            weights.derive()   # the first launches of the forward graph
            return layer._layer_vjp(gen, a, self._window_size, weights)

        self._graphs = CapturedVjp(step, x)
        self._step = 0

    @property
    def parameters(self):
        """The parameters the graphs read (CuPy arrays keyed like ``state_dict``)."""
        params = self._weights.params
        return {key: params[a] for key, a in _PARAM_KEYS.items() if params.get(a) is not None}

    def __call__(self, x, copy=True):
        with self._lock:   # one replay at a time: the buffers are shared
            gen = self._layer._gen
            if gen is not self._gen:   # the layer's parameters replaced: the step takes them
                self._graphs.check_input(x)
                if (gen.params["qkv_bias"] is None) != (self._gen.params["qkv_bias"] is None):
                    self._capture(x)   # another layer structure: record again
                else:
                    self._weights.load(gen.params)
                    self._gen = gen
            y = self._graphs.forward(x, copy=copy)
            self._step += 1
            graphs, step = self._graphs, self._step

        def pullback(dy, copy=True):
            with self._lock:
                if self._graphs is not graphs or self._step != step:
                    raise RuntimeError("pullback: a later call of the captured step has replaced this step's "
                                       "residuals; call the pullback before the next step")
                return graphs.backward(dy, copy=copy)

        return y, pullback
