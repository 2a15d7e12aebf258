"""Jitted half of the numba backend: the opcode table, the op kernels and the interpreter.

:mod:`fadcore.backends.numba.lowering` lowers a graph to a flat *tape* (one row of integer
fields per instruction) over *buffers*; this module runs it.

* The **kernels** (``k_*``) are C-callable ``@cfunc(cache=True)`` functions on raw addresses
  and int64 sizes. The interpreter calls them through their addresses, passed in at run time
  (``kernel_table()``): numba then compiles and caches each kernel once, instead of linking
  and re-optimizing every kernel into every caller (which made cold compiles take minutes).
* The **interpreter** (``run_part``) is one ``@njit(cache=True, nogil=True)`` function: an
  if/elif chain on integer opcodes over the tape, for the server or for a range of clients.
* ``run_program`` runs a whole program: per stage the server rows once, then the client rows
  in a ``prange`` over chunks of clients.

Nothing here closes over anything but module-level integer constants, so the compiled code is
cached on disk and reused by later processes.

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
from llvmlite import ir
from numba import carray, cfunc, njit, prange, types
from numba.extending import intrinsic

# --------------------------------------------------------------------------- opcode table
# The jitted side of the opcode table: fadcore.backends.numba.opcodes maps every primitive
# to one of these (and checks at import that both sides agree).
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
F_FLAGS = 6        # FL_* bits
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
E_BOUNDS = 3       # an instruction's sizes disagree with its buffers (a lowering bug)
E_INT = 4          # an integer result beyond +-2**53 (value: the instruction's output size)

# instruction flags (F_FLAGS bits)
FL_F32 = 1         # round the result to float32
FL_INT = 2         # integer result: check that it stays exact (|x| < 2**53)
MAX_EXACT_INT = 2.0 ** 53

SCRATCH = 256      # ints of per-chunk scratch for shapes and odometers
MOVE_SC = 160      # k_move's part of it (6 * MAX_NDIM ints)
MAX_NDIM = 8
SMALL_DOT = 2048   # below this many multiply-adds, plain loops beat a BLAS call
LOGE2 = 0.693147180559945309417232121458176568


# --------------------------------------------------------------------------- raw views and calls

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


@intrinsic
def _call(typingctx, fn, args):
    """Call the C function at address ``fn`` with a tuple of integer arguments (passed as
    int64); returns its int64 result. The kernels below are the only functions called so."""
    if not isinstance(args, types.BaseTuple) or not all(
            isinstance(a, (types.Integer, types.Boolean)) for a in args):
        return None
    sig = types.int64(fn, args)

    def codegen(context, builder, signature, llargs):
        i64 = ir.IntType(64)
        arg_types = signature.args[1]
        fnty = ir.FunctionType(i64, [i64] * len(arg_types))
        f = builder.inttoptr(llargs[0], fnty.as_pointer())
        vals = [context.cast(builder, builder.extract_value(llargs[1], j), ty, types.int64)
                for j, ty in enumerate(arg_types)]
        return builder.call(f, vals)
    return sig, codegen


def _ksig(k):
    return types.int64(*([types.int64] * k))


def _kernel(nargs):
    """``@cfunc`` of ``nargs`` int64 arguments returning int64, cached, NumPy float rules."""
    return cfunc(_ksig(nargs), cache=True, error_model="numpy")


@njit(inline="always")
def _f(p, n):
    return carray(_fptr(p), n)


@njit(inline="always")
def _i(p, n):
    return carray(_iptr(p), n)


@njit(inline="always")
def _cnt(st, k, r):
    c = st
    for _ in range(k):
        c *= r
    return c


@njit(inline="always")
def _dim(d, r):
    return r if d < 0 else d


# --------------------------------------------------------------------------- elementwise kernels

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


@_kernel(4)
def k_unary(op, px, po, n):
    x = _f(px, n)
    o = _f(po, n)
    if op == OP_NEG:
        for j in range(n):
            o[j] = -x[j]
    elif op == OP_EXP:
        for j in range(n):
            o[j] = np.exp(x[j])
    else:
        for j in range(n):
            o[j] = _uop(op, x[j])
    return 0


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


@_kernel(7)
def k_binary(op, px, py, po, n, nx, ny):
    """o = x op y; an operand of size 1 beside a larger result is a broadcast scalar."""
    x = _f(px, nx)
    y = _f(py, ny)
    o = _f(po, n)
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
        else:
            for j in range(n):
                o[j] = _bop(op, x[j], y[j])
    elif nx == n:
        b = y[0]
        if op == OP_MUL:
            for j in range(n):
                o[j] = x[j] * b
        else:
            for j in range(n):
                o[j] = _bop(op, x[j], b)
    else:
        a = x[0]
        if op == OP_MUL:
            for j in range(n):
                o[j] = a * y[j]
        else:
            for j in range(n):
                o[j] = _bop(op, a, y[j])
    return 0


@_kernel(8)
def k_select(pp, px, py, po, n, npr, nx, ny):
    p = _f(pp, npr)
    x = _f(px, nx)
    y = _f(py, ny)
    o = _f(po, n)
    sp = 1 if npr == n else 0
    sx = 1 if nx == n else 0
    sy = 1 if ny == n else 0
    for j in range(n):
        o[j] = x[j * sx] if p[j * sp] != 0.0 else y[j * sy]
    return 0


@_kernel(5)
def k_convert(mode, px, po, n, round32):
    x = _f(px, n)
    o = _f(po, n)
    if mode == CV_TRUNC:
        for j in range(n):
            o[j] = np.trunc(x[j])
    elif mode == CV_NONZERO:
        for j in range(n):
            o[j] = 1.0 if x[j] != 0.0 else 0.0
    elif round32:
        for j in range(n):
            o[j] = np.float32(x[j])
    else:
        for j in range(n):
            o[j] = x[j]
    return 0


# --------------------------------------------------------------------------- reductions

@njit(cache=True, error_model="numpy")
def _pw_leaf(a, lo, n, s):
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i * s]
        return res
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


@njit(cache=True, error_model="numpy")
def pairwise_sum(a, lo, n, s):
    """NumPy's pairwise summation of a[lo], a[lo+s], ... (n terms): bit-identical to np.sum.

    NumPy recurses (halves rounded to multiples of 8, leaves of at most 128 terms); this
    walks the same tree with an explicit stack (recursive functions do not cache reliably).
    """
    if n <= 128:
        return _pw_leaf(a, lo, n, s)
    flo = np.empty(64, dtype=np.int64)
    fn = np.empty(64, dtype=np.int64)
    fst = np.zeros(64, dtype=np.int64)
    fleft = np.empty(64)
    sp = 0
    flo[0] = lo
    fn[0] = n
    v = 0.0
    while True:
        while fn[sp] > 128:
            n2 = fn[sp] // 2
            n2 -= n2 % 8
            sp += 1
            flo[sp] = flo[sp - 1]
            fn[sp] = n2
            fst[sp] = 0
        v = _pw_leaf(a, flo[sp], fn[sp], s)
        sp -= 1
        while sp >= 0:
            if fst[sp] == 0:
                fleft[sp] = v
                fst[sp] = 1
                n2 = fn[sp] // 2
                n2 -= n2 % 8
                sp += 1
                flo[sp] = flo[sp - 1] + n2 * s
                fn[sp] = fn[sp - 1] - n2
                fst[sp] = 0
                break
            v = fleft[sp] + v
            sp -= 1
        if sp < 0:
            return v


@njit(inline="always")
def _max_into(m, v):
    return v if (v > m or v != v) else m


@_kernel(7)
def k_reduce(is_max, px, po, nd, pdims, pmask, psc):
    """Sum or max of x (shape dims, C order) over the axes where mask is 1.

    Adjacent axes of one kind are merged first; the common layouts (all, rows of a matrix,
    columns of a matrix, the middle of three groups) get direct loops with NumPy's summation
    order, anything else a generic odometer. Returns E_EMPTY for a max over nothing.
    """
    dims = _i(pdims, MAX_NDIM)
    mask = _i(pmask, MAX_NDIM)
    sc = _i(psc, 64)
    one = nd - nd + 1
    ng = 0
    total = 1
    nout = 1
    for a in range(nd):
        d = dims[a]
        total *= d
        if mask[a] == 0:
            nout *= d
        if d == 1:
            continue
        if ng > 0 and sc[2 * (ng - 1) + 1] == mask[a]:
            sc[2 * (ng - 1)] *= d
        else:
            sc[2 * ng] = d
            sc[2 * ng + 1] = mask[a]
            ng += 1
    x = _f(px, total)
    o = _f(po, nout)
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
            o[0] = pairwise_sum(x, total - total, total, one)
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
                o[k] = pairwise_sum(x, k * R, R, one)
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


@_kernel(5)
def k_argmax(px, po, outer, D, inner):
    if D == 0 and outer * inner > 0:
        return E_EMPTY
    x = _f(px, outer * D * inner)
    o = _f(po, outer * inner)
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
def _prod(shape, nd):
    s = 1
    for a in range(nd):
        s *= shape[a]
    return s


@njit(inline="always")
def _extent(shape, strides, nd):
    """One past the largest offset a strided box touches (0 for an empty box)."""
    e = 1
    for a in range(nd):
        if shape[a] == 0:
            return 0
        e += (shape[a] - 1) * strides[a]
    return e


@_kernel(8)
def k_move(op, pip, r, px, na, po, no, pscr):
    """broadcast_in_dim, transpose, slice and pad (params at ``pip``): one strided copy each;
    concatenate (op OP_CONCATENATE): one operand, ``pip`` -> (nd, axis, out dims, start).

    Every copy first checks that it stays inside both buffers (E_BOUNDS otherwise)."""
    ip = _i(pip, 4 + 5 * MAX_NDIM)
    x = _f(px, na)
    o = _f(po, no)
    scr = _i(pscr, 6 * MAX_NDIM)            # the caller's scratch: no allocation per call
    shp = scr[0:MAX_NDIM]
    sstr = scr[MAX_NDIM:2 * MAX_NDIM]
    dstr = scr[2 * MAX_NDIM:3 * MAX_NDIM]
    idx = scr[3 * MAX_NDIM:4 * MAX_NDIM]
    xs = scr[4 * MAX_NDIM:5 * MAX_NDIM]
    xstr = scr[5 * MAX_NDIM:6 * MAX_NDIM]
    zero = na - na
    if op == OP_BROADCAST_IN_DIM:
        # ip: out nd, out dims, in nd, in dims, dims map
        nd = ip[0]
        for a in range(nd):
            shp[a] = _dim(ip[1 + a], r)
            sstr[a] = 0
        q = 1 + nd
        xn = ip[q]
        for a in range(xn):
            xs[a] = _dim(ip[q + 1 + a], r)
        _c_strides(xs, xn, xstr)
        for a in range(xn):
            if xs[a] != 1:
                sstr[ip[q + 1 + xn + a]] = xstr[a]
        _c_strides(shp, nd, dstr)
        if _prod(shp, nd) != no or _prod(xs, xn) != na or _extent(shp, sstr, nd) > na:
            return E_BOUNDS
        _copy_nd(x, zero, sstr, o, zero, dstr, shp, nd, idx)
    elif op == OP_TRANSPOSE:
        # ip: nd, in dims, perm
        nd = ip[0]
        for a in range(nd):
            xs[a] = _dim(ip[1 + a], r)
        _c_strides(xs, nd, xstr)
        for a in range(nd):
            pa = ip[1 + nd + a]
            shp[a] = xs[pa]
            sstr[a] = xstr[pa]
        _c_strides(shp, nd, dstr)
        if _prod(xs, nd) != na or na != no:
            return E_BOUNDS
        _copy_nd(x, zero, sstr, o, zero, dstr, shp, nd, idx)
    elif op == OP_CONCATENATE:
        # ip: nd, axis, out dims[nd], then this operand: start along axis, dims[nd]
        nd = ip[0]
        axis = ip[1]
        for a in range(nd):
            xs[a] = _dim(ip[2 + a], r)
        _c_strides(xs, nd, dstr)
        start = ip[2 + nd]
        for a in range(nd):
            shp[a] = _dim(ip[3 + nd + a], r)
        _c_strides(shp, nd, sstr)
        if (_prod(xs, nd) != no or _prod(shp, nd) != na or start < 0
                or start + shp[axis] > xs[axis]):
            return E_BOUNDS
        _copy_nd(x, zero, sstr, o, start * dstr[axis], dstr, shp, nd, idx)
    else:
        # slice / pad; ip: nd, big dims (x for slice, result for pad), starts, limits, strides
        nd = ip[0]
        for a in range(nd):
            xs[a] = _dim(ip[1 + a], r)
        _c_strides(xs, nd, xstr)
        off = zero
        for a in range(nd):
            s0 = ip[1 + nd + a]
            lim = ip[1 + 2 * nd + a]
            k = ip[1 + 3 * nd + a]
            lim = xs[a] if lim < 0 else lim
            if s0 < 0 or lim > xs[a] or k < 1:
                return E_BOUNDS
            # len(range(s0, lim, k)) without overflow (k may be as large as 2**63 - 1)
            shp[a] = (lim - s0 - 1) // k + 1 if lim > s0 else 0
            off += s0 * xstr[a]
            xstr[a] = xstr[a] * k if shp[a] > 1 else 0
        _c_strides(shp, nd, sstr)
        big = na if op == OP_SLICE else no
        if _prod(xs, nd) != big or _prod(shp, nd) != (no if op == OP_SLICE else na):
            return E_BOUNDS
        if _prod(shp, nd) > 0 and off + _extent(shp, xstr, nd) > big:
            return E_BOUNDS
        if op == OP_SLICE:
            _copy_nd(x, off, xstr, o, zero, sstr, shp, nd, idx)
        else:
            for j in range(no):
                o[j] = 0.0
            _copy_nd(x, zero, sstr, o, off, xstr, shp, nd, idx)
    return E_OK


@njit(inline="always")
def _index(v, D):
    """An index value as an int in [0, D), or -1 when out of range (or not an integer)."""
    if not (v >= -D and v < D):
        return -1
    k = np.int64(v)
    if k != v:
        return -1
    if k < 0:
        k += D
    return k


@_kernel(9)
def k_take(op, px, pidx, po, outer, D, inner, K, perr):
    """take / untake (K indices along the axis), take_along_axis / untake_along_axis (indices
    shaped [outer, K, inner]). D is the indexed axis of x (take) or of the result (untake).
    Every index is checked first: out of [-D, D) returns E_INDEX with the value in err."""
    err = _i(perr, 5)
    along = op == OP_TAKE_ALONG_AXIS or op == OP_UNTAKE_ALONG_AXIS
    scatter = op == OP_UNTAKE or op == OP_UNTAKE_ALONG_AXIS
    nidx = outer * K * inner if along else K
    idx = _f(pidx, nidx)
    for t in range(nidx):
        if _index(idx[t], D) < 0:
            v = idx[t]
            err[3] = np.int64(v) if (v == v and abs(v) < 9e18) else -(2 ** 62)
            err[4] = D
            return E_INDEX
    nsmall = outer * K * inner
    nbig = outer * D * inner
    x = _f(px, nsmall if scatter else nbig)
    o = _f(po, nbig if scatter else nsmall)
    if scatter:
        for t in range(nbig):
            o[t] = 0.0
    for k in range(outer):
        for q in range(K):
            b = (k * K + q) * inner
            if along:
                for j in range(inner):
                    d = _index(idx[b + j], D)
                    if scatter:
                        o[(k * D + d) * inner + j] += x[b + j]
                    else:
                        o[b + j] = x[(k * D + d) * inner + j]
            else:
                d = _index(idx[q], D)
                g = (k * D + d) * inner
                if scatter:
                    for j in range(inner):
                        o[g + j] += x[b + j]
                else:
                    for j in range(inner):
                        o[b + j] = x[g + j]
    return E_OK


@_kernel(4)
def k_one_hot(px, po, n, depth):
    lab = _f(px, n)
    o = _f(po, n * depth)
    for i in range(n):
        v = lab[i]
        for c in range(depth):
            o[i * depth + c] = 1.0 if v == c else 0.0
    return 0


# --------------------------------------------------------------------------- products

@_kernel(7)
def k_dot(op, pa, pb, po, m, k, n):
    """matmul [m,k]@[k,n], matvec [m,k]@[k], vecmat [k]@[k,n] (m = 1), vdot (m = n = 1),
    outer [m]x[n] (k = 1). BLAS (np.dot on contiguous views) for real work, loops below
    SMALL_DOT multiply-adds, where a BLAS call costs more than it saves."""
    o = _f(po, m * n)
    if m == 0 or n == 0:
        return 0
    if k == 0:
        for j in range(m * n):
            o[j] = 0.0
        return 0
    if op == OP_OUTER:
        a = _f(pa, m)
        b = _f(pb, n)
        for i in range(m):
            v = a[i]
            for j in range(n):
                o[i * n + j] = v * b[j]
        return 0
    if m * k * n >= SMALL_DOT:
        if op == OP_MATMUL:
            np.dot(carray(_fptr(pa), (m, k)), carray(_fptr(pb), (k, n)),
                   carray(_fptr(po), (m, n)))
        elif op == OP_MATVEC:
            np.dot(carray(_fptr(pa), (m, k)), _f(pb, k), o)
        elif op == OP_VECMAT:
            np.dot(_f(pa, k), carray(_fptr(pb), (k, n)), o)
        else:
            o[0] = np.dot(_f(pa, k), _f(pb, k))
        return 0
    a = _f(pa, m * k)
    b = _f(pb, k * n)
    if n == 1:                  # matvec, vdot: one dot product per row
        for i in range(m):
            s = 0.0
            for q in range(k):
                s += a[i * k + q] * b[q]
            o[i] = s
        return 0
    for i in range(m):          # matmul, vecmat: rows of b scaled and added
        for j in range(n):
            o[i * n + j] = 0.0
        for q in range(k):
            v = a[i * k + q]
            for j in range(n):
                o[i * n + j] += v * b[q * n + j]
    return 0


KERNELS = (k_unary, k_binary, k_select, k_convert, k_reduce, k_argmax, k_move, k_take,
           k_one_hot, k_dot)
KI_UNARY = 0
KI_BINARY = 1
KI_SELECT = 2
KI_CONVERT = 3
KI_REDUCE = 4
KI_ARGMAX = 5
KI_MOVE = 6
KI_TAKE = 7
KI_ONE_HOT = 8
KI_DOT = 9


def kernel_table() -> np.ndarray:
    """The kernels' addresses, in KI_* order (valid while this module is loaded)."""
    return np.asarray([k.address for k in KERNELS], dtype=np.int64)


