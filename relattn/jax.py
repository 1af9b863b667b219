"""JAX bridge: :func:`rel_pos_attention` on jax arrays, under ``jax.jit``,
``jax.grad`` and ``jax.vmap``.

The attention runs in relattn's host (numpy) path through
``jax.pure_callback``; its gradient is a ``jax.custom_vjp`` whose backward
callback runs :func:`relattn.rel_pos_attention_vjp`. JAX is imported only
when a function here is called (``import relattn`` never imports it, and
``import relattn.jax`` works without it)::

    import jax, jax.numpy as jnp
    import relattn.jax as rj

    def loss(q, k, v, table_h, table_w):
        out = rj.rel_pos_attention(q, k, v, table_h, table_w, q_size=(14, 14))
        return jnp.mean(out ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, table_h, table_w)

What crosses the host, per call (on a GPU or any other device)
---------------------------------------------------------------
Every callback runs on the host CPU; JAX copies its arguments from the
device to the host and its results back:

* the forward (plain call, and the forward of a gradient): ``q``, ``k``,
  ``v`` and the tables go to the host, ``out`` comes back;
* the backward: ``q``, ``k``, ``v``, the tables and the cotangent of
  ``out`` go to the host; ``dq``, ``dk``, ``dv`` and the tables' gradients
  come back.

There is no device-resident path (no DLPack exchange with CuPy): on a GPU
the attention runs on the CPU's numba kernels, between those copies. The
callbacks also take one writable host copy of each argument (the numba
kernels are compiled for writable arrays; JAX hands read-only buffers).

What the backward costs
-----------------------
The forward keeps nothing but its inputs (the residuals are ``q``, ``k``,
``v`` and the tables, which JAX holds anyway). The backward callback runs
:func:`relattn.rel_pos_attention_vjp` again on them (one extra forward, which
also rebuilds the per-row softmax statistics) and calls its pullback, so a
gradient step costs two forwards and one backward. The backward always
computes all of ``dq``, ``dk``, ``dv`` and the tables' gradients, whatever
``jax.grad`` asks for.

Limits
------
* Reverse mode only (``jax.grad``, ``jax.vjp``, ``jax.value_and_grad``):
  ``jax.jvp``, ``jax.jacfwd`` and so second derivatives raise ``TypeError``
  (``custom_vjp`` functions have no forward-mode rule).
* ``jax.vmap`` runs the callback once per mapped element
  (``vmap_method="sequential"``, a ``lax.map``): correct for every
  combination of mapped and shared arguments (per-example gradients
  included), not batched into one relattn call.
* ``q_size``, ``k_size``, ``scale``, ``backend`` and ``resize_dtype`` are
  static Python values (not traced, not differentiated); under ``jax.jit``
  close over them or mark them static.
* Differentiation runs relattn's CPU backward: ``backend`` ``"auto"``,
  ``"numba"`` (fused) or ``"numpy"`` (reference); ``"cupy"`` serves the plain
  forward only.
"""

from __future__ import annotations

import functools

import numpy as np

from relattn import backends
from relattn.autodiff import rel_pos_attention_vjp
from relattn.functional import BackendError, _prepare
from relattn.functional import rel_pos_attention as _host_attention

__all__ = ["rel_pos_attention"]

_INSTALL_JAX = "relattn.jax needs the jax package (pip install jax)"

# Backends rel_pos_attention_vjp differentiates on numpy arrays (the CPU backward).
_BACKWARD_BACKENDS = ("auto", "numba", "numpy")


def _jax():
    try:
        import jax
    except ImportError:
        raise ImportError(_INSTALL_JAX) from None
    return jax


