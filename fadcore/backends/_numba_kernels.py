"""Jitted half of the numba backend: the opcode table, the op kernels and the interpreter.

:mod:`fadcore.backends.numba_backend` lowers a graph to a flat *tape* (one row of integer
fields per instruction) over *buffers*; this module runs it. Everything here is
``@njit(cache=True)`` and closes over nothing but module-level integer constants, so the
compiled code is cached on disk and reused by later processes.

Data model (see ``docs/performance.md``): every value lives in float64 slots, whatever its
fadcore dtype (f32 results are rounded to float32 after each instruction, ints and bools are
exact small integers). A buffer is located by an absolute address, resolved per instruction:

* kind ``K_FIXED``: one address for everyone (server values, values equal on every client,
  literals, server arguments);
* kind ``K_WORK``: an offset in the running chunk's scratch workspace (client temporaries);
* kind ``K_CLIENT``: one address per client from the table ``ctab`` (client arguments, read
  in place, and client values kept across stages or returned).

Shapes are static except for the ragged dimension, stored as ``-1`` and resolved per client
to its row count ``r``. Kernels report bad data (an out-of-range index, an empty max) through
a status code and the ``err`` row, never by raising inside jitted code.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic

# --------------------------------------------------------------------------- opcode table
# One table for the whole backend: numba_backend.OPCODES maps primitive names to these.
# Elementwise unary ops first (OP_NEG..OP_ABS), then binary ones (OP_ADD..OP_NE): the
# interpreter dispatches on these ranges before the if/elif chain.

OP_NEG = 0
OP_EXP = 1
OP_LOG = 2
OP_LOG1P = 3
OP_EXPM1 = 4
OP_SQRT = 5
OP_TANH = 6
OP_LOGISTIC = 7
OP_SIN = 8
OP_COS = 9
OP_SIGN = 10
OP_ABS = 11
OP_ADD = 12
OP_SUB = 13
OP_MUL = 14
OP_DIV = 15
OP_POW = 16
OP_MAX = 17
OP_MIN = 18
OP_LOGADDEXP = 19
OP_LT = 20
OP_LE = 21
OP_GT = 22
OP_GE = 23
OP_EQ = 24
OP_NE = 25
OP_SELECT = 26
OP_CONVERT = 27
OP_ZEROS = 28
OP_REDUCE_SUM = 29
OP_REDUCE_MAX = 30
OP_ARGMAX = 31
OP_BROADCAST_IN_DIM = 32
OP_TRANSPOSE = 33
OP_MATMUL = 34
OP_MATVEC = 35
OP_VECMAT = 36
OP_VDOT = 37
OP_OUTER = 38
OP_SLICE = 39
OP_PAD = 40
OP_CONCATENATE = 41
OP_TAKE = 42
OP_UNTAKE = 43
OP_TAKE_ALONG_AXIS = 44
OP_UNTAKE_ALONG_AXIS = 45
OP_ONE_HOT = 46
OP_ROWS = 47
OP_NUM_CLIENTS = 48
OP_AGGREGATE = 49      # client side of sum/secure_sum/mean/weighted_mean: add into the chunk's row
OP_FINISH = 50         # server side: combine the chunks' rows
OP_COPY = 51

OPCODE_NAMES = (
    "neg", "exp", "log", "log1p", "expm1", "sqrt", "tanh", "logistic", "sin", "cos", "sign",
    "abs", "add", "sub", "mul", "div", "pow", "max", "min", "logaddexp", "lt", "le", "gt", "ge",
    "eq", "ne", "select", "convert", "zeros_like", "reduce_sum", "reduce_max", "argmax",
    "broadcast_in_dim", "transpose", "matmul", "matvec", "vecmat", "vdot", "outer", "slice",
    "pad", "concatenate", "take", "untake", "take_along_axis", "untake_along_axis", "one_hot",
    "rows", "num_clients", "aggregate", "finish", "copy",
)

# convert modes
CV_COPY = 0        # int/bool -> float, float -> float (f32 rounding is the instruction flag)
CV_TRUNC = 1       # float -> int: truncate toward zero, as ndarray.astype
CV_NONZERO = 2     # anything -> bool

# aggregation modes
AG_SUM = 0
AG_MEAN = 1
AG_WMEAN = 2

# tape fields
F_OP = 0
F_OUT = 1
F_A = 2
F_B = 3
F_C = 4
F_IP = 5           # offset of the instruction's integer params in ``ip``
F_FLAGS = 6        # bit 0: round the result to float32
F_NO = 7           # result size: static part and number of ragged dims (size = NO * r**KO)
F_KO = 8
F_NA = 9
F_KA = 10
F_NB = 11
F_KB = 12
F_NC = 13
F_KC = 14
NFIELDS = 16

K_FIXED = 0
K_WORK = 1
K_CLIENT = 2

# status codes (err row: code, instruction, client, value, bound)
E_OK = 0
E_INDEX = 1        # an index outside [-dim, dim)
E_EMPTY = 2        # max/argmax of an empty (zero-row) value

SCRATCH = 256      # ints of per-chunk scratch for shapes and odometers
MAX_NDIM = 8
SMALL_DOT = 2048   # below this many multiply-adds, plain loops beat a BLAS call
LOGE2 = 0.693147180559945309417232121458176568


# --------------------------------------------------------------------------- raw views

@intrinsic
def _fptr(typingctx, addr):
    """int64 address -> float64* (the caller guarantees it points at live float64 data)."""
    sig = types.CPointer(types.float64)(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.float64)))
    return sig, codegen


@intrinsic
def _iptr(typingctx, addr):
    """int64 address -> int64*."""
    sig = types.CPointer(types.int64)(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int64)))
    return sig, codegen


@intrinsic
def _i32ptr(typingctx, addr):
    """int64 address -> int32*."""
    sig = types.CPointer(types.int32)(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int32)))
    return sig, codegen


@njit(cache=True)
def array_fields(ids, nd, dims, out):
    """Read CPython ndarray structs (``id(a)``): data address, ndim, shape, flags, descr.

    ``out[i] = (data, ndim, flags, descr, d0, d1, ...)``: the zero-copy path reads client
    arguments in place and checks their shapes here, without a Python loop over members.
    Layout of PyArrayObject_fields: head 16 bytes, data, nd (int), dimensions, strides, base,
    descr, flags (int). Checked against ``ndarray.ctypes`` at import (``fields_layout_ok``).
    """
    for i in range(ids.shape[0]):
        base = ids[i]
        out[i, 0] = _iptr(base + 16)[0]
        k = _i32ptr(base + 24)[0]
        out[i, 1] = k
        out[i, 2] = _i32ptr(base + 64)[0]
        out[i, 3] = _iptr(base + 56)[0]
        if k == nd:
            dp = _iptr(base + 32)[0]
            for j in range(nd):
                dims[i, j] = _iptr(dp + 8 * j)[0]


@njit(inline="always")
def _addr(b, kind, loc, ctab, i, wbase):
    k = kind[b]
    if k == K_FIXED:
        return loc[b]
    if k == K_WORK:
        return wbase + loc[b]
    return ctab[loc[b], i]


@njit(inline="always")
def _cnt(st, k, r):
    c = st
    for _ in range(k):
        c *= r
    return c


@njit(inline="always")
def _dim(d, r):
    return r if d < 0 else d


# --------------------------------------------------------------------------- elementwise

@njit(inline="always")
def _uop(op, x):
    if op == OP_NEG:
        return -x
    elif op == OP_EXP:
        return np.exp(x)
    elif op == OP_LOG:
        return np.log(x)
    elif op == OP_LOG1P:
        return np.log1p(x)
    elif op == OP_EXPM1:
        return np.expm1(x)
    elif op == OP_SQRT:
        return np.sqrt(x)
    elif op == OP_TANH:
        return np.tanh(x)
    elif op == OP_LOGISTIC:
        e = np.exp(-abs(x))
        return 1.0 / (1.0 + e) if x >= 0 else e / (1.0 + e)
    elif op == OP_SIN:
        return np.sin(x)
    elif op == OP_COS:
        return np.cos(x)
    elif op == OP_SIGN:
        if x > 0:
            return 1.0
        if x < 0:
            return -1.0
        if x == 0:
            return 0.0
        return x
    else:
        return abs(x)


@njit(cache=True, error_model="numpy")
def _unary(op, x, o, n):
    if op == OP_NEG:
        for j in range(n):
            o[j] = -x[j]
    elif op == OP_EXP:
        for j in range(n):
            o[j] = np.exp(x[j])
    else:
        for j in range(n):
            o[j] = _uop(op, x[j])


@njit(inline="always")
def _bop(op, a, b):
    if op == OP_ADD:
        return a + b
    elif op == OP_SUB:
        return a - b
    elif op == OP_MUL:
        return a * b
    elif op == OP_DIV:
        return a / b
    elif op == OP_POW:
        return a ** b
    elif op == OP_MAX:
        return a if (a >= b or a != a) else b
    elif op == OP_MIN:
        return a if (a <= b or a != a) else b
    elif op == OP_LOGADDEXP:
        if a == b:
            return a + LOGE2
        d = a - b
        if d > 0:
            return a + np.log1p(np.exp(-d))
        elif d <= 0:
            return b + np.log1p(np.exp(d))
        return d
    elif op == OP_LT:
        return 1.0 if a < b else 0.0
    elif op == OP_LE:
        return 1.0 if a <= b else 0.0
    elif op == OP_GT:
        return 1.0 if a > b else 0.0
    elif op == OP_GE:
        return 1.0 if a >= b else 0.0
    elif op == OP_EQ:
        return 1.0 if a == b else 0.0
    else:
        return 1.0 if a != b else 0.0


@njit(cache=True, error_model="numpy")
def _binary(op, x, y, o, n, nx, ny):
    """o = x op y; an operand of size 1 beside a larger result is a broadcast scalar."""
    if nx == n and ny == n:
        if op == OP_ADD:
            for j in range(n):
                o[j] = x[j] + y[j]
        elif op == OP_SUB:
            for j in range(n):
                o[j] = x[j] - y[j]
        elif op == OP_MUL:
            for j in range(n):
                o[j] = x[j] * y[j]
        elif op == OP_DIV:
            for j in range(n):
                o[j] = x[j] / y[j]
        else:
            for j in range(n):
                o[j] = _bop(op, x[j], y[j])
    elif nx == n:
        b = y[0]
        if op == OP_ADD:
            for j in range(n):
                o[j] = x[j] + b
        elif op == OP_SUB:
            for j in range(n):
                o[j] = x[j] - b
        elif op == OP_MUL:
            for j in range(n):
                o[j] = x[j] * b
        elif op == OP_DIV:
            for j in range(n):
                o[j] = x[j] / b
        else:
            for j in range(n):
                o[j] = _bop(op, x[j], b)
    else:
        a = x[0]
        if op == OP_ADD:
            for j in range(n):
                o[j] = a + y[j]
        elif op == OP_SUB:
            for j in range(n):
                o[j] = a - y[j]
        elif op == OP_MUL:
            for j in range(n):
                o[j] = a * y[j]
        elif op == OP_DIV:
            for j in range(n):
                o[j] = a / y[j]
        else:
            for j in range(n):
                o[j] = _bop(op, a, y[j])


@njit(cache=True, error_model="numpy")
def _select(p, x, y, o, n, npr, nx, ny):
    sp = 1 if npr == n else 0
    sx = 1 if nx == n else 0
    sy = 1 if ny == n else 0
    for j in range(n):
        o[j] = x[j * sx] if p[j * sp] != 0.0 else y[j * sy]


@njit(cache=True, error_model="numpy")
def _convert(mode, x, o, n):
    if mode == CV_TRUNC:
        for j in range(n):
            o[j] = np.trunc(x[j])
    elif mode == CV_NONZERO:
        for j in range(n):
            o[j] = 1.0 if x[j] != 0.0 else 0.0
    else:
        for j in range(n):
            o[j] = x[j]


# --------------------------------------------------------------------------- reductions

@njit(cache=True, error_model="numpy")
def pairwise_sum(a, lo, n, s):
    """NumPy's pairwise summation of a[lo], a[lo+s], ... (n terms): bit-identical to np.sum."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i * s]
        return res
    if n <= 128:
        r0 = a[lo]
        r1 = a[lo + s]
        r2 = a[lo + 2 * s]
        r3 = a[lo + 3 * s]
        r4 = a[lo + 4 * s]
        r5 = a[lo + 5 * s]
        r6 = a[lo + 6 * s]
        r7 = a[lo + 7 * s]
        m = n - n % 8
        i = 8
        while i < m:
            p = lo + i * s
            r0 += a[p]
            r1 += a[p + s]
            r2 += a[p + 2 * s]
            r3 += a[p + 3 * s]
            r4 += a[p + 4 * s]
            r5 += a[p + 5 * s]
            r6 += a[p + 6 * s]
            r7 += a[p + 7 * s]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += a[lo + i * s]
            i += 1
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return pairwise_sum(a, lo, n2, s) + pairwise_sum(a, lo + n2 * s, n - n2, s)