# --------------------------------------------------------------------------- the interpreter

@njit(inline="always")
def _int_ok(po, no):
    """Whether an integer result is exact: every |x| < 2**53 (NaN is not)."""
    o = _f(po, no)
    for j in range(no):
        if not (o[j] > -MAX_EXACT_INT and o[j] < MAX_EXACT_INT):
            return False
    return True


@njit(inline="always")
def _sizes_ok(op, ip, p, r, na, nb, no, acc_cols):
    """A cheap check that an instruction's parameters fit its buffers' sizes; the lowering
    guarantees it, this makes sure no kernel can ever touch memory outside them."""
    if op <= OP_ABS:
        return na == no
    if op <= OP_NE:
        return (na == no or na == 1) and (nb == no or nb == 1)
    if op == OP_CONVERT or op == OP_COPY:
        return na == no
    if op == OP_ARGMAX:
        outer = _cnt(ip[p], ip[p + 1], r)
        inner = _cnt(ip[p + 4], ip[p + 5], r)
        return outer * _cnt(ip[p + 2], ip[p + 3], r) * inner == na and outer * inner == no
    if op == OP_TAKE or op == OP_UNTAKE or op == OP_TAKE_ALONG_AXIS \
            or op == OP_UNTAKE_ALONG_AXIS:
        outer = _cnt(ip[p], ip[p + 1], r)
        D = _cnt(ip[p + 2], ip[p + 3], r)
        inner = _cnt(ip[p + 4], ip[p + 5], r)
        K = _cnt(ip[p + 6], ip[p + 7], r)
        small = outer * K * inner
        big = outer * D * inner
        along = op == OP_TAKE_ALONG_AXIS or op == OP_UNTAKE_ALONG_AXIS
        if nb != (small if along else K):
            return False
        if op == OP_TAKE or op == OP_TAKE_ALONG_AXIS:
            return na == big and no == small
        return na == small and no == big
    if op == OP_ONE_HOT:
        return na * ip[p] == no
    if op == OP_AGGREGATE or op == OP_FINISH:
        extra = 1 if ip[p] == AG_WMEAN else 0
        return ip[p + 1] >= 0 and ip[p + 1] + no + extra <= acc_cols
    return True