def _as_jax(jax, name, x):
    """``x`` as a jax array (tracers pass through): jax arrays, and numpy
    arrays converted as ``jax.numpy`` converts them, except that a float64
    array is refused rather than silently made float32 when x64 is off."""
    if isinstance(x, jax.Array):
        return x
    if isinstance(x, (np.ndarray, np.generic)):
        converted = jax.numpy.asarray(x)
        if converted.dtype != x.dtype and x.dtype == np.float64:
            raise TypeError(f"{name}: a float64 array needs jax_enable_x64 "
                            "(jax.config.update('jax_enable_x64', True)), or cast it to float32")
        return converted
    raise TypeError(f"{name}: expected a jax array (or a numpy array), got {type(x).__name__}")


def _stand_in(x):
    """A numpy array of ``x``'s shape and dtype holding no memory (one zero
    broadcast), for relattn's validation at trace time."""
    return None if x is None else np.broadcast_to(np.zeros((), dtype=np.dtype(x.dtype)), tuple(x.shape))


def _check_backend(backend):
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, got {type(backend).__name__}")
    if backend != "auto":
        backends.get(backend)   # ValueError naming the known backends


def rel_pos_attention(
    q, k, v, rel_pos_h=None, rel_pos_w=None, q_size=None, k_size=None, *, scale=None, backend="auto",
    resize_dtype="float32",
):
    """:func:`relattn.rel_pos_attention` on jax arrays, differentiable.

    A ``jax.custom_vjp`` over two ``jax.pure_callback`` calls into relattn's
    numpy path: works under ``jax.jit``, ``jax.grad`` / ``jax.vjp`` (reverse
    mode) and ``jax.vmap``. All arguments are validated while tracing, by
    relattn's own checks (errors name the argument).

    Parameters
    ----------
    q : jax array, shape (B, heads, Sq, d)
    k, v : jax array, shape (B, heads, Sk, d)
        One dtype among float16, bfloat16, float32 and float64 (float64
        needs ``jax_enable_x64``). numpy arrays are accepted and converted
        with ``jax.numpy.asarray`` (a float64 one is refused while x64 is
        off, instead of being truncated to float32); other objects (lists,
        torch tensors) raise ``TypeError`` naming the argument.
    rel_pos_h, rel_pos_w : jax array, shape (L_h, d) and (L_w, d), optional
        One table pair shared by all heads; both or neither. Tables whose
        row count differs from ``2 * max(q, k) - 1`` are resized, and their
        gradients go back through the resize.
    q_size, k_size, scale, backend, resize_dtype
        As for :func:`relattn.rel_pos_attention`; static (Python values, not
        traced and not differentiated). Differentiating needs a backend with
        a backward pass: ``"auto"`` (the fused numba backward where numba
        runs), ``"numba"`` or ``"numpy"`` (the reference); ``"cupy"`` runs
        the plain forward only (``BackendError`` under ``jax.grad``).

    Returns
    -------
    jax array, shape (B, heads, Sq, d)
        q's dtype; on q's device (the computation itself runs on the host:
        see the module docstring for what crosses, per call).

    Notes
    -----
    The forward calls :func:`relattn.rel_pos_attention` and keeps only its
    inputs; the backward recomputes the forward with
    :func:`relattn.rel_pos_attention_vjp` and applies its pullback (one extra
    forward per backward). The gradients are those of the pullback: float64
    inputs are differentiated in float64, half-precision ones in float32 and
    rounded once. Under ``jax.vmap`` the callbacks run once per mapped element.

    Examples
    --------
    ::

        import jax, jax.numpy as jnp
        import relattn.jax as rj

        keys = jax.random.split(jax.random.key(0), 5)
        q, k, v = (jax.random.normal(key, (1, 2, 12, 8)) for key in keys[:3])
        table_h = jax.random.normal(keys[3], (5, 8))    # 2 * 3 - 1 rows
        table_w = jax.random.normal(keys[4], (7, 8))    # 2 * 4 - 1 rows

        @jax.jit
        def loss(table_h, table_w):
            out = rj.rel_pos_attention(q, k, v, table_h, table_w, q_size=(3, 4))
            return jnp.sum(out ** 2)

        d_h, d_w = jax.grad(loss, argnums=(0, 1))(table_h, table_w)
    """
    jax = _jax()
    q, k, v = (_as_jax(jax, name, x) for name, x in (("q", q), ("k", k), ("v", v)))
    rel_pos_h = None if rel_pos_h is None else _as_jax(jax, "rel_pos_h", rel_pos_h)
    rel_pos_w = None if rel_pos_w is None else _as_jax(jax, "rel_pos_w", rel_pos_w)
    if isinstance(scale, jax.Array):
        raise TypeError("scale: expected a Python number (static, not differentiated), got a jax array")
    _check_backend(backend)
    # relattn's validation, on stand-ins of the arrays' shapes and dtypes
    _, _, _, _, _, scale, q_size, k_size = _prepare(
        *(_stand_in(x) for x in (q, k, v, rel_pos_h, rel_pos_w)), q_size, k_size, scale, resize_dtype)
    if q_size is None:   # plain attention: relattn picks its own key grid
        k_size = None
    tables = rel_pos_h is not None
    fn = _differentiable(q_size, k_size, scale, backend, str(resize_dtype), tables)
    return fn(q, k, v, rel_pos_h, rel_pos_w) if tables else fn(q, k, v)