@njit(inline="always")
def _max_into(m, v):
    return v if (v > m or v != v) else m


@njit(cache=True, error_model="numpy")
def _reduce(is_max, x, o, nd, dims, mask, sc):
    """Sum or max of x (shape dims, C order) over the axes where mask is 1.

    Adjacent axes of one kind are merged first; the common layouts (all, rows of a matrix,
    columns of a matrix, the middle of three groups) get direct loops with NumPy's summation
    order, anything else a generic odometer. Returns E_EMPTY for a max over nothing.
    """
    # merge: groups of (size, reduced) with size-1 axes dropped
    ng = 0
    total = 1
    for a in range(nd):
        d = dims[a]
        total *= d
        if d == 1:
            continue
        if ng > 0 and sc[2 * (ng - 1) + 1] == mask[a]:
            sc[2 * (ng - 1)] *= d
        else:
            sc[2 * ng] = d
            sc[2 * ng + 1] = mask[a]
            ng += 1
    nout = 1
    for a in range(nd):
        if mask[a] == 0:
            nout *= dims[a]
    if total == 0:
        if nout == 0:
            return E_OK
        if is_max:
            return E_EMPTY
        for j in range(nout):
            o[j] = 0.0
        return E_OK
    if ng == 0 or (ng == 1 and sc[1] == 0):
        for j in range(nout):
            o[j] = x[j]
        return E_OK
    if ng == 1:                                   # everything
        if is_max:
            m = x[0]
            for j in range(1, total):
                m = _max_into(m, x[j])
            o[0] = m
        else:
            o[0] = pairwise_sum(x, 0, total, 1)
        return E_OK
    if ng == 2 and sc[1] == 0:                    # [kept, reduced]: each row
        K = sc[0]
        R = sc[2]
        for k in range(K):
            if is_max:
                m = x[k * R]
                for j in range(1, R):
                    m = _max_into(m, x[k * R + j])
                o[k] = m
            else:
                o[k] = pairwise_sum(x, k * R, R, 1)
        return E_OK
    if ng == 2 or (ng == 3 and sc[1] == 0):       # [reduced, kept] or [kept, reduced, kept]
        if ng == 2:
            K0 = 1
            R = sc[0]
            K1 = sc[2]
        else:
            K0 = sc[0]
            R = sc[2]
            K1 = sc[4]
        for k in range(K0):
            base = k * R * K1
            ob = k * K1
            for j in range(K1):
                o[ob + j] = x[base + j]
            for i in range(1, R):
                p = base + i * K1
                if is_max:
                    for j in range(K1):
                        o[ob + j] = _max_into(o[ob + j], x[p + j])
                else:
                    for j in range(K1):
                        o[ob + j] += x[p + j]
        if not is_max:
            # NumPy starts from 0.0, not from the first row: same value except for -0.0
            for j in range(K0 * K1):
                o[j] = o[j] + 0.0
        return E_OK
    # generic: odometer over x, output index by strides of the kept axes
    ostr = sc[32:32 + MAX_NDIM]
    idx = sc[48:48 + MAX_NDIM]
    s = 1
    for a in range(nd - 1, -1, -1):
        if mask[a] == 0:
            ostr[a] = s
            s *= dims[a]
        else:
            ostr[a] = 0
        idx[a] = 0
    first = np.zeros(nout, dtype=np.bool_)
    for j in range(nout):
        o[j] = 0.0
    oi = 0
    for t in range(total):
        v = x[t]
        if is_max:
            if not first[oi]:
                o[oi] = v
                first[oi] = True
            else:
                o[oi] = _max_into(o[oi], v)
        else:
            o[oi] += v
        a = nd - 1
        while a >= 0:
            idx[a] += 1
            oi += ostr[a]
            if idx[a] < dims[a]:
                break
            oi -= ostr[a] * dims[a]
            idx[a] = 0
            a -= 1
    return E_OK