@njit(inline="always")
def _dot_ok(m, k, n, na, nb, no):
    return m * k == na and k * n == nb and m * n == no


@njit(inline="always")
def _addr(b, kind, loc, ctab, i, wtab, crow, sk, pref, c0):
    """Address of buffer ``b`` for client ``i`` (-1: the server) of the block starting at
    client ``c0``: a work slot holds the block's clients one after the other."""
    k = kind[b]
    if k == K_FIXED:
        return loc[b]
    if k == K_WORK:
        s = loc[b]
        a = wtab[s, crow]
        if i > c0:
            kk = sk[s, 1]
            a += 8 * sk[s, 0] * (pref[kk, i] - pref[kk, c0])
        return a
    return ctab[loc[b], i]


ROW_DONE = 1          # _block_row ran the row for the whole block
ROW_EACH = 0          # ... or the row must run client by client


@njit(inline="always")
def _span(b, nst, nk, kind, loc, ctab, rows, c0, c1):
    """Whether buffer ``b`` holds the block's per-client values (nst * r**nk floats each)
    one after the other: always for work slots, checked for per-client buffers."""
    if kind[b] == K_WORK:
        return True
    if kind[b] != K_CLIENT:
        return False
    row = loc[b]
    a = ctab[row, c0]
    for i in range(c0, c1):
        if ctab[row, i] != a:
            return False
        a += 8 * _cnt(nst, nk, rows[i])
    return True


