"""Numba kernels for the numba CPU backend (see ``numba_cpu.py``).

Only compiled code lives here: functions taking plain C-contiguous arrays and
scalars.  Importing this module needs numba; the backend module imports it
lazily.

The attention kernel is flash-style: the work is split over
(batch*head, query tile) pairs in a ``prange``; each pair walks the key tiles,
computes the transposed logit tile ``S^T = K_t Q_t^T`` with its own loops,
adds ``scale`` and the decomposed relative-position terms, runs an online
softmax (running max and sum per query) and accumulates ``P V``.  float32
runs on explicit 8-lane vectors with register-blocked micro-kernels (see
"float32 fast path" below); float64 on plain loops LLVM vectorises.  Neither
the ``Sq x Sk`` bias nor the logits ever exist; the extra memory is a few small
per-tile buffers per work item.

The logit tile is kept transposed (keys x queries) so that every per-query
quantity (running max, running sum, rescale factor) is updated by plain
element-wise loops over the contiguous query axis: these vectorise without
``reassoc`` fast-math, so the exp range reduction below keeps its accuracy.
"""

from __future__ import annotations

import types as types_module

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

def _cache_probe():  # pragma: no cover - only decorated, never called
    return 0


def _can_cache() -> bool:
    """numba resolves the cache location when a cache=True function is decorated
    and raises if none is writable (read-only install, no usable home): then the
    kernels compile in memory on each run instead of failing to import."""
    try:
        njit(cache=True)(_cache_probe)
        return True
    except RuntimeError:
        return False


_CACHE = _can_cache()

# fast-math: contraction into FMAs only.  No ``reassoc``: it would fold the
# Cody-Waite split ``(x - n*C1) - n*C2`` into ``x - n*(C1 + C2)``.
_FASTMATH = {"contract"}

# ---------------------------------------------------------------------------
# exp: Cody-Waite range reduction + polynomial, branch-free so it vectorises.
# ---------------------------------------------------------------------------