@njit(cache=True, error_model="numpy")
def _argmax(x, o, outer, D, inner):
    if D == 0 and outer * inner > 0:
        return E_EMPTY
    for k in range(outer):
        for j in range(inner):
            base = k * D * inner + j
            best = x[base]
            bi = 0
            if best == best:
                for d in range(1, D):
                    v = x[base + d * inner]
                    if v > best or v != v:
                        best = v
                        bi = d
                        if v != v:
                            break
            o[k * inner + j] = bi
    return E_OK


# --------------------------------------------------------------------------- data movement

@njit(cache=True, error_model="numpy")
def _copy_nd(src, soff, sstr, dst, doff, dstr, shape, nd, idx):
    """dst[doff + sum i_a dstr_a] = src[soff + sum i_a sstr_a] over the index box ``shape``."""
    if nd == 0:
        dst[doff] = src[soff]
        return
    for a in range(nd):
        if shape[a] == 0:
            return
        idx[a] = 0
    last = shape[nd - 1]
    ss = sstr[nd - 1]
    ds = dstr[nd - 1]
    sp = soff
    dp = doff
    while True:
        if ss == 1 and ds == 1:
            for j in range(last):
                dst[dp + j] = src[sp + j]
        elif ss == 0:
            v = src[sp]
            for j in range(last):
                dst[dp + j * ds] = v
        else:
            for j in range(last):
                dst[dp + j * ds] = src[sp + j * ss]
        a = nd - 2
        while a >= 0:
            idx[a] += 1
            sp += sstr[a]
            dp += dstr[a]
            if idx[a] < shape[a]:
                break
            sp -= sstr[a] * shape[a]
            dp -= dstr[a] * shape[a]
            idx[a] = 0
            a -= 1
        if a < 0:
            return