@njit(inline="always")
def _total(nst, nk, pref, c0, c1):
    return nst * (pref[nk, c1] - pref[nk, c0])


@njit(inline="always")
def _f32_round(po, no):
    o = _f(po, no)
    for j in range(no):
        o[j] = np.float32(o[j])


@njit(inline="always")
def _block_each(t, op, tape, ip, kind, loc, ctab, rows, c0, c1, wtab, sk, pref, crow, acc,
                fns):
    """The rows the block runs client by client but inside one call, without the
    interpreter's per-client dispatch: aggregations (added into the chunk's accumulator row
    in client order), vecmat/matvec/vdot of per-client operands, and binary elementwise rows
    with a server operand as large as a client's result (a server vector beside client
    vectors). Every client's sizes are checked before anything is written (a failing check
    leaves the row to the per-client path, which reports it); every client computes exactly
    what the per-client path computes (the same loops, in the same order)."""
    p = tape[t, F_IP]
    a = tape[t, F_A]
    b = tape[t, F_B]
    out = tape[t, F_OUT]
    zero = c0 - c0
    if op == OP_AGGREGATE:
        mode = ip[p]
        off = ip[p + 1]
        extra = 1 if mode == AG_WMEAN else 0
        for i in range(c0, c1):
            no = _cnt(tape[t, F_NO], tape[t, F_KO], rows[i])
            if not (off >= 0 and off + no + extra <= acc.shape[1]):
                return ROW_EACH
        nst = tape[t, F_NO]
        if mode != AG_WMEAN and tape[t, F_KO] == 0 and tape[t, F_NA] == nst \
                and tape[t, F_KA] == 0 and _span(a, nst, 0, kind, loc, ctab, rows, c0, c1):
            # the block's values one after the other: each column summed over the clients in
            # client order (the same additions as client by client), in a local row
            x = _f(_addr(a, kind, loc, ctab, c0, wtab, crow, sk, pref, c0), nst * (c1 - c0))
            tmp = np.empty(nst, dtype=np.float64)
            for j in range(nst):
                tmp[j] = acc[crow, off + j]
            for i in range(c1 - c0):
                for j in range(nst):
                    tmp[j] += x[i * nst + j]
            for j in range(nst):
                acc[crow, off + j] = tmp[j]
            return ROW_DONE
        for i in range(c0, c1):
            no = _cnt(tape[t, F_NO], tape[t, F_KO], rows[i])
            x = _f(_addr(a, kind, loc, ctab, i, wtab, crow, sk, pref, c0), no)
            if mode == AG_WMEAN:
                w = _f(_addr(b, kind, loc, ctab, i, wtab, crow, sk, pref, c0), 1)[0]
                for j in range(no):
                    acc[crow, off + j] += w * x[j]
                acc[crow, ip[p + 2]] += w
            else:
                for j in range(no):
                    acc[crow, off + j] += x[j]
        return ROW_DONE
    if op == OP_VECMAT or op == OP_MATVEC or op == OP_VDOT:
        for i in range(c0, c1):
            r = rows[i]
            na = _cnt(tape[t, F_NA], tape[t, F_KA], r)
            nb = _cnt(tape[t, F_NB], tape[t, F_KB], r)
            no = _cnt(tape[t, F_NO], tape[t, F_KO], r)
            if op == OP_VECMAT:
                dm, dk, dn = zero + 1, _dim(ip[p], r), _dim(ip[p + 1], r)
            elif op == OP_MATVEC:
                dm, dk, dn = _dim(ip[p], r), _dim(ip[p + 1], r), zero + 1
            else:
                dm, dk, dn = zero + 1, _dim(ip[p], r), zero + 1
            if not _dot_ok(dm, dk, dn, na, nb, no):
                return ROW_EACH
        dnmax = zero + 1
        if op == OP_VECMAT:
            for i in range(c0, c1):
                dnmax = max(dnmax, _dim(ip[p + 1], rows[i]))
        tmp = np.empty(dnmax, dtype=np.float64)
        for i in range(c0, c1):
            r = rows[i]
            if op == OP_VECMAT:
                dm, dk, dn = zero + 1, _dim(ip[p], r), _dim(ip[p + 1], r)
            elif op == OP_MATVEC:
                dm, dk, dn = _dim(ip[p], r), _dim(ip[p + 1], r), zero + 1
            else:
                dm, dk, dn = zero + 1, _dim(ip[p], r), zero + 1
            pa = _addr(a, kind, loc, ctab, i, wtab, crow, sk, pref, c0)
            pb = _addr(b, kind, loc, ctab, i, wtab, crow, sk, pref, c0)
            po = _addr(out, kind, loc, ctab, i, wtab, crow, sk, pref, c0)
            if dm * dk * dn >= SMALL_DOT or dk == 0 or dm == 0 or dn == 0:
                _call(fns[KI_DOT], (op, pa, pb, po, dm, dk, dn))
            else:               # k_dot's loops, inline
                xa = _f(pa, dm * dk)
                xb = _f(pb, dk * dn)
                o = _f(po, dm * dn)
                if dn == 1:
                    for u in range(dm):
                        s = 0.0
                        for q in range(dk):
                            s += xa[u * dk + q] * xb[q]
                        o[u] = s
                else:           # (a local row: the same additions, vectorizable)
                    for j in range(dn):
                        tmp[j] = 0.0
                    for q in range(dk):
                        v = xa[q]
                        for j in range(dn):
                            tmp[j] += v * xb[q * dn + j]
                    for j in range(dn):
                        o[j] = tmp[j]
            if tape[t, F_FLAGS] & FL_F32:
                _f32_round(po, dm * dn)
        return ROW_DONE
    # binary elementwise: one operand a server value of a client's (static) result size
    ost = tape[t, F_NO]
    if tape[t, F_KO] != 0 or ost <= 1:
        return ROW_EACH
    tiled = -1
    for j in range(2):
        bj = tape[t, F_A + j]
        if tape[t, F_NA + 2 * j] != ost or tape[t, F_KA + 2 * j] != 0:
            return ROW_EACH
        if kind[bj] == K_FIXED:
            tiled = j
    if tiled < 0:
        return ROW_EACH
    cl = b if tiled == 0 else a
    if kind[cl] != K_FIXED and (op == OP_ADD or op == OP_SUB or op == OP_MUL) \
            and _span(out, ost, 0, kind, loc, ctab, rows, c0, c1) \
            and _span(cl, ost, 0, kind, loc, ctab, rows, c0, c1):
        nb_ = c1 - c0
        o = _f(_addr(out, kind, loc, ctab, c0, wtab, crow, sk, pref, c0), ost * nb_)
        xs = _f(_addr(tape[t, F_A + tiled], kind, loc, ctab, c0, wtab, crow, sk, pref, c0),
                ost)
        xc = _f(_addr(cl, kind, loc, ctab, c0, wtab, crow, sk, pref, c0), ost * nb_)
        for i in range(nb_):
            q = i * ost
            if op == OP_MUL:
                for j in range(ost):
                    o[q + j] = xc[q + j] * xs[j]
            elif op == OP_ADD:
                for j in range(ost):
                    o[q + j] = xc[q + j] + xs[j] if tiled == 1 else xs[j] + xc[q + j]
            else:
                for j in range(ost):
                    o[q + j] = xc[q + j] - xs[j] if tiled == 1 else xs[j] - xc[q + j]
        if tape[t, F_FLAGS] & FL_F32:
            for j in range(ost * nb_):
                o[j] = np.float32(o[j])
        return ROW_DONE
    for i in range(c0, c1):
        pa = _addr(a, kind, loc, ctab, i, wtab, crow, sk, pref, c0)
        pb = _addr(b, kind, loc, ctab, i, wtab, crow, sk, pref, c0)
        po = _addr(out, kind, loc, ctab, i, wtab, crow, sk, pref, c0)
        _call(fns[KI_BINARY], (op, pa, pb, po, ost, ost, ost))
        if tape[t, F_FLAGS] & FL_F32:
            _f32_round(po, ost)
    return ROW_DONE