# --------------------------------------------------------------- host side
def _host_forward(config, *arrays):
    """The forward callback: relattn's forward on writable host copies."""
    q_size, k_size, scale, backend, resize_dtype = config
    q, k, v, th, tw = (*(np.array(a) for a in arrays), None, None)[:5]
    out = _host_attention(q, k, v, th, tw, q_size, k_size, scale=scale, backend=backend,
                          resize_dtype=resize_dtype)
    return np.asarray(out, dtype=q.dtype)


def _host_backward(config, *arrays):
    """The backward callback: the forward again with its pullback, applied to
    the cotangent (the last argument); the gradients of every input."""
    q_size, k_size, scale, backend, resize_dtype = config
    *inputs, dout = (np.array(a) for a in arrays)
    q, k, v, th, tw = (*inputs, None, None)[:5]
    _, pullback = rel_pos_attention_vjp(q, k, v, th, tw, q_size, k_size, scale=scale, backend=backend,
                                        resize_dtype=resize_dtype)
    grads = pullback(dout)[:len(inputs)]
    return tuple(np.asarray(g, dtype=a.dtype) for g, a in zip(grads, inputs))


# --------------------------------------------------------------- jax side
@functools.lru_cache(maxsize=256)
def _differentiable(q_size, k_size, scale, backend, resize_dtype, tables):
    """The ``custom_vjp`` function of one static configuration, taking
    ``(q, k, v)`` or ``(q, k, v, rel_pos_h, rel_pos_w)``."""
    jax = _jax()
    config = (q_size, k_size, scale, backend, resize_dtype)
    forward_cb = functools.partial(_host_forward, config)
    backward_cb = functools.partial(_host_backward, config)

    def forward(*arrays):
        out_type = jax.ShapeDtypeStruct(arrays[0].shape, arrays[0].dtype)
        return jax.pure_callback(forward_cb, out_type, *arrays, vmap_method="sequential")

    @jax.custom_vjp
    def attention(*arrays):
        return forward(*arrays)

    def attention_fwd(*arrays):
        if backend not in _BACKWARD_BACKENDS:
            raise BackendError(f"backend: {backend!r} cannot be differentiated through relattn.jax: its "
                               "callbacks hand numpy arrays to relattn, whose backward there runs on the "
                               "CPU; use backend='auto', 'numba' or 'numpy'")
        return forward(*arrays), arrays

    def attention_bwd(arrays, dout):
        grad_types = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays)
        return tuple(jax.pure_callback(backward_cb, grad_types, *arrays, dout, vmap_method="sequential"))

    attention.defvjp(attention_fwd, attention_bwd)
    return attention