@njit(inline="always")
def _c_strides(shape, nd, out):
    s = 1
    for a in range(nd - 1, -1, -1):
        out[a] = s
        s *= shape[a]
    return s


@njit(inline="always")
def _index(v, D):
    """An index value as an int in [0, D), or -1 - (the bad value) when out of range."""
    k = np.int64(v)
    if k < 0:
        k += D
    if k < 0 or k >= D or k != v:
        return -1
    return k


@njit(cache=True, error_model="numpy")
def _take(x, idx, o, outer, D, inner, K, err):
    for kk in range(K):
        if _index(idx[kk], D) < 0:
            err[3] = np.int64(idx[kk]) if idx[kk] == idx[kk] else -(2 ** 62)
            err[4] = D
            return E_INDEX
    for k in range(outer):
        for kk in range(K):
            d = _index(idx[kk], D)
            sb = (k * D + d) * inner
            ob = (k * K + kk) * inner
            for j in range(inner):
                o[ob + j] = x[sb + j]
    return E_OK


@njit(cache=True, error_model="numpy")
def _untake(ct, idx, o, outer, D, inner, K, err):
    for kk in range(K):
        if _index(idx[kk], D) < 0:
            err[3] = np.int64(idx[kk]) if idx[kk] == idx[kk] else -(2 ** 62)
            err[4] = D
            return E_INDEX
    for j in range(outer * D * inner):
        o[j] = 0.0
    for k in range(outer):
        for kk in range(K):
            d = _index(idx[kk], D)
            ob = (k * D + d) * inner
            sb = (k * K + kk) * inner
            for j in range(inner):
                o[ob + j] += ct[sb + j]
    return E_OK