@njit(cache=True, error_model="numpy", nogil=True)
def _block_row(t, tape, ip, kind, loc, ctab, rows, c0, c1, wtab, sk, pref, crow, acc, fns):
    """Run row ``t`` for clients c0..c1-1 in one kernel call when it can: elementwise rows
    whose client operands are laid out one client after the other (server operands: single
    numbers), and matmul/matvec of a client matrix by a server operand (the block's rows
    stacked). Rows of :func:`_block_each` run client by client inside this one call.
    Returns ROW_DONE, or ROW_EACH when the row must run client by client."""
    op = tape[t, F_OP]
    if tape[t, F_FLAGS] & FL_INT:
        return ROW_EACH
    if op == OP_AGGREGATE or op == OP_VECMAT or op == OP_VDOT:
        return _block_each(t, op, tape, ip, kind, loc, ctab, rows, c0, c1, wtab, sk, pref,
                           crow, acc, fns)
    elementwise = op <= OP_NE or op == OP_SELECT or op == OP_CONVERT or op == OP_COPY \
        or op == OP_ZEROS
    stacked = op == OP_MATMUL or op == OP_MATVEC
    if not (elementwise or stacked) or tape[t, F_FLAGS] & FL_INT:
        return ROW_EACH
    ost, ok_ = tape[t, F_NO], tape[t, F_KO]
    out = tape[t, F_OUT]
    if not _span(out, ost, ok_, kind, loc, ctab, rows, c0, c1):
        return ROW_EACH
    no = _total(ost, ok_, pref, c0, c1)
    po = _addr(out, kind, loc, ctab, c0, wtab, crow, sk, pref, c0)
    p = tape[t, F_IP]
    if stacked:
        a = tape[t, F_A]
        b = tape[t, F_B]
        if kind[b] != K_FIXED or not _span(a, tape[t, F_NA], tape[t, F_KA], kind, loc, ctab,
                                          rows, c0, c1):
            return ROW_EACH if op == OP_MATMUL else _block_each(
                t, op, tape, ip, kind, loc, ctab, rows, c0, c1, wtab, sk, pref, crow, acc, fns)
        dk = ip[p + 1]
        dn = ip[p + 2] if op == OP_MATMUL else dk - dk + 1
        if dk < 0 or dn < 0 or tape[t, F_KB] != 0:
            return ROW_EACH if op == OP_MATMUL else _block_each(
                t, op, tape, ip, kind, loc, ctab, rows, c0, c1, wtab, sk, pref, crow, acc, fns)
        m = dk - dk
        for i in range(c0, c1):
            m += _dim(ip[p], rows[i])
        na = _total(tape[t, F_NA], tape[t, F_KA], pref, c0, c1)
        if m * dk != na or m * dn != no or dk * dn != tape[t, F_NB]:
            return ROW_EACH
        pa = _addr(a, kind, loc, ctab, c0, wtab, crow, sk, pref, c0)
        _call(fns[KI_DOT], (op, pa, _addr(b, kind, loc, ctab, c0, wtab, crow, sk, pref, c0),
                            po, m, dk, dn))
    else:
        # operands: the same per-client size as the result, laid out alike, or one number
        nin = 3 if op == OP_SELECT else 2 if (op > OP_ABS and op <= OP_NE) else \
            0 if op == OP_ZEROS else 1
        pin = np.zeros(3, dtype=np.int64)
        nn = np.zeros(3, dtype=np.int64)
        for j in range(nin):
            b = tape[t, F_A + j]
            nst = tape[t, F_NA + 2 * j]
            nk = tape[t, F_KA + 2 * j]
            if kind[b] == K_FIXED:
                if nst != 1 or nk != 0:
                    if nin == 2 and op > OP_ABS:
                        return _block_each(t, op, tape, ip, kind, loc, ctab, rows, c0, c1,
                                           wtab, sk, pref, crow, acc, fns)
                    return ROW_EACH
                nn[j] = 1
            elif nst == ost and nk == ok_ and _span(b, nst, nk, kind, loc, ctab, rows, c0, c1):
                nn[j] = no
            else:
                return ROW_EACH
            pin[j] = _addr(b, kind, loc, ctab, c0, wtab, crow, sk, pref, c0)
        if op <= OP_ABS:
            _call(fns[KI_UNARY], (op, pin[0], po, no))
        elif op <= OP_NE:
            _call(fns[KI_BINARY], (op, pin[0], pin[1], po, no, nn[0], nn[1]))
        elif op == OP_SELECT:
            _call(fns[KI_SELECT], (pin[0], pin[1], pin[2], po, no, nn[0], nn[1], nn[2]))
        elif op == OP_ZEROS:
            o = _f(po, no)
            for j in range(no):
                o[j] = 0.0
        else:
            _call(fns[KI_CONVERT], (ip[p] if op == OP_CONVERT else CV_COPY, pin[0], po, no,
                                    tape[t, F_FLAGS] & FL_F32))
            return ROW_DONE
    if tape[t, F_FLAGS] & FL_F32:
        o = _f(po, no)
        for j in range(no):
            o[j] = np.float32(o[j])
    return ROW_DONE