@intrinsic
def _pow2i_f32(typingctx, n):
    """2.0**n for an integer-valued float32 n in [-126, 127] (exponent bits)."""
    if n != types.float32:
        return None
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        ni = builder.fptosi(args[0], i32)
        e = builder.shl(builder.add(ni, ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(e, ir.FloatType())

    return sig, codegen


@intrinsic
def _pow2i_f64(typingctx, n):
    """2.0**n for an integer-valued float64 n in [-1022, 1023] (exponent bits)."""
    if n != types.float64:
        return None
    sig = types.float64(types.float64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        ni = builder.fptosi(args[0], i64)
        e = builder.shl(builder.add(ni, ir.Constant(i64, 1023)), ir.Constant(i64, 52))
        return builder.bitcast(e, ir.DoubleType())

    return sig, codegen


_F32_LOG2E = np.float32(1.4426950408889634)
_F32_HALF = np.float32(0.5)
_F32_ONE = np.float32(1.0)
_F32_ZERO = np.float32(0.0)
_F32_LO = np.float32(-104.0)  # below this, exp < 2**-150: rounds to 0 (as numpy's expf)
_F32_C1 = np.float32(0.693359375)  # ln2 split (Cephes expf)
_F32_C2 = np.float32(-2.12194440e-4)
_F32_P0 = np.float32(1.9875691500e-4)
_F32_P1 = np.float32(1.3981999507e-3)
_F32_P2 = np.float32(8.3334519073e-3)
_F32_P3 = np.float32(4.1665795894e-2)
_F32_P4 = np.float32(1.6666665459e-1)
_F32_P5 = np.float32(5.0000001201e-1)


@njit(fastmath=_FASTMATH)
def _exp_f32(x):
    """exp(x) for float32 x <= ~88, ~1 ulp, subnormal results included
    (numpy's expf gives them, and a weight of 1e-42 times an infinite value
    is infinite, not NaN); exactly 0 below -104."""
    xc = x if x > _F32_LO else _F32_LO
    n = np.floor(xc * _F32_LOG2E + _F32_HALF)
    r = xc - n * _F32_C1
    r = r - n * _F32_C2
    z = r * r
    p = ((((_F32_P0 * r + _F32_P1) * r + _F32_P2) * r + _F32_P3) * r + _F32_P4) * r + _F32_P5
    p = p * z + r + _F32_ONE
    # 2**n in two normal factors, so that n down to -150 rounds once into the
    # subnormal range instead of wrapping the exponent bits.
    n1 = np.floor(n * _F32_HALF)
    y = (p * _pow2i_f32(n1)) * _pow2i_f32(n - n1)
    # x < -104 gives 0; NaN propagates (as numpy's exp does), never becomes 0.
    return y if x >= _F32_LO else (_F32_ZERO if x < _F32_LO else x)


_F64_LOG2E = 1.4426950408889634
_F64_LO = -746.0  # below this, exp < 2**-1076: rounds to 0
_F64_C1 = 6.93145751953125e-1  # ln2 split (Cephes exp)
_F64_C2 = 1.42860682030941723212e-6


@njit(fastmath=_FASTMATH)
def _exp_f64(x):
    """exp(x) for float64 x <= ~709, a few ulp, subnormal results included;
    exactly 0 below -746."""
    xc = x if x > _F64_LO else _F64_LO
    n = np.floor(xc * _F64_LOG2E + 0.5)
    r = xc - n * _F64_C1
    r = r - n * _F64_C2
    # Taylor to degree 13 on |r| <= 0.347: truncation < 1e-17 relative.
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * (r * r) + r + 1.0
    n1 = np.floor(n * 0.5)  # 2**n in two normal factors (see _exp_f32)
    y = (p * _pow2i_f64(n1)) * _pow2i_f64(n - n1)
    return y if x >= _F64_LO else (0.0 if x < _F64_LO else x)


def _fexp(x):  # pragma: no cover - typing stub, replaced by the overload
    raise NotImplementedError


@overload(_fexp, fastmath=_FASTMATH)
def _fexp_ov(x):
    if x == types.float32:
        return lambda x: _exp_f32(x)
    if x == types.float64:
        return lambda x: _exp_f64(x)
    return None


@njit(cache=_CACHE, fastmath=_FASTMATH)
def exp_array(x, out):
    """out[:] = exp(x[:]) with the kernel's exp (for tests)."""
    for i in range(x.shape[0]):
        out[i] = _fexp(x[i])


# ---------------------------------------------------------------------------
# tile products (own loops: BLAS inside a numba prange oversubscribes and, with
# numba's OpenMP layer, makes pthreads OpenBLAS print warnings)
# ---------------------------------------------------------------------------


@njit(fastmath=_FASTMATH)
def _qk_tile(kb, j0, nk, qT, nq, sT, spare, rhT, rwT, has_rel, k_w, m):
    """sT[j, i] = rhT[ky, i] + rwT[kx, i] + sum_c kb[j0 + j, c] * qT[c, i]
    (key j0 + j = ky * k_w + kx; qT already holds scale * q), and
    m[i] = max(m[i], max_j sT[j, i]), for j < nk, i < nq.

    Two keys x four channels per pass over the (vectorised) query axis:
    8 FMAs per 6 loads and 2 stores.  The bias initialises the accumulators
    and the running max is taken while the rows are hot.
    """
    d = qT.shape[0]
    d4 = d - d % 4
    ky = j0 // k_w
    kx = j0 - ky * k_w
    for j in range(0, nk, 2):
        two = j + 1 < nk
        s0 = sT[j]
        s1 = sT[j + 1] if two else spare
        kr0 = kb[j0 + j]
        kr1 = kb[j0 + j + 1] if two else kr0
        if has_rel:
            ky1 = ky
            kx1 = kx + 1
            if kx1 == k_w:
                kx1 = 0
                ky1 += 1
            if not two:
                ky1 = ky
                kx1 = kx
            h0 = rhT[ky]
            w0 = rwT[kx]
            h1 = rhT[ky1]
            w1 = rwT[kx1]
            for i in range(nq):
                s0[i] = h0[i] + w0[i]
                s1[i] = h1[i] + w1[i]
            kx = kx1 + 1
            ky = ky1
            if kx == k_w:
                kx = 0
                ky += 1
        else:
            for i in range(nq):
                s0[i] = 0
                s1[i] = 0
        for c in range(0, d4, 4):
            a0 = kr0[c]
            a1 = kr0[c + 1]
            a2 = kr0[c + 2]
            a3 = kr0[c + 3]
            b0 = kr1[c]
            b1 = kr1[c + 1]
            b2 = kr1[c + 2]
            b3 = kr1[c + 3]
            q0 = qT[c]
            q1 = qT[c + 1]
            q2 = qT[c + 2]
            q3 = qT[c + 3]
            for i in range(nq):
                x0 = q0[i]
                x1 = q1[i]
                x2 = q2[i]
                x3 = q3[i]
                s0[i] = s0[i] + a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
                s1[i] = s1[i] + b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
        for c in range(d4, d):
            a0 = kr0[c]
            b0 = kr1[c]
            q0 = qT[c]
            for i in range(nq):
                s0[i] = s0[i] + a0 * q0[i]
                s1[i] = s1[i] + b0 * q0[i]
        for i in range(nq):
            x0 = s0[i]
            x1 = s1[i]
            mi = m[i]
            mi = x0 if x0 > mi else mi
            mi = x1 if x1 > mi else mi
            m[i] = mi


@njit(fastmath=_FASTMATH)
def _pv_tile(pT, nk, nq, vb, j0, oT):
    """oT[c, i] += sum_j vb[j0 + j, c] * pT[j, i] for c < d, i < nq, j < nk.

    Two channels x four keys per pass over the (vectorised) query axis, as in
    ``_qk_tile``.  ``oT`` has a spare row ``d`` that absorbs the second
    channel of the last pair when d is odd.
    """
    d = oT.shape[0] - 1
    nk4 = nk - nk % 4
    for c in range(0, d, 2):
        c1 = min(c + 1, d - 1)
        o0 = oT[c]
        o1 = oT[c + 1]
        for j in range(0, nk4, 4):
            va = vb[j0 + j]
            vb1 = vb[j0 + j + 1]
            vb2 = vb[j0 + j + 2]
            vb3 = vb[j0 + j + 3]
            a0 = va[c]
            a1 = vb1[c]
            a2 = vb2[c]
            a3 = vb3[c]
            b0 = va[c1]
            b1 = vb1[c1]
            b2 = vb2[c1]
            b3 = vb3[c1]
            p0 = pT[j]
            p1 = pT[j + 1]
            p2 = pT[j + 2]
            p3 = pT[j + 3]
            for i in range(nq):
                x0 = p0[i]
                x1 = p1[i]
                x2 = p2[i]
                x3 = p3[i]
                o0[i] = o0[i] + a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
                o1[i] = o1[i] + b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
        for j in range(nk4, nk):
            a0 = vb[j0 + j, c]
            b0 = vb[j0 + j, c1]
            p0 = pT[j]
            for i in range(nq):
                o0[i] = o0[i] + a0 * p0[i]
                o1[i] = o1[i] + b0 * p0[i]


@njit(fastmath=_FASTMATH)
def _safe_max(m):
    """The running maximum to subtract: m, or 0 while every logit so far is
    -inf (masked), so that exp(-inf - m) is 0 and not exp(NaN)."""
    return m if m != -np.inf else 0.0  # (float64 kernels only: float32 takes the vector path)


@njit(fastmath=_FASTMATH)
def _softmax_tile(sT, nk, nq, m, alpha, lsum, tsum):
    """In place: sT[j, i] = exp(sT[j, i] - m[i]); on entry alpha holds the old
    running max, on exit the rescale factor exp(old - new).  The tile's weights
    are summed in tsum first, then lsum = lsum * alpha + tsum (two-level
    summation keeps the float32 error ~ (tk + Sk/tk) eps, not Sk eps)."""
    for i in range(nq):
        alpha[i] = _fexp(alpha[i] - _safe_max(m[i]))
        tsum[i] = 0
    for j in range(nk):
        srow = sT[j]
        for i in range(nq):
            p = _fexp(srow[i] - _safe_max(m[i]))
            srow[i] = p
            tsum[i] += p
    for i in range(nq):
        lsum[i] = lsum[i] * alpha[i] + tsum[i]


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------


@njit(cache=_CACHE, parallel=True, fastmath=_FASTMATH)
def _attention_fwd_generic(q, k, v, rel_h, rel_w, has_rel, k_w, scale, tq, tk, out, nonfinite):
    """Flash-style attention with decomposed relative-position bias.

    q: (BH, Sq, d); k, v: (BH, Sk, d); out: (BH, Sq, d), all C-contiguous and
    of one float dtype.  rel_h: (BH, Sq, k_h), rel_w: (BH, Sq, k_w) when
    ``has_rel`` (else ignored, any shape).  Key j = ky * k_w + kx.  tq / tk:
    query / key tile sizes.  ``scale`` is a scalar of the array dtype.
    nonfinite: (BH, Sq) bool, set where an output row holds a NaN or an
    infinity (the caller recomputes those rows with the formula: see
    ``numba_cpu.attention``).

    Work items are (batch*head, query tile) pairs.  Per item the query axis
    is padded to a multiple of 8 lanes (zero q and bias: finite, discarded),
    so the vectorised loops never run a scalar remainder.
    """
    BH, Sq, d = q.shape
    Sk = k.shape[1]
    dt = q.dtype
    sc = scale
    nqt = (Sq + tq - 1) // tq
    n_items = BH * nqt
    k_h = Sk // k_w if k_w > 0 else 0
    for it in prange(n_items):
        bh = it // nqt
        qt = it - bh * nqt
        i0 = qt * tq
        nq0 = min(tq, Sq - i0)
        nq = (nq0 + 7) // 8 * 8
        qb = q[bh]
        kb = k[bh]
        vb = v[bh]
        qT = np.zeros((d, nq), dtype=dt)
        for i in range(nq0):
            for c in range(d):
                qT[c, i] = qb[i0 + i, c] * sc
        m = np.full(nq, -np.inf, dtype=dt)
        alpha = np.empty(nq, dtype=dt)
        lsum = np.zeros(nq, dtype=dt)
        oT = np.zeros((d, nq), dtype=dt)
        pT = np.empty((d + 1, nq), dtype=dt)  # tile's P V; spare row d for odd d
        tsum = np.empty(nq, dtype=dt)
        sbuf = np.empty(tk * nq + nq, dtype=dt)
        spare = sbuf[tk * nq:]
        if has_rel:
            rhT = np.zeros((k_h, nq), dtype=dt)
            rwT = np.zeros((k_w, nq), dtype=dt)
            for i in range(nq0):
                for a in range(k_h):
                    rhT[a, i] = rel_h[bh, i0 + i, a]
                for a in range(k_w):
                    rwT[a, i] = rel_w[bh, i0 + i, a]
        else:
            rhT = np.zeros((1, nq), dtype=dt)
            rwT = np.zeros((1, nq), dtype=dt)
        for j0 in range(0, Sk, tk):
            nk = min(tk, Sk - j0)
            sT = sbuf[:nk * nq].reshape((nk, nq))
            for i in range(nq):
                alpha[i] = m[i]  # old running max
            _qk_tile(kb, j0, nk, qT, nq, sT, spare, rhT, rwT, has_rel, k_w, m)
            _softmax_tile(sT, nk, nq, m, alpha, lsum, tsum)
            pT[:, :] = 0
            _pv_tile(sT, nk, nq, vb, j0, pT)
            # two-level accumulation (see _softmax_tile)
            for c in range(d):
                orow = oT[c]
                prow = pT[c]
                for i in range(nq):
                    orow[i] = orow[i] * alpha[i] + prow[i]
        for i in range(nq):
            lsum[i] = 1 / lsum[i]
        ob = out[bh]
        for i in range(nq0):
            li = lsum[i]
            orow = ob[i0 + i]
            zero = li - li  # NaN when li is
            for c in range(d):
                x = oT[c, i] * li
                orow[c] = x
                zero += x * 0  # stays 0 while every x is finite
            nonfinite[bh, i0 + i] = zero != 0


# ---------------------------------------------------------------------------
# float32 fast path: explicit 8-lane vectors (AVX ymm) in registers
# ---------------------------------------------------------------------------
#
# numba has no SIMD type, and LLVM's loop vectoriser only vectorises innermost
# loops, so a tile product written as scalar loops keeps its accumulators in
# memory (a load and a store per few FMAs).  ``F32x8`` below is an LLVM
# ``<8 x float>`` value: locals of this type live in registers, which gives
# register-blocked micro-kernels (4 keys or 4 channels x 16 queries = 8
# accumulators) as in a BLAS kernel.  The operations carry no fast-math flags,
# so the exp's range reduction stays exact.


class _F32x8Type(types.Type):
    def __init__(self):
        super().__init__(name="F32x8")


f32x8 = _F32x8Type()
_V8 = ir.VectorType(ir.FloatType(), 8)
_I32x8 = ir.VectorType(ir.IntType(32), 8)


@register_model(_F32x8Type)
class _F32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8)


def _vfma_ir(b, x, y, z):
    f = cgutils.get_or_insert_function(b.module, ir.FunctionType(_V8, [_V8, _V8, _V8]), "llvm.fma.v8f32")
    return b.call(f, [x, y, z])


def _vconst(x):
    return ir.Constant(_V8, [float(np.float32(x))] * 8)


_F32P = types.CPointer(types.float32)


def _vptr(context, builder, idxty, ptr, idx):
    i = context.cast(builder, idx, idxty, types.intp)
    return builder.bitcast(builder.gep(ptr, [i]), _V8.as_pointer())


@intrinsic
def aptr(typingctx, arr):
    """Raw data pointer of a C-contiguous array (the micro-kernels take
    pointers: array arguments would cost NRT reference counting calls in
    their inner loops)."""
    if not (isinstance(arr, types.Array) and arr.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        return context.make_array(sig.args[0])(context, builder, value=args[0]).data

    return types.CPointer(arr.dtype)(arr), codegen


@intrinsic
def padd(typingctx, ptr, n):
    """``ptr + n`` (elements) for a raw pointer from ``aptr``."""
    if not (isinstance(ptr, types.CPointer) and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        i = context.cast(builder, args[1], sig.args[1], types.intp)
        return builder.gep(args[0], [i])

    return ptr(ptr, n), codegen


@intrinsic
def vload(typingctx, ptr, idx):
    """ptr[idx:idx + 8] as a vector (float32 pointer, unaligned)."""
    if not (ptr == _F32P and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_vptr(context, builder, sig.args[1], args[0], args[1]), align=4)

    return f32x8(ptr, idx), codegen


@intrinsic
def vstore(typingctx, ptr, idx, x):
    """ptr[idx:idx + 8] = x."""
    if not (ptr == _F32P and isinstance(idx, types.Integer) and x == f32x8):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _vptr(context, builder, sig.args[1], args[0], args[1]), align=4)
        return context.get_dummy_value()

    return types.none(ptr, idx, x), codegen


@intrinsic
def vbcast(typingctx, x):
    """A vector of 8 copies of the float32 scalar x."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        v = builder.insert_element(ir.Constant(_V8, None), args[0], ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(v, ir.Constant(_V8, None), ir.Constant(_I32x8, [0] * 8))

    return f32x8(x), codegen


@intrinsic
def vzero(typingctx):
    def codegen(context, builder, sig, args):
        return _vconst(0.0)

    return f32x8(), codegen


def _vbin(op):
    @intrinsic
    def f(typingctx, a, b):
        if not (a == f32x8 and b == f32x8):
            return None

        def codegen(context, builder, sig, args):
            return op(builder, args[0], args[1])

        return f32x8(a, b), codegen

    return f


vadd = _vbin(lambda b, x, y: b.fadd(x, y))
vsub = _vbin(lambda b, x, y: b.fsub(x, y))
vmul = _vbin(lambda b, x, y: b.fmul(x, y))
vdiv = _vbin(lambda b, x, y: b.fdiv(x, y))
# max(x, m) as ``x if x > m else m``: a NaN x leaves m (the NaN then reaches
# the row through exp, as in the scalar kernel).
vmax = _vbin(lambda b, x, y: b.select(b.fcmp_ordered(">", x, y), x, y))


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c, fused."""
    if not (a == f32x8 and b == f32x8 and c == f32x8):
        return None

    def codegen(context, builder, sig, args):
        return _vfma_ir(builder, args[0], args[1], args[2])

    return f32x8(a, b, c), codegen


def _pow2_v8(b, n):
    """2.0**n for int32 lanes n in [-126, 127] (exponent bits)."""
    e = b.shl(b.add(n, ir.Constant(_I32x8, [127] * 8)), ir.Constant(_I32x8, [23] * 8))
    return b.bitcast(e, _V8)


@intrinsic
def vsafe_max(typingctx, m):
    """The running maximum to subtract: m, or 0 where m is -inf (every logit
    so far masked), so that exp(-inf - m) is 0 and not exp(NaN)."""
    if m != f32x8:
        return None

    def codegen(context, builder, sig, args):
        b = builder
        return b.select(b.fcmp_ordered("==", args[0], _vconst(-np.inf)), _vconst(0.0), args[0])

    return f32x8(m), codegen


@intrinsic
def vexp(typingctx, x):
    """exp of 8 lanes, as ``_exp_f32`` (Cody-Waite + Cephes polynomial, FMAs):
    subnormal results included, 0 below -104, NaN stays NaN."""
    if x != f32x8:
        return None

    def codegen(context, builder, sig, args):
        b = builder
        x = args[0]
        lo = _vconst(_F32_LO)
        xc = b.select(b.fcmp_ordered(">", x, lo), x, lo)
        floor = cgutils.get_or_insert_function(b.module, ir.FunctionType(_V8, [_V8]), "llvm.floor.v8f32")
        n = b.call(floor, [_vfma_ir(b, xc, _vconst(_F32_LOG2E), _vconst(_F32_HALF))])
        r = _vfma_ir(b, n, _vconst(-_F32_C1), xc)
        r = _vfma_ir(b, n, _vconst(-_F32_C2), r)
        z = b.fmul(r, r)
        p = _vconst(_F32_P0)
        for c in (_F32_P1, _F32_P2, _F32_P3, _F32_P4, _F32_P5):
            p = _vfma_ir(b, p, r, _vconst(c))
        p = b.fadd(_vfma_ir(b, p, z, r), _vconst(1.0))
        # 2**n as two normal factors 2**n1 * 2**(n - n1), n1 = floor(n / 2):
        # subnormal results round once instead of wrapping the exponent bits.
        ni = b.fptosi(n, _I32x8)
        n1 = b.ashr(ni, ir.Constant(_I32x8, [1] * 8))
        y = b.fmul(b.fmul(p, _pow2_v8(b, n1)), _pow2_v8(b, b.sub(ni, n1)))
        inner = b.select(b.fcmp_ordered("<", x, lo), _vconst(0.0), x)
        return b.select(b.fcmp_ordered(">=", x, lo), y, inner)

    return f32x8(x), codegen


_VQ = 16  # queries per micro-kernel (two vectors); tiles are padded to this


@njit(fastmath=_FASTMATH, inline="always")
def _dot4(kb, r0, d, xT, nq, io, io1, zero):
    """kb[r0 + a] . xT[:, i] for keys a < 4 and the 16 queries io..io+7,
    io1..io1+7 (kb rows of d values, xT flat with row stride nq): eight 8-lane
    accumulators from ``zero``, key by key two vectors, four keys x two query
    vectors per pass over the channels."""
    a0 = zero
    a1 = zero
    b0 = zero
    b1 = zero
    c0 = zero
    c1 = zero
    e0 = zero
    e1 = zero
    for c in range(d):
        x0 = vload(xT, c * nq + io)
        x1 = vload(xT, c * nq + io1)
        t = vbcast(kb[r0 * d + c])
        a0 = vfma(t, x0, a0)
        a1 = vfma(t, x1, a1)
        t = vbcast(kb[(r0 + 1) * d + c])
        b0 = vfma(t, x0, b0)
        b1 = vfma(t, x1, b1)
        t = vbcast(kb[(r0 + 2) * d + c])
        c0 = vfma(t, x0, c0)
        c1 = vfma(t, x1, c1)
        t = vbcast(kb[(r0 + 3) * d + c])
        e0 = vfma(t, x0, e0)
        e1 = vfma(t, x1, e1)
    return a0, a1, b0, b1, c0, c1, e0, e1


@njit(fastmath=_FASTMATH, inline="always")
def _dot1(kb, r0, d, xT, nq, io, io1, zero):
    """``_dot4`` for one key: kb[r0] . xT[:, i], two 8-lane accumulators."""
    a0 = zero
    a1 = zero
    for c in range(d):
        t = vbcast(kb[r0 * d + c])
        a0 = vfma(t, vload(xT, c * nq + io), a0)
        a1 = vfma(t, vload(xT, c * nq + io1), a1)
    return a0, a1


@njit(fastmath=_FASTMATH)
def _qk16(kb, j0, nk, d, qT, nq, io, sT, rhT, rwT, kyo, kxo, m):
    """For queries io..io+15: sT[j, i] = bias(j0 + j, i) + kb[j0 + j] . qT[:, i]
    (flat arrays, row stride nq) and m[i] = max(m[i], max_j sT[j, i]).
    Four keys x two query vectors per pass over the channels."""
    io1 = io + 8
    mx0 = vload(m, io)
    mx1 = vload(m, io1)
    nk4 = nk - nk % 4
    zero = vbcast(np.float32(0.0))
    for j in range(0, nk4, 4):
        # q.k accumulates from zero and the bias is added once at the end, in
        # SAM's order (scale q.k + rel_h) + rel_w: rounding then scales with the
        # dot product alone, not with the bias carried through the whole chain.
        a0, a1, b0, b1, c0, c1, e0, e1 = _dot4(kb, j0 + j, d, qT, nq, io, io1, zero)
        h = kyo[j]
        w = kxo[j]
        a0 = vadd(vadd(a0, vload(rhT, h + io)), vload(rwT, w + io))
        a1 = vadd(vadd(a1, vload(rhT, h + io1)), vload(rwT, w + io1))
        h = kyo[j + 1]
        w = kxo[j + 1]
        b0 = vadd(vadd(b0, vload(rhT, h + io)), vload(rwT, w + io))
        b1 = vadd(vadd(b1, vload(rhT, h + io1)), vload(rwT, w + io1))
        h = kyo[j + 2]
        w = kxo[j + 2]
        c0 = vadd(vadd(c0, vload(rhT, h + io)), vload(rwT, w + io))
        c1 = vadd(vadd(c1, vload(rhT, h + io1)), vload(rwT, w + io1))
        h = kyo[j + 3]
        w = kxo[j + 3]
        e0 = vadd(vadd(e0, vload(rhT, h + io)), vload(rwT, w + io))
        e1 = vadd(vadd(e1, vload(rhT, h + io1)), vload(rwT, w + io1))
        s = j * nq + io
        vstore(sT, s, a0)
        vstore(sT, s + 8, a1)
        vstore(sT, s + nq, b0)
        vstore(sT, s + nq + 8, b1)
        vstore(sT, s + 2 * nq, c0)
        vstore(sT, s + 2 * nq + 8, c1)
        vstore(sT, s + 3 * nq, e0)
        vstore(sT, s + 3 * nq + 8, e1)
        mx0 = vmax(a0, mx0)
        mx1 = vmax(a1, mx1)
        mx0 = vmax(b0, mx0)
        mx1 = vmax(b1, mx1)
        mx0 = vmax(c0, mx0)
        mx1 = vmax(c1, mx1)
        mx0 = vmax(e0, mx0)
        mx1 = vmax(e1, mx1)
    for j in range(nk4, nk):
        a0, a1 = _dot1(kb, j0 + j, d, qT, nq, io, io1, zero)
        h = kyo[j]
        w = kxo[j]
        a0 = vadd(vadd(a0, vload(rhT, h + io)), vload(rwT, w + io))
        a1 = vadd(vadd(a1, vload(rhT, h + io1)), vload(rwT, w + io1))
        vstore(sT, j * nq + io, a0)
        vstore(sT, j * nq + io1, a1)
        mx0 = vmax(a0, mx0)
        mx1 = vmax(a1, mx1)
    vstore(m, io, mx0)
    vstore(m, io1, mx1)


@njit(fastmath=_FASTMATH)
def _softmax8(sT, nk, nq, io, m, alpha, lsum):
    """Queries io..io+7: sT[j, i] = exp(sT[j, i] - m[i]); alpha (old running
    max on entry) becomes exp(old - new); lsum = lsum * alpha + sum_j (the
    tile's sum first: two-level summation)."""
    mv = vsafe_max(vload(m, io))
    al = vexp(vsub(vload(alpha, io), mv))
    vstore(alpha, io, al)
    t0 = vzero()
    t1 = vzero()
    nk2 = nk - nk % 2
    for j in range(0, nk2, 2):
        s = j * nq + io
        p0 = vexp(vsub(vload(sT, s), mv))
        p1 = vexp(vsub(vload(sT, s + nq), mv))
        vstore(sT, s, p0)
        vstore(sT, s + nq, p1)
        t0 = vadd(t0, p0)
        t1 = vadd(t1, p1)
    if nk2 < nk:
        s = nk2 * nq + io
        p0 = vexp(vsub(vload(sT, s), mv))
        vstore(sT, s, p0)
        t0 = vadd(t0, p0)
    vstore(lsum, io, vfma(vload(lsum, io), al, vadd(t0, t1)))


@njit(fastmath=_FASTMATH)
def _pv16(vb, j0, nk, pT, nq, io, d, oT, alpha):
    """Queries io..io+15: oT[c, i] = oT[c, i] * alpha[i] + sum_j vb[j0 + j, c] pT[j, i]
    (the tile's sum in registers first: two-level summation).  Four channels
    x two query vectors per pass over the keys."""
    io1 = io + 8
    al0 = vload(alpha, io)
    al1 = vload(alpha, io1)
    d4 = d - d % 4
    for c in range(0, d4, 4):
        a0 = vzero()
        a1 = vzero()
        b0 = vzero()
        b1 = vzero()
        c0 = vzero()
        c1 = vzero()
        e0 = vzero()
        e1 = vzero()
        for j in range(nk):
            x0 = vload(pT, j * nq + io)
            x1 = vload(pT, j * nq + io1)
            r = j0 + j
            t = vbcast(vb[r * d + c])
            a0 = vfma(t, x0, a0)
            a1 = vfma(t, x1, a1)
            t = vbcast(vb[r * d + c + 1])
            b0 = vfma(t, x0, b0)
            b1 = vfma(t, x1, b1)
            t = vbcast(vb[r * d + c + 2])
            c0 = vfma(t, x0, c0)
            c1 = vfma(t, x1, c1)
            t = vbcast(vb[r * d + c + 3])
            e0 = vfma(t, x0, e0)
            e1 = vfma(t, x1, e1)
        o = c * nq + io
        vstore(oT, o, vfma(vload(oT, o), al0, a0))
        vstore(oT, o + 8, vfma(vload(oT, o + 8), al1, a1))
        o += nq
        vstore(oT, o, vfma(vload(oT, o), al0, b0))
        vstore(oT, o + 8, vfma(vload(oT, o + 8), al1, b1))
        o += nq
        vstore(oT, o, vfma(vload(oT, o), al0, c0))
        vstore(oT, o + 8, vfma(vload(oT, o + 8), al1, c1))
        o += nq
        vstore(oT, o, vfma(vload(oT, o), al0, e0))
        vstore(oT, o + 8, vfma(vload(oT, o + 8), al1, e1))
    for c in range(d4, d):
        a0 = vzero()
        a1 = vzero()
        for j in range(nk):
            t = vbcast(vb[(j0 + j) * d + c])
            a0 = vfma(t, vload(pT, j * nq + io), a0)
            a1 = vfma(t, vload(pT, j * nq + io1), a1)
        o = c * nq + io
        vstore(oT, o, vfma(vload(oT, o), al0, a0))
        vstore(oT, o + 8, vfma(vload(oT, o + 8), al1, a1))


@njit(cache=_CACHE, parallel=True, fastmath=_FASTMATH)
def _attention_fwd_f32(q, k, v, rel_h, rel_w, has_rel, k_w, scale, tq, tk, out, nonfinite):
    """float32 version of ``_attention_fwd_generic`` on 8-lane vectors; the
    query tile is padded to a multiple of 16 lanes (zero q and bias)."""
    BH, Sq, d = q.shape
    Sk = k.shape[1]
    dt = q.dtype
    sc = scale
    nqt = (Sq + tq - 1) // tq
    n_items = BH * nqt
    k_h = Sk // k_w if k_w > 0 else 0
    for it in prange(n_items):
        bh = it // nqt
        qt = it - bh * nqt
        i0 = qt * tq
        nq0 = min(tq, Sq - i0)
        nq = (nq0 + _VQ - 1) // _VQ * _VQ
        qb = q[bh]
        kb = k[bh]
        vb = v[bh]
        qT = np.zeros(d * nq, dtype=dt)
        for i in range(nq0):
            for c in range(d):
                qT[c * nq + i] = qb[i0 + i, c] * sc
        m = np.full(nq, -np.inf, dtype=dt)
        alpha = np.empty(nq, dtype=dt)
        lsum = np.zeros(nq, dtype=dt)
        oT = np.zeros(d * nq, dtype=dt)
        sT = np.empty(tk * nq, dtype=dt)
        kyo = np.empty(tk, dtype=np.int64)
        kxo = np.empty(tk, dtype=np.int64)
        if has_rel:
            rhT = np.zeros(k_h * nq, dtype=dt)
            rwT = np.zeros(k_w * nq, dtype=dt)
            for i in range(nq0):
                for a in range(k_h):
                    rhT[a * nq + i] = rel_h[bh, i0 + i, a]
                for a in range(k_w):
                    rwT[a * nq + i] = rel_w[bh, i0 + i, a]
        else:
            rhT = np.zeros(nq, dtype=dt)
            rwT = np.zeros(nq, dtype=dt)
        pk = aptr(kb)
        pv = aptr(vb)
        pq = aptr(qT)
        ps = aptr(sT)
        prh = aptr(rhT)
        prw = aptr(rwT)
        pky = aptr(kyo)
        pkx = aptr(kxo)
        pm = aptr(m)
        pal = aptr(alpha)
        pl = aptr(lsum)
        po = aptr(oT)
        for j0 in range(0, Sk, tk):
            nk = min(tk, Sk - j0)
            if has_rel:
                ky = j0 // k_w
                kx = j0 - ky * k_w
                for j in range(nk):
                    kyo[j] = ky * nq
                    kxo[j] = kx * nq
                    kx += 1
                    if kx == k_w:
                        kx = 0
                        ky += 1
            else:
                for j in range(nk):
                    kyo[j] = 0
                    kxo[j] = 0
            for i in range(nq):
                alpha[i] = m[i]  # old running max
            for io in range(0, nq, _VQ):
                _qk16(pk, j0, nk, d, pq, nq, io, ps, prh, prw, pky, pkx, pm)
            for io in range(0, nq, 8):
                _softmax8(ps, nk, nq, io, pm, pal, pl)
            for io in range(0, nq, _VQ):
                _pv16(pv, j0, nk, ps, nq, io, d, po, pal)
        for i in range(nq):
            lsum[i] = 1 / lsum[i]
        ob = out[bh]
        for i in range(nq0):
            li = lsum[i]
            orow = ob[i0 + i]
            zero = li - li  # NaN when li is
            for c in range(d):
                x = oT[c * nq + i] * li
                orow[c] = x
                zero += x * 0  # stays 0 while every x is finite
            nonfinite[bh, i0 + i] = zero != 0
        # Keep every buffer reached only through a raw pointer alive to here:
        # numba frees an array after its last use *as an array*, and another
        # thread's allocation could then reuse memory the pointers still read.
        _keepalive(qT, sT, rhT, rwT, kyo, kxo, kb, vb)


@njit(inline="never")
def _keepalive(*arrays):
    return len(arrays)


def _serial(kernel):
    """``kernel`` compiled without ``parallel``: its ``prange`` runs as a plain
    loop in the calling thread.  For a process forked after the threading
    layer started (GNU OpenMP's thread pool does not survive a fork).  A copy
    of the function under its own name, so that numba's on-disk cache (keyed
    by name, not by compile flags) keeps the two apart."""
    fn = kernel.py_func
    name = fn.__name__ + "_serial"
    code = fn.__code__.replace(co_name=name, co_qualname=name) if hasattr(fn.__code__, "co_qualname") \
        else fn.__code__.replace(co_name=name)
    copy = types_module.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = name
    copy.__doc__ = fn.__doc__
    return njit(cache=_CACHE, fastmath=_FASTMATH)(copy)


_serial_kernels: dict = {}


def attention_fwd(q, k, v, rel_h, rel_w, has_rel, k_w, scale, tq, tk, out, nonfinite, serial=False):
    """Flash-style attention with decomposed relative-position bias (see
    ``_attention_fwd_generic`` for the arguments); float32 takes the
    vector kernel, ``serial`` the kernels compiled without threads."""
    kernel = _attention_fwd_f32 if q.dtype == np.float32 else _attention_fwd_generic
    if serial:
        kernel = _serial_kernels.get(kernel) or _serial_kernels.setdefault(kernel, _serial(kernel))
    kernel(q, k, v, rel_h, rel_w, has_rel, k_w, scale, tq, tk, out, nonfinite)