@njit(cache=True, error_model="numpy")
def _take_along(x, idx, o, outer, D, K, inner, scatter, err):
    """take_along_axis (scatter=False: o[k,q,j] = x[k,idx[k,q,j],j]) or its transpose
    (scatter=True: o[k,idx[k,q,j],j] += x[k,q,j], o of shape [outer, D, inner])."""
    n = outer * K * inner
    for t in range(n):
        if _index(idx[t], D) < 0:
            err[3] = np.int64(idx[t]) if idx[t] == idx[t] else -(2 ** 62)
            err[4] = D
            return E_INDEX
    if scatter:
        for t in range(outer * D * inner):
            o[t] = 0.0
    for k in range(outer):
        for q in range(K):
            b = (k * K + q) * inner
            for j in range(inner):
                d = _index(idx[b + j], D)
                if scatter:
                    o[(k * D + d) * inner + j] += x[b + j]
                else:
                    o[b + j] = x[(k * D + d) * inner + j]
    return E_OK


@njit(cache=True, error_model="numpy")
def _one_hot(lab, o, n, depth):
    for i in range(n):
        v = lab[i]
        for c in range(depth):
            o[i * depth + c] = 1.0 if v == c else 0.0


# --------------------------------------------------------------------------- products

@njit(cache=True, error_model="numpy")
def _matmul(pa, pb, po, m, k, n):
    """[m,k] @ [k,n] on raw addresses: BLAS for real work, loops for tiny products."""
    o = carray(_fptr(po), m * n)
    if m == 0 or n == 0:
        return
    if k == 0:
        for j in range(m * n):
            o[j] = 0.0
        return
    if m * k * n >= SMALL_DOT:
        np.dot(carray(_fptr(pa), (m, k)), carray(_fptr(pb), (k, n)), carray(_fptr(po), (m, n)))
        return
    a = carray(_fptr(pa), m * k)
    b = carray(_fptr(pb), k * n)
    for i in range(m):
        for j in range(n):
            o[i * n + j] = 0.0
        for q in range(k):
            v = a[i * k + q]
            for j in range(n):
                o[i * n + j] += v * b[q * n + j]


@njit(cache=True, error_model="numpy")
def _matvec(pa, px, po, m, k):
    o = carray(_fptr(po), m)
    if m == 0:
        return
    if k == 0:
        for j in range(m):
            o[j] = 0.0
        return
    if m * k >= SMALL_DOT:
        np.dot(carray(_fptr(pa), (m, k)), carray(_fptr(px), k), o)
        return
    a = carray(_fptr(pa), m * k)
    x = carray(_fptr(px), k)
    for i in range(m):
        s = 0.0
        for q in range(k):
            s += a[i * k + q] * x[q]
        o[i] = s


@njit(cache=True, error_model="numpy")
def _vecmat(px, pa, po, k, n):
    o = carray(_fptr(po), n)
    if n == 0:
        return
    if k == 0:
        for j in range(n):
            o[j] = 0.0
        return
    if k * n >= SMALL_DOT:
        np.dot(carray(_fptr(px), k), carray(_fptr(pa), (k, n)), o)
        return
    a = carray(_fptr(pa), k * n)
    x = carray(_fptr(px), k)
    for j in range(n):
        o[j] = 0.0
    for q in range(k):
        v = x[q]
        for j in range(n):
            o[j] += v * a[q * n + j]


@njit(cache=True, error_model="numpy")
def _vdot(pa, pb, po, k):
    o = carray(_fptr(po), 1)
    if k >= SMALL_DOT:
        o[0] = np.dot(carray(_fptr(pa), k), carray(_fptr(pb), k))
        return
    a = carray(_fptr(pa), k)
    b = carray(_fptr(pb), k)
    s = 0.0
    for q in range(k):
        s += a[q] * b[q]
    o[0] = s


# --------------------------------------------------------------------------- the interpreter