@njit(cache=True, error_model="numpy", nogil=True)
def run_part(tape, start, stop, ip, kind, loc, ctab, rows, b0, b1, bnd, n, nchunks, wtab,
             sk, pref, acc, crow, err, fns):
    """Run tape rows [start, stop) for the blocks of clients b0..b1-1 (block j: clients
    bnd[j]..bnd[j+1]-1) with the workspace (column ``crow`` of ``wtab``: an address per work
    slot, sized for the chunk's largest block) and accumulator row of chunk ``crow``;
    ``b0 < 0``: once, for the server.

    Instruction-major within a block: each row runs for every client of the block before
    the next row (a block of one client is client-major execution). Elementwise rows and
    row-stacked products (a client matrix times a server matrix) run over the whole block in
    one kernel call: the block's values lie one after the other.

    Returns a status code; on error ``err`` holds (code, row, client, value, bound).
    """
    sc = np.empty(SCRATCH, dtype=np.int64)
    psc = sc.ctypes.data
    pip0 = ip.ctypes.data
    perr = err.ctypes.data
    zero = n - n
    if b0 < 0:
        b0 = zero - 1
        b1 = zero
    for blk in range(b0, b1):
        c0 = bnd[blk] if blk >= 0 else blk
        c1 = bnd[blk + 1] if blk >= 0 else zero
        for t in range(start, stop):
            if c1 - c0 > 1 and _block_row(t, tape, ip, kind, loc, ctab, rows, c0, c1, wtab, sk,
                                          pref, crow, acc, fns) == ROW_DONE:
                continue
            for i in range(c0, c1):
                r = rows[i] if i >= 0 else zero
                op = tape[t, F_OP]
                p = tape[t, F_IP]
                no = _cnt(tape[t, F_NO], tape[t, F_KO], r)
                pa = (_addr(tape[t, F_A], kind, loc, ctab, i, wtab, crow, sk, pref, c0)
                      if tape[t, F_A] >= 0 else 0)
                na = _cnt(tape[t, F_NA], tape[t, F_KA], r)
                nb = _cnt(tape[t, F_NB], tape[t, F_KB], r)
                st = E_OK
                if not _sizes_ok(op, ip, p, r, na, nb, no, acc.shape[1]):
                    err[0] = E_BOUNDS
                    err[1] = t
                    err[2] = i
                    return E_BOUNDS
                if op == OP_AGGREGATE:
                    # ip: mode, acc offset, [weight acc offset]
                    x = _f(pa, no)
                    off = ip[p + 1]
                    if ip[p] == AG_WMEAN:
                        pw = _addr(tape[t, F_B], kind, loc, ctab, i, wtab, crow, sk, pref, c0)
                        w = _f(pw, 1)[0]
                        for j in range(no):
                            acc[crow, off + j] += w * x[j]
                        acc[crow, ip[p + 2]] += w
                    else:
                        for j in range(no):
                            acc[crow, off + j] += x[j]
                    continue
                po = _addr(tape[t, F_OUT], kind, loc, ctab, i, wtab, crow, sk, pref, c0)
                pb = (_addr(tape[t, F_B], kind, loc, ctab, i, wtab, crow, sk, pref, c0)
                      if tape[t, F_B] >= 0 else 0)
                if op <= OP_ABS:
                    _call(fns[KI_UNARY], (op, pa, po, no))
                elif op <= OP_NE:
                    _call(fns[KI_BINARY], (op, pa, pb, po, no, na, nb))
                elif op == OP_SELECT:
                    pc = _addr(tape[t, F_C], kind, loc, ctab, i, wtab, crow, sk, pref, c0)
                    nc = _cnt(tape[t, F_NC], tape[t, F_KC], r)
                    _call(fns[KI_SELECT], (pa, pb, pc, po, no, na, nb, nc))
                elif op == OP_CONVERT or op == OP_COPY:
                    _call(fns[KI_CONVERT], (ip[p] if op == OP_CONVERT else CV_COPY, pa, po, no,
                                            tape[t, F_FLAGS] & FL_F32))
                    if tape[t, F_FLAGS] & FL_INT and not _int_ok(po, no):
                        err[0] = E_INT
                        err[1] = t
                        err[2] = i
                        return E_INT
                    continue
                elif op == OP_ZEROS:
                    o = _f(po, no)
                    for j in range(no):
                        o[j] = 0.0
                elif op == OP_REDUCE_SUM or op == OP_REDUCE_MAX:
                    # ip: nd, dims[nd], mask[nd]
                    nd = ip[p]
                    for a in range(nd):
                        sc[64 + a] = _dim(ip[p + 1 + a], r)
                        sc[80 + a] = ip[p + 1 + nd + a]
                    tot = zero + 1
                    nout = zero + 1
                    for a in range(nd):
                        tot *= sc[64 + a]
                        if sc[80 + a] == 0:
                            nout *= sc[64 + a]
                    if tot != na or nout != no:
                        st = E_BOUNDS
                    else:
                        st = _call(fns[KI_REDUCE], (op == OP_REDUCE_MAX, pa, po, nd, psc + 8 * 64,
                                                    psc + 8 * 80, psc))
                elif op == OP_ARGMAX:
                    # ip: outer, D, inner as (static, ragged count) pairs
                    st = _call(fns[KI_ARGMAX], (pa, po, _cnt(ip[p], ip[p + 1], r),
                                                _cnt(ip[p + 2], ip[p + 3], r),
                                                _cnt(ip[p + 4], ip[p + 5], r)))
                elif op == OP_BROADCAST_IN_DIM or op == OP_TRANSPOSE or op == OP_SLICE \
                        or op == OP_PAD:
                    st = _call(fns[KI_MOVE], (op, pip0 + 8 * p, r, pa, na, po, no,
                                              psc + 8 * MOVE_SC))
                elif op == OP_CONCATENATE:
                    # ip: nd, axis, out dims[nd], m, then per operand: buffer, dims[nd]; each
                    # operand goes through k_move with (nd, axis, out dims, start, dims) in sc
                    nd = ip[p]
                    axis = ip[p + 1]
                    m = ip[p + 2 + nd]
                    for a in range(nd + 2):
                        sc[a] = ip[p + a]
                    q = p + 3 + nd
                    start_ax = zero
                    for u in range(m):
                        sc[2 + nd] = start_ax
                        sz = zero + 1
                        for a in range(nd):
                            d = _dim(ip[q + 1 + a], r)
                            sc[3 + nd + a] = ip[q + 1 + a]
                            sz *= d
                        px = _addr(ip[q], kind, loc, ctab, i, wtab, crow, sk, pref, c0)
                        st = _call(fns[KI_MOVE], (op, psc, r, px, sz, po, no,
                                                  psc + 8 * MOVE_SC))
                        if st != E_OK:
                            break
                        start_ax += _dim(ip[q + 1 + axis], r)
                        q += 1 + nd
                elif op >= OP_MATMUL and op <= OP_OUTER:
                    one = zero + 1
                    if op == OP_MATMUL:
                        dm, dk, dn = _dim(ip[p], r), _dim(ip[p + 1], r), _dim(ip[p + 2], r)
                    elif op == OP_MATVEC:
                        dm, dk, dn = _dim(ip[p], r), _dim(ip[p + 1], r), one
                    elif op == OP_VECMAT:
                        dm, dk, dn = one, _dim(ip[p], r), _dim(ip[p + 1], r)
                    elif op == OP_VDOT:
                        dm, dk, dn = one, _dim(ip[p], r), one
                    else:
                        dm, dk, dn = _dim(ip[p], r), one, _dim(ip[p + 1], r)
                    if _dot_ok(dm, dk, dn, na, nb, no):
                        st = _call(fns[KI_DOT], (op, pa, pb, po, dm, dk, dn))
                    else:
                        st = E_BOUNDS
                elif op == OP_TAKE or op == OP_UNTAKE or op == OP_TAKE_ALONG_AXIS \
                        or op == OP_UNTAKE_ALONG_AXIS:
                    # ip: outer, D, inner, K as (static, ragged count) pairs
                    st = _call(fns[KI_TAKE], (op, pa, pb, po, _cnt(ip[p], ip[p + 1], r),
                                              _cnt(ip[p + 2], ip[p + 3], r),
                                              _cnt(ip[p + 4], ip[p + 5], r),
                                              _cnt(ip[p + 6], ip[p + 7], r), perr))
                elif op == OP_ONE_HOT:
                    _call(fns[KI_ONE_HOT], (pa, po, na, ip[p]))
                elif op == OP_ROWS:
                    _f(po, 1)[0] = r
                elif op == OP_NUM_CLIENTS:
                    _f(po, 1)[0] = n
                elif op == OP_FINISH:
                    # ip: mode, acc offset, [weight acc offset]; sum the chunk rows in order
                    o = _f(po, no)
                    off = ip[p + 1]
                    for j in range(no):
                        s = 0.0
                        for c in range(nchunks):
                            s += acc[c, off + j]
                        o[j] = s
                    if ip[p] == AG_MEAN:
                        for j in range(no):
                            o[j] = o[j] / n
                    elif ip[p] == AG_WMEAN:
                        ws = 0.0
                        for c in range(nchunks):
                            ws += acc[c, ip[p + 2]]
                        for j in range(no):
                            o[j] = o[j] / ws
                if st != E_OK:
                    err[0] = st
                    err[1] = t
                    err[2] = i
                    return st
                if tape[t, F_FLAGS] & FL_F32:
                    o = _f(po, no)
                    for j in range(no):
                        o[j] = np.float32(o[j])
                elif tape[t, F_FLAGS] & FL_INT and not _int_ok(po, no):
                    err[0] = E_INT
                    err[1] = t
                    err[2] = i
                    return E_INT
    return E_OK