@njit(cache=True, error_model="numpy")
def _exec(tape, start, stop, ip, kind, loc, ctab, i, r, wbase, acc, crow, nchunks, n, sc, err):
    """Run tape rows [start, stop) for client ``i`` (-1: the server) with row count ``r``.

    ``acc`` is the accumulator block (one row per chunk of clients), ``crow`` the row of the
    running chunk. Returns a status code; on error ``err`` holds the details.
    """
    for t in range(start, stop):
        op = tape[t, F_OP]
        p = tape[t, F_IP]
        no = _cnt(tape[t, F_NO], tape[t, F_KO], r)
        if op == OP_AGGREGATE:
            # ip: mode, acc offset, [weight acc offset]
            mode = ip[p]
            off = ip[p + 1]
            x = carray(_fptr(_addr(tape[t, F_A], kind, loc, ctab, i, wbase)), no)
            if mode == AG_WMEAN:
                w = carray(_fptr(_addr(tape[t, F_B], kind, loc, ctab, i, wbase)), 1)[0]
                for j in range(no):
                    acc[crow, off + j] += w * x[j]
                acc[crow, ip[p + 2]] += w
            else:
                for j in range(no):
                    acc[crow, off + j] += x[j]
            continue
        o = carray(_fptr(_addr(tape[t, F_OUT], kind, loc, ctab, i, wbase)), no)
        if op <= OP_ABS:
            x = carray(_fptr(_addr(tape[t, F_A], kind, loc, ctab, i, wbase)), no)
            _unary(op, x, o, no)
        elif op <= OP_NE:
            na = _cnt(tape[t, F_NA], tape[t, F_KA], r)
            nb = _cnt(tape[t, F_NB], tape[t, F_KB], r)
            x = carray(_fptr(_addr(tape[t, F_A], kind, loc, ctab, i, wbase)), na)
            y = carray(_fptr(_addr(tape[t, F_B], kind, loc, ctab, i, wbase)), nb)
            _binary(op, x, y, o, no, na, nb)
        elif op == OP_SELECT:
            na = _cnt(tape[t, F_NA], tape[t, F_KA], r)
            nb = _cnt(tape[t, F_NB], tape[t, F_KB], r)
            nc = _cnt(tape[t, F_NC], tape[t, F_KC], r)
            c = carray(_fptr(_addr(tape[t, F_A], kind, loc, ctab, i, wbase)), na)
            x = carray(_fptr(_addr(tape[t, F_B], kind, loc, ctab, i, wbase)), nb)
            y = carray(_fptr(_addr(tape[t, F_C], kind, loc, ctab, i, wbase)), nc)
            _select(c, x, y, o, no, na, nb, nc)
        elif op == OP_CONVERT or op == OP_COPY:
            x = carray(_fptr(_addr(tape[t, F_A], kind, loc, ctab, i, wbase)), no)
            _convert(ip[p] if op == OP_CONVERT else CV_COPY, x, o, no)
        elif op == OP_ZEROS:
            for j in range(no):
                o[j] = 0.0
        elif op == OP_REDUCE_SUM or op == OP_REDUCE_MAX:
            # ip: nd, dims[nd], mask[nd]
            nd = ip[p]
            dims = sc[64:64 + MAX_NDIM]
            mask = sc[80:80 + MAX_NDIM]
            for a in range(nd):
                dims[a] = _dim(ip[p + 1 + a], r)
                mask[a] = ip[p + 1 + nd + a]
            na = _cnt(tape[t, F_NA], tape[t, F_KA], r)
            x = carray(_fptr(_addr(tape[t, F_A], kind, loc, ctab, i, wbase)), na)
            st = _reduce(op == OP_REDUCE_MAX, x, o, nd, dims, mask, sc)
            if st != E_OK:
                err[1] = t
                return st
        elif op == OP_ARGMAX:
            # ip: outer, D, inner as (static, ragged count) pairs
            na = _cnt(tape[t, F_NA], tape[t, F_KA], r)
            x = carray(_fptr(_addr(tape[t, F_A], kind, loc, ctab, i, wbase)), na)
            st = _argmax(x, o, _cnt(ip[p], ip[p + 1], r), _cnt(ip[p + 2], ip[p + 3], r),
                         _cnt(ip[p + 4], ip[p + 5], r))
            if st != E_OK:
                err[1] = t
                return st
        elif op == OP_BROADCAST_IN_DIM or op == OP_TRANSPOSE or op == OP_SLICE or op == OP_PAD:
            _move(op, tape, t, ip, p, kind, loc, ctab, i, wbase, r, o, no, sc)
        elif op == OP_CONCATENATE:
            # ip: nd, axis, out dims[nd], m, then per operand: buffer, dims[nd]
            nd = ip[p]
            axis = ip[p + 1]
            shp = sc[64:64 + MAX_NDIM]
            sstr = sc[80:80 + MAX_NDIM]
            dstr = sc[96:96 + MAX_NDIM]
            idx = sc[112:112 + MAX_NDIM]
            for a in range(nd):
                shp[a] = _dim(ip[p + 2 + a], r)
            _c_strides(shp, nd, dstr)
            m = ip[p + 2 + nd]
            q = p + 3 + nd
            start_ax = 0
            for u in range(m):
                b = ip[q]
                for a in range(nd):
                    shp[a] = _dim(ip[q + 1 + a], r)
                sz = _c_strides(shp, nd, sstr)
                x = carray(_fptr(_addr(b, kind, loc, ctab, i, wbase)), sz)
                _copy_nd(x, 0, sstr, o, start_ax * dstr[axis], dstr, shp, nd, idx)
                start_ax += shp[axis]
                q += 1 + nd
        elif op == OP_MATMUL:
            _matmul(_addr(tape[t, F_A], kind, loc, ctab, i, wbase),
                    _addr(tape[t, F_B], kind, loc, ctab, i, wbase),
                    _addr(tape[t, F_OUT], kind, loc, ctab, i, wbase),
                    _dim(ip[p], r), _dim(ip[p + 1], r), _dim(ip[p + 2], r))
        elif op == OP_MATVEC:
            _matvec(_addr(tape[t, F_A], kind, loc, ctab, i, wbase),
                    _addr(tape[t, F_B], kind, loc, ctab, i, wbase),
                    _addr(tape[t, F_OUT], kind, loc, ctab, i, wbase),
                    _dim(ip[p], r), _dim(ip[p + 1], r))
        elif op == OP_VECMAT:
            _vecmat(_addr(tape[t, F_A], kind, loc, ctab, i, wbase),
                    _addr(tape[t, F_B], kind, loc, ctab, i, wbase),
                    _addr(tape[t, F_OUT], kind, loc, ctab, i, wbase),
                    _dim(ip[p], r), _dim(ip[p + 1], r))
        elif op == OP_VDOT:
            _vdot(_addr(tape[t, F_A], kind, loc, ctab, i, wbase),
                  _addr(tape[t, F_B], kind, loc, ctab, i, wbase),
                  _addr(tape[t, F_OUT], kind, loc, ctab, i, wbase), _dim(ip[p], r))
        elif op == OP_OUTER:
            m = _dim(ip[p], r)
            k = _dim(ip[p + 1], r)
            x = carray(_fptr(_addr(tape[t, F_A], kind, loc, ctab, i, wbase)), m)
            y = carray(_fptr(_addr(tape[t, F_B], kind, loc, ctab, i, wbase)), k)
            for a in range(m):
                v = x[a]
                for j in range(k):
                    o[a * k + j] = v * y[j]
        elif op == OP_TAKE or op == OP_UNTAKE or op == OP_TAKE_ALONG_AXIS \
                or op == OP_UNTAKE_ALONG_AXIS:
            # ip: outer, D, inner, K as (static, ragged count) pairs; D is the gathered axis
            # of x (take) or of the result (untake), K the number of indices along it
            outer = _cnt(ip[p], ip[p + 1], r)
            D = _cnt(ip[p + 2], ip[p + 3], r)
            inner = _cnt(ip[p + 4], ip[p + 5], r)
            K = _cnt(ip[p + 6], ip[p + 7], r)
            na = _cnt(tape[t, F_NA], tape[t, F_KA], r)
            nb = _cnt(tape[t, F_NB], tape[t, F_KB], r)
            x = carray(_fptr(_addr(tape[t, F_A], kind, loc, ctab, i, wbase)), na)
            idx = carray(_fptr(_addr(tape[t, F_B], kind, loc, ctab, i, wbase)), nb)
            if op == OP_TAKE:
                st = _take(x, idx, o, outer, D, inner, K, err)
            elif op == OP_UNTAKE:
                st = _untake(x, idx, o, outer, D, inner, K, err)
            else:
                st = _take_along(x, idx, o, outer, D, K, inner, op == OP_UNTAKE_ALONG_AXIS, err)
            if st != E_OK:
                err[1] = t
                return st
        elif op == OP_ONE_HOT:
            na = _cnt(tape[t, F_NA], tape[t, F_KA], r)
            x = carray(_fptr(_addr(tape[t, F_A], kind, loc, ctab, i, wbase)), na)
            _one_hot(x, o, na, ip[p])
        elif op == OP_ROWS:
            o[0] = r
        elif op == OP_NUM_CLIENTS:
            o[0] = n
        elif op == OP_FINISH:
            # ip: mode, acc offset, [weight acc offset]; sum the chunk rows in order
            mode = ip[p]
            off = ip[p + 1]
            for j in range(no):
                s = 0.0
                for c in range(nchunks):
                    s += acc[c, off + j]
                o[j] = s
            if mode == AG_MEAN:
                for j in range(no):
                    o[j] = o[j] / n
            elif mode == AG_WMEAN:
                ws = 0.0
                for c in range(nchunks):
                    ws += acc[c, ip[p + 2]]
                for j in range(no):
                    o[j] = o[j] / ws
        if tape[t, F_FLAGS] & 1:
            for j in range(no):
                o[j] = np.float32(o[j])
    return E_OK


@njit(cache=True, error_model="numpy")
def _move(op, tape, t, ip, p, kind, loc, ctab, i, wbase, r, o, no, sc):
    """broadcast_in_dim, transpose, slice and pad: one strided copy each."""
    shp = sc[64:64 + MAX_NDIM]
    sstr = sc[80:80 + MAX_NDIM]
    dstr = sc[96:96 + MAX_NDIM]
    idx = sc[112:112 + MAX_NDIM]
    xs = sc[128:128 + MAX_NDIM]
    xstr = sc[144:144 + MAX_NDIM]
    na = _cnt(tape[t, F_NA], tape[t, F_KA], r)
    x = carray(_fptr(_addr(tape[t, F_A], kind, loc, ctab, i, wbase)), na)
    if op == OP_BROADCAST_IN_DIM:
        # ip: out nd, out dims, in nd, in dims, dims map
        nd = ip[p]
        for a in range(nd):
            shp[a] = _dim(ip[p + 1 + a], r)
            sstr[a] = 0
        q = p + 1 + nd
        xn = ip[q]
        for a in range(xn):
            xs[a] = _dim(ip[q + 1 + a], r)
        _c_strides(xs, xn, xstr)
        for a in range(xn):
            if xs[a] != 1:
                sstr[ip[q + 1 + xn + a]] = xstr[a]
        _c_strides(shp, nd, dstr)
        _copy_nd(x, 0, sstr, o, 0, dstr, shp, nd, idx)
    elif op == OP_TRANSPOSE:
        # ip: nd, in dims, perm
        nd = ip[p]
        for a in range(nd):
            xs[a] = _dim(ip[p + 1 + a], r)
        _c_strides(xs, nd, xstr)
        for a in range(nd):
            pa = ip[p + 1 + nd + a]
            shp[a] = xs[pa]
            sstr[a] = xstr[pa]
        _c_strides(shp, nd, dstr)
        _copy_nd(x, 0, sstr, o, 0, dstr, shp, nd, idx)
    else:
        # slice / pad; ip: nd, big dims (x for slice, result for pad), starts, limits, strides
        nd = ip[p]
        for a in range(nd):
            xs[a] = _dim(ip[p + 1 + a], r)
        _c_strides(xs, nd, xstr)
        off = 0
        for a in range(nd):
            s0 = ip[p + 1 + nd + a]
            lim = ip[p + 1 + 2 * nd + a]
            k = ip[p + 1 + 3 * nd + a]
            lim = xs[a] if lim < 0 else lim
            shp[a] = (lim - s0 + k - 1) // k if lim > s0 else 0
            off += s0 * xstr[a]
            xstr[a] *= k
        _c_strides(shp, nd, sstr)
        if op == OP_SLICE:
            _copy_nd(x, off, xstr, o, 0, sstr, shp, nd, idx)
        else:
            for j in range(no):
                o[j] = 0.0
            _copy_nd(x, 0, sstr, o, off, xstr, shp, nd, idx)