@njit(cache=True, parallel=True, error_model="numpy")
def run_program(tape, stages, ip, kind, loc, ctab, rows, bnd, cblk, n, wtab, sk, pref, acc,
                err, fns):
    """Run a lowered program: per stage, its server rows once, then its client rows for every
    client, in a prange over the chunks (chunk c: blocks cblk[c]..cblk[c+1]-1, one workspace
    column and one accumulator row each; blocks run one after the other inside a chunk).

    ``stages[s] = (server start, server stop, client start, client stop)``. ``err`` has one
    row per chunk and a last row for the server; returns False on the first failing stage.
    """
    srv = err.shape[0] - 1
    nchunks = cblk.shape[0] - 1
    zero = n - n
    for s in range(stages.shape[0]):
        st = run_part(tape, stages[s, 0], stages[s, 1], ip, kind, loc, ctab, rows, zero - 1,
                      zero, bnd, n, nchunks, wtab, sk, pref, acc, zero, err[srv], fns)
        if st != E_OK:
            return False
        c0 = stages[s, 2]
        c1 = stages[s, 3]
        if c1 <= c0:
            continue
        for c in prange(nchunks):
            cc = zero + c
            run_part(tape, c0, c1, ip, kind, loc, ctab, rows, cblk[cc], cblk[cc + 1], bnd, n,
                     nchunks, wtab, sk, pref, acc, cc, err[cc], fns)
        for c in range(nchunks):
            if err[c, 0] != E_OK:
                return False
    return True