@njit(cache=True, parallel=True, error_model="numpy")
def run_program(tape, stages, ip, kind, loc, ctab, rows, n, nchunks, wsaddr, wsrow, acc, err):
    """Run a lowered program: per stage, its server rows once, then its client rows for every
    client, in a prange over ``nchunks`` contiguous chunks of clients (one workspace row and
    one accumulator row per chunk; clients run one after the other inside a chunk).

    ``stages[s] = (server start, server stop, client start, client stop)``. ``err`` has one
    row per chunk and a last row for the server; returns False on the first failing stage.
    """
    srv = err.shape[0] - 1
    for s in range(stages.shape[0]):
        sc = np.empty(SCRATCH, dtype=np.int64)
        st = _exec(tape, stages[s, 0], stages[s, 1], ip, kind, loc, ctab, -1, 0, 0, acc, 0,
                   nchunks, n, sc, err[srv])
        if st != E_OK:
            err[srv, 0] = st
            err[srv, 2] = -1
            return False
        c0 = stages[s, 2]
        c1 = stages[s, 3]
        if c1 <= c0:
            continue
        for c in prange(nchunks):
            scc = np.empty(SCRATCH, dtype=np.int64)
            wbase = wsaddr + c * wsrow
            for i in range((c * n) // nchunks, ((c + 1) * n) // nchunks):
                st = _exec(tape, c0, c1, ip, kind, loc, ctab, i, rows[i], wbase, acc, c,
                           nchunks, n, scc, err[c])
                if st != E_OK:
                    err[c, 0] = st
                    err[c, 2] = i
                    break
        for c in range(nchunks):
            if err[c, 0] != E_OK:
                return False
    return True
