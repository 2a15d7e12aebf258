"""Hypothesis strategies for random federated programs.

``programs()`` draws small, well-typed federated programs with one scalar SERVER output, plus
arguments to run them on::

    from hypothesis import given
    from fadcore.testing.strategies import programs

    @given(programs())
    def test_reverse_matches_finite_differences(prog):
        f, args = prog
        fad.check_grads(f, args, modes=("reverse",))

A program is drawn as a *recipe*: the inputs (a server pytree of parameters, ragged client
data, integer labels, per-client scalars and vectors), a list of steps (each one op of
:mod:`fadcore.numpy`, :mod:`fadcore.nn` or a federated primitive, applied to earlier values of
matching placement, shape and dtype) and an output that reduces and aggregates every unused
value into one float scalar at the SERVER. The recipe is rendered as Python source and that
source is what gets traced, so a failing example prints (``repr(f)``, :func:`describe`) as a
readable program you can paste into a test, and hypothesis shrinks it step by step.

Arguments come from a seeded NumPy generator in well-conditioned ranges, and every op whose
domain is restricted is applied through a safe form (``log(softplus(x) + 1)``,
``exp(tanh(x))``, ``x / (softplus(y) + 1)``, ...). Draws whose kinks (relu, abs, max, clip,
clip_by_norm, ...) sit within ``kink_margin`` of a non-differentiable point, or whose
intermediate values exceed ``max_value``, are rejected, so finite differences are meaningful.

Extend the generator with your own ops via :class:`Op` (see ``docs/testing.md``).
"""

from __future__ import annotations

import hashlib
import linecache
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

import fadcore as fad
from fadcore import nn
from fadcore import numpy as fnp
from fadcore.ir.primitives import AGGREGATIONS as _AGGREGATION_PRIMITIVES
from fadcore.tracing import TracedFunction
from fadcore.values import ClientValues

__all__ = ["programs", "Op", "Program", "Recipe", "describe", "OP_NAMES", "AGGREGATIONS"]

AGGREGATIONS = tuple(p.name for p in _AGGREGATION_PRIMITIVES)

S, C = "SERVER", "CLIENTS"
MAX_NDIM = 3
MAX_SIZE = 48          # static elements of one value (a ragged dimension counts as max_rows)
MAX_AXIS = 8           # one static dimension


# --------------------------------------------------------------------------- user extension point

@dataclass(frozen=True)
class Op:
    """A user op for ``programs(extra_ops=[...])``.

    ``template`` is a Python expression with ``{0}`` (and ``{1}`` for ``arity=2``) standing for
    float operands, e.g. ``"myops.softsign({0})"``; ``env`` supplies the names it uses
    (``{"myops": myops}``). By default the op is elementwise: binary operands broadcast like
    NumPy and the result has the broadcast shape. For other ops give
    ``shape(*operand_shapes) -> result shape or None`` (None: not applicable to these shapes;
    ``None`` inside a shape is the client's ragged row dimension).
    ``kinks``: expressions (same placeholders) whose zeros are non-differentiable points
    (``("{0}",)`` for a relu-like op), so draws too close to them are rejected; non-empty kinks
    also keep the op out of ``smooth=True`` programs. ``weight``: how often it is drawn, in
    the units of :data:`GENERATORS` (a family of built-in ops weighs 1 to 5).
    """

    name: str
    template: str
    arity: int = 1
    shape: Callable | None = None
    kinks: tuple = ()
    env: Mapping = field(default_factory=dict)
    weight: int = 3

    def __post_init__(self):
        if self.arity not in (1, 2):
            raise ValueError(f"Op {self.name}: arity must be 1 or 2, got {self.arity}")
        for k in range(self.arity):
            if "{%d}" % k not in self.template:
                raise ValueError(f"Op {self.name}: template {self.template!r} lacks {{{k}}}")


# --------------------------------------------------------------------------- values and recipes

@dataclass
class Val:
    """A value of the program being drawn (its type, as the generator tracks it)."""

    ref: str                 # how the source refers to it: "v3", "p['w']", "X"
    placement: str           # "SERVER" | "CLIENTS"
    shape: tuple             # None: the client's row count
    dtype: str = "f"         # "f" (the programs' float dtype) | "i" (i64) | "b" (bool)
    high: int = 0            # integers: values in [0, high)
    const: bool = False      # depends on no float input: safe under comparisons and argmax
    uses: int = 0

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def ragged(self) -> bool:
        return None in self.shape

    def type_str(self, fdt: str = "f64") -> str:
        dt = {"f": fdt, "i": "i64", "b": "bool"}[self.dtype]
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{dt}[{dims}]"


@dataclass
class Kink:
    """A non-differentiable point: ``expr`` must stay away from 0 ("zero"), or from ties of its
    top two entries along ``axes`` ("max") / bottom two ("min")."""

    kind: str
    expr: str
    axes: tuple | None = None
    op: str = ""


@dataclass
class Step:
    op: str
    out: Val
    expr: str


@dataclass
class Recipe:
    """A drawn program: its inputs, its steps and its output expression, plus the data seed.

    ``source()`` is the program as Python; ``make_args()`` rebuilds its arguments;
    ``function()`` compiles and traces the source (a :class:`Program`)."""

    num_clients: int
    rows: tuple
    dims: dict
    inputs: list              # [(param name, kind, tree, [Val leaves])]
    steps: list
    output: str
    kinks: list
    seed: int
    uses_local_loss: bool = False
    env: dict = field(default_factory=dict)
    fdt: str = "f64"              # the programs' float dtype: "f64" or "f32"

    # -- source -------------------------------------------------------------------------
    def _body(self) -> list[str]:
        lines = []
        for name, kind, tree, leaves in self.inputs:
            placed = "@SERVER" if kind == "server" else "@CLIENTS"
            types = ", ".join(
                f"{v.ref}: " + (f"{{{v.type_str(self.fdt)}}}" if kind == "clients"
                                else v.type_str(self.fdt))
                + placed + (f" in [0, {v.high})" if v.dtype == "i" else "") for v in leaves)
            lines.append(f"    # {types}")
        for s in self.steps:
            lines.append(f"    {s.out.ref} = {s.expr}")
        return lines

    def signature(self) -> str:
        return ", ".join(name for name, *_ in self.inputs)

    def source(self, probe: bool = False) -> str:
        out = []
        if self.uses_local_loss:
            out += ["def local_loss(w, X):", "    return fnp.mean(fnp.tanh(X @ w))", "", ""]
        out.append(f"def {'probe' if probe else 'program'}({self.signature()}):")
        out += self._body()
        if probe:
            kinks = ", ".join(k.expr for k in self.kinks)
            vals = ", ".join(s.out.ref for s in self.steps)
            out.append(f"    return ({kinks}{',' if self.kinks else ''}), "
                       f"({vals}{',' if self.steps else ''})")
        else:
            out.append(f"    return {self.output}")
        return "\n".join(out) + "\n"

    def __str__(self) -> str:
        data = (f"# {self.num_clients} client(s) with rows {list(self.rows)}; "
                f"args = recipe.make_args() (seed {self.seed})")
        return self.source() + data

    # -- arguments ----------------------------------------------------------------------
    def make_args(self) -> tuple:
        rng = np.random.default_rng(self.seed)
        args = []
        for name, kind, tree, leaves in self.inputs:
            vals = [_make_leaf(v, kind, self.rows, rng, self.fdt) for v in leaves]
            if tree == "leaf":
                args.append(vals[0])
            elif tree == "tuple":
                args.append(tuple(vals))
            else:
                args.append({v.ref.split("'")[1]: x for v, x in zip(leaves, vals)})
        return tuple(args)

    def as_dtype(self, dtype: str) -> "Recipe":
        """The same program in ``"float32"`` or ``"float64"``; ``make_args()`` of the result
        draws the same numbers (rounded to that dtype)."""
        fdt = {"float32": "f32", "float64": "f64"}[dtype]
        old, new = {"f32": ("fnp.float64", "fnp.float32"),
                    "f64": ("fnp.float32", "fnp.float64")}[fdt]
        steps = [Step(s.op, s.out, s.expr.replace(old, new)) for s in self.steps]
        return replace(self, steps=steps, output=self.output.replace(old, new), fdt=fdt)

    # -- compiling ----------------------------------------------------------------------
    def function(self, probe: bool = False) -> "Program":
        src = self.source(probe)
        tag = hashlib.sha1(src.encode()).hexdigest()[:10]
        filename = f"<fadcore program {tag}>"
        linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
        ns = {"fad": fad, "fnp": fnp, "nn": nn, "np": np, **self.env}
        exec(compile(src, filename, "exec"), ns)  # noqa: S102  (our own generated source)
        return Program(self, ns["probe" if probe else "program"])


def _make_leaf(v: Val, kind: str, rows, rng, fdt="f64"):
    def one(shape):
        if v.dtype == "i":
            return rng.integers(0, v.high, size=shape).astype(np.int64)
        return rng.normal(size=shape).astype(np.float32 if fdt == "f32" else np.float64)
    if kind == "server":
        return one(v.shape)
    return fad.clients([one(tuple(r if d is None else d for d in v.shape)) for r in rows])


class Program(TracedFunction):
    """A traced function compiled from a :class:`Recipe`; ``repr`` shows its source."""

    def __init__(self, recipe: Recipe, fun: Callable):
        base = fad.trace(fun)
        self.__dict__.update(base.__dict__)
        self.recipe = recipe

    def __repr__(self) -> str:
        return "\n" + str(self.recipe)


def describe(f, args=None) -> str:
    """A failing example, readably: the program's source (for a :class:`Program`) and its IR."""
    parts = [str(f.recipe) if isinstance(f, Program) else repr(f)]
    if args is not None:
        try:
            parts.append(str(f.graph(*args)))
        except Exception as e:  # the description must not hide the failure being described
            parts.append(f"(graph unavailable: {type(e).__name__}: {e})")
    return "\n".join(parts)


# --------------------------------------------------------------------------- shapes

def _bshape(*shapes):
    """NumPy broadcasting with ``None`` (rows) broadcasting like a size; None if invalid."""
    nd = max(len(s) for s in shapes)
    out = []
    for i in range(nd):
        dims = {s[i - nd + len(s)] for s in shapes if i - nd + len(s) >= 0}
        if len(dims) > 1:
            dims.discard(1)
        if len(dims) > 1:
            return None
        out.append(dims.pop())
    return tuple(out)


def _fmt_shape(shape) -> str:
    inner = ", ".join("None" if d is None else str(d) for d in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


def _fmt_axes(axes):
    return str(axes[0]) if len(axes) == 1 else _fmt_shape(axes)


# --------------------------------------------------------------------------- the generator

class _Skip(Exception):
    """The drawn op has no operands (or would make too large a value): draw another."""


class _Gen:
    """State while drawing one recipe."""

    def __init__(self, draw, opts, dims):
        self.draw = draw
        self.o = opts
        self.dims = dims
        self.fdt = opts.get("fdt", "f64")
        self.fnp_dtype = "fnp.float32" if self.fdt == "f32" else "fnp.float64"
        # num_clients() is f64: cast it for float32 programs (NumPy would promote to f64)
        self.num_clients = ("fad.num_clients()" if self.fdt == "f64" else
                            "fnp.astype(fad.num_clients(), fnp.float32)")
        self.vals: list[Val] = []
        self.steps: list[Step] = []
        self.kinks: list[Kink] = []
        self.uses_local_loss = False
        self.ragged = False

    # -- picking --------------------------------------------------------------------------
    def cands(self, pred=None, dtype="f", placement=None) -> list[Val]:
        """Matching values, most recent first (so shrinking prefers chains)."""
        return [v for v in reversed(self.vals)
                if (dtype is None or v.dtype == dtype)
                and (placement is None or v.placement == placement)
                and (pred is None or pred(v))]

    def pick(self, cands: list):
        if not cands:
            raise _Skip
        return self.draw(st.sampled_from(cands)) if len(cands) > 1 else cands[0]

    def choice(self, options):
        options = list(options)
        return self.draw(st.sampled_from(options)) if len(options) > 1 else options[0]

    def small(self, shape) -> bool:
        if len(shape) > MAX_NDIM:
            return False
        size = 1
        for d in shape:
            if d is not None and d > MAX_AXIS:
                return False
            size *= self.o["max_rows"] if d is None else d
        return size <= MAX_SIZE

    # -- emitting -------------------------------------------------------------------------
    def emit(self, op, expr, operands, shape, dtype="f", placement=None, high=0, const=None,
             kinks=()) -> Val:
        if not self.small(tuple(shape)):
            raise _Skip
        placement = placement or operands[0].placement
        if const is None:
            const = all(v.const for v in operands)
        out = Val(f"v{len(self.steps)}", placement, tuple(shape), dtype, high, const)
        for v in operands:
            v.uses += 1
        self.steps.append(Step(op, out, expr))
        self.vals.append(out)
        if not const:       # kinks of constant values never move
            for k in kinks:
                k.op = op
                self.kinks.append(k)
        return out


# --------------------------------------------------------------------------- the op table
#
# Each generator ``gen(g) -> bool`` emits one step (True) or finds no operands (False).

UNARY = [  # name, template, kinks
    ("tanh", "fnp.tanh({0})", ()),
    ("neg", "-{0}", ()),
    ("sigmoid", "fnp.sigmoid({0})", ()),
    ("sin", "fnp.sin({0})", ()),
    ("cos", "fnp.cos({0})", ()),
    ("exp", "fnp.exp(fnp.tanh({0}))", ()),
    ("log", "fnp.log(fnp.softplus({0}) + 1.0)", ()),
    ("log1p", "fnp.log1p(fnp.softplus({0}))", ()),
    ("expm1", "fnp.expm1(fnp.tanh({0}))", ()),
    ("sqrt", "fnp.sqrt({0} * {0} + 1.0)", ()),
    ("square", "fnp.square({0})", ()),
    ("softplus", "fnp.softplus({0})", ()),
    ("power", "fnp.power(fnp.softplus({0}) + 0.5, 1.5)", ()),
    ("scale", "{0} * 0.5", ()),
    ("shift", "{0} + 1.0", ()),
    ("rsub", "2.0 - {0}", ()),
    ("rdiv", "1.0 / (fnp.softplus({0}) + 1.0)", ()),
]

BINARY = [
    ("add", "{0} + {1}", ()),
    ("sub", "{0} - {1}", ()),
    ("mul", "{0} * {1}", ()),
    ("div", "{0} / (fnp.softplus({1}) + 1.0)", ()),
    ("logaddexp", "fnp.logaddexp({0}, {1})", ()),
    ("pow", "fnp.power(fnp.softplus({0}) + 0.5, fnp.tanh({1}))", ()),
]

#: Ops with kinks (non-differentiable points): left out of ``smooth=True`` programs.
KINKED = [  # name, template, kinks, arity
    ("abs", "fnp.abs({0})", ("{0}",), 1),
    ("relu", "fnp.relu({0})", ("{0}",), 1),
    ("sign", "fnp.sign({0})", ("{0}",), 1),
    ("clip", "fnp.clip({0}, -1.0, 1.0)", ("{0} + 1.0", "{0} - 1.0"), 1),
    ("maximum", "fnp.maximum({0}, {1})", ("{0} - {1}",), 2),
    ("minimum", "fnp.minimum({0}, {1})", ("{0} - {1}",), 2),
]


def _zero_kinks(templates, *refs):
    return [Kink("zero", t.format(*refs)) for t in templates]


def gen_unary(g: _Gen) -> bool:
    cs = g.cands()
    if not cs:
        return False
    name, tpl, kinks = g.choice(UNARY)
    x = g.pick(cs)
    g.emit(name, tpl.format(x.ref), [x], x.shape, kinks=_zero_kinks(kinks, x.ref))
    return True


def gen_binary(g: _Gen) -> bool:
    cs = g.cands()
    if not cs:
        return False
    a = g.pick(cs)
    bs = g.cands(lambda v: v.placement == a.placement and _bshape(a.shape, v.shape) is not None
                 and g.small(_bshape(a.shape, v.shape)))
    name, tpl, kinks = g.choice(BINARY)
    b = g.pick(bs)
    g.emit(name, tpl.format(a.ref, b.ref), [a, b], _bshape(a.shape, b.shape),
           kinks=_zero_kinks(kinks, a.ref, b.ref))
    return True


def gen_kinked(g: _Gen) -> bool:
    """abs, relu, sign, clip, maximum, minimum: draws near their kinks are rejected."""
    cs = g.cands()
    if not cs:
        return False
    name, tpl, kinks, arity = g.choice(KINKED)
    a = g.pick(cs)
    ops = [a]
    if arity == 2:          # a distinct second operand: max(x, x) is a tie everywhere
        ops.append(g.pick(g.cands(lambda v: v is not a and v.placement == a.placement
                                  and _bshape(a.shape, v.shape) is not None)))
    refs = [v.ref for v in ops]
    g.emit(name, tpl.format(*refs), ops, _bshape(*[v.shape for v in ops]),
           kinks=_zero_kinks(kinks, *refs))
    return True


def _axis_spec(g: _Gen, x: Val, allow_none=True, allow_tuple=True):
    """(source text for axis=, normalized axes)."""
    nd = x.ndim
    options = []
    if allow_none:
        options.append(("", tuple(range(nd))))
    for i in range(nd):
        options.append((f"axis={i}", (i,)))
        options.append((f"axis={i - nd}", (i,)))
    if allow_tuple and nd >= 2:
        options.append((f"axis=(0, {nd - 1})", (0, nd - 1)))
    return g.choice(options)


def gen_reduce(g: _Gen) -> bool:
    cs = g.cands(lambda v: v.ndim >= 1)
    if not cs:
        return False
    x = g.pick(cs)
    kinds = ["sum", "mean", "logsumexp"] + ([] if g.o["smooth"] else ["max", "min"])
    red = g.choice(kinds)
    axis_src, axes = _axis_spec(g, x)
    keep = g.draw(st.booleans())
    args = ", ".join(a for a in (x.ref, axis_src, "keepdims=True" if keep else "") if a)
    shape = tuple((1 if i in axes else d) for i, d in enumerate(x.shape)) if keep else tuple(
        d for i, d in enumerate(x.shape) if i not in axes)
    kinks = [Kink(red, x.ref, axes)] if red in ("max", "min") else []
    g.emit(f"reduce_{red}", f"fnp.{red}({args})", [x], shape, kinks=kinks)
    return True


def gen_softmax(g: _Gen) -> bool:
    cs = g.cands(lambda v: v.ndim >= 1)
    if not cs:
        return False
    x = g.pick(cs)
    fn = g.choice(["softmax", "log_softmax"])
    ax = g.choice(range(-1, x.ndim)) if x.ndim > 1 else -1
    arg = "" if ax == -1 else f", axis={ax}"
    g.emit(fn, f"fnp.{fn}({x.ref}{arg})", [x], x.shape)
    return True


def gen_matmul(g: _Gen) -> bool:
    def out_shape(a, b):
        if a.ndim not in (1, 2) or b.ndim not in (1, 2) or a.shape[-1] != b.shape[0]:
            return None
        return a.shape[:-1] + b.shape[1:]
    pairs = [(a, b) for a in g.cands(lambda v: v.ndim in (1, 2))
             for b in g.cands(lambda v: v.ndim in (1, 2) and v.placement == a.placement)
             if out_shape(a, b) is not None]
    if not pairs:
        return False
    a, b = g.pick(pairs)
    tpl = g.choice(["{0} @ {1}", "fnp.dot({0}, {1})", "fnp.matmul({0}, {1})"])
    g.emit("matmul", tpl.format(a.ref, b.ref), [a, b], out_shape(a, b))
    return True


def gen_outer(g: _Gen) -> bool:
    pairs = [(a, b) for a in g.cands(lambda v: v.ndim == 1)
             for b in g.cands(lambda v: v.ndim == 1 and v.placement == a.placement)
             if g.small((a.shape[0], b.shape[0]))]
    if not pairs:
        return False
    a, b = g.pick(pairs)
    g.emit("outer", f"fnp.outer({a.ref}, {b.ref})", [a, b], (a.shape[0], b.shape[0]))
    return True


def _factorizations(n):
    out = [(n,)]
    if n > 1:
        out += [(1, n), (n, 1)]
        out += [(f, n // f) for f in range(2, n) if n % f == 0]
    return out


def gen_reshape(g: _Gen) -> bool:
    cs = g.cands(lambda v: v.ndim >= 1)
    if not cs:
        return False
    x = g.pick(cs)
    n_rag = x.shape.count(None)
    static = math.prod(d for d in x.shape if d is not None)
    targets = []
    for f in _factorizations(static) + ([()] if static == 1 else []):
        if len(f) + n_rag > MAX_NDIM:
            continue
        if n_rag == 0:
            targets.append(tuple(f))
        elif n_rag == 1:
            for pos in range(len(f) + 1):
                targets.append(tuple(f[:pos]) + (None,) + tuple(f[pos:]))
        else:
            targets.append((None,) * n_rag + tuple(f))
    targets = [t for t in targets if t != x.shape]
    if not targets:
        return False
    t = g.choice(targets)
    if n_rag == 0 and len(t) == 1 and g.draw(st.booleans()):
        src = f"{x.ref}.reshape(-1)"
    else:
        src = f"fnp.reshape({x.ref}, {_fmt_shape(t)})"
    g.emit("reshape", src, [x], t)
    return True


def gen_transpose(g: _Gen) -> bool:
    cs = g.cands(lambda v: v.ndim >= 2)
    if not cs:
        return False
    x = g.pick(cs)
    if x.ndim == 2:
        src, perm = g.choice([(f"{x.ref}.T", (1, 0)), (f"fnp.transpose({x.ref})", (1, 0))])
    else:
        perm = g.choice([(1, 0, 2), (0, 2, 1), (2, 1, 0), (1, 2, 0), (2, 0, 1)])
        src = f"fnp.transpose({x.ref}, {perm})"
    g.emit("transpose", src, [x], tuple(x.shape[i] for i in perm))
    return True


def gen_expand_squeeze(g: _Gen) -> bool:
    cs = g.cands(lambda v: v.ndim < MAX_NDIM or 1 in v.shape)
    if not cs:
        return False
    x = g.pick(cs)
    ones = [i for i, d in enumerate(x.shape) if d == 1]
    if ones and (x.ndim == MAX_NDIM or g.draw(st.booleans())):
        i = g.choice(ones)
        g.emit("squeeze", f"fnp.squeeze({x.ref}, axis={i})", [x],
               x.shape[:i] + x.shape[i + 1:])
        return True
    ax = g.choice(range(-(x.ndim + 1), x.ndim + 1))
    pos = ax % (x.ndim + 1)
    g.emit("expand_dims", f"fnp.expand_dims({x.ref}, {ax})", [x],
           x.shape[:pos] + (1,) + x.shape[pos:])
    return True


def gen_broadcast_to(g: _Gen) -> bool:
    cs = g.cands(lambda v: v.ndim < MAX_NDIM or 1 in v.shape)
    if not cs:
        return False
    x = g.pick(cs)
    sizes = sorted({g.dims["d"], g.dims["k"], 2})
    if x.placement == C and g.ragged:
        sizes = sizes + [None]
    shape = list(x.shape)
    ones = [i for i, d in enumerate(shape) if d == 1]
    if ones and g.draw(st.booleans()):
        shape[g.choice(ones)] = g.choice(sizes)
    elif len(shape) < MAX_NDIM:
        shape.insert(0, g.choice(sizes))
    else:
        return False
    shape = tuple(shape)
    if not g.small(shape) or _bshape(x.shape, shape) != shape:
        return False
    g.emit("broadcast_to", f"fnp.broadcast_to({x.ref}, {_fmt_shape(shape)})", [x], shape)
    return True


def gen_concat_stack(g: _Gen) -> bool:
    def concat_axes(a, b):
        if a.ndim != b.ndim or a.ndim == 0:
            return []
        return [i for i in range(a.ndim)
                if a.shape[i] is not None and b.shape[i] is not None
                and a.shape[i] + b.shape[i] <= MAX_AXIS
                and all(a.shape[j] == b.shape[j] for j in range(a.ndim) if j != i)]
    pairs = [(a, b) for a in g.cands() for b in g.cands(lambda v: v.placement == a.placement)
             if concat_axes(a, b) or (a.shape == b.shape and a.ndim < MAX_NDIM
                                      and g.small((2,) + a.shape))]
    if not pairs:
        return False
    a, b = g.pick(pairs)
    axes = concat_axes(a, b)
    if axes and (a.shape != b.shape or a.ndim == MAX_NDIM or g.draw(st.booleans())):
        ax = g.choice(axes)
        shape = list(a.shape)
        shape[ax] = a.shape[ax] + b.shape[ax]
        g.emit("concatenate", f"fnp.concatenate([{a.ref}, {b.ref}], axis={ax})", [a, b], shape)
        return True
    ax = g.choice(range(a.ndim + 1))
    g.emit("stack", f"fnp.stack([{a.ref}, {b.ref}], axis={ax})", [a, b],
           a.shape[:ax] + (2,) + a.shape[ax:])
    return True


def _index_key(nd, ax, item) -> str:
    if ax == 0:
        return item
    if ax == nd - 1 and nd >= 2:
        return "..., " + item
    return ", ".join([":"] * ax + [item])


def gen_index(g: _Gen) -> bool:
    cs = g.cands(lambda v: any(d is not None for d in v.shape))
    if not cs:
        return False
    x = g.pick(cs)
    ax = g.choice([i for i, d in enumerate(x.shape) if d is not None])
    n = x.shape[ax]
    kind = g.choice(["int", "slice", "take"])
    if kind == "int":
        i = g.choice(range(-n, n))
        shape = x.shape[:ax] + x.shape[ax + 1:]
        g.emit("index", f"{x.ref}[{_index_key(x.ndim, ax, str(i))}]", [x], shape)
    elif kind == "slice":
        start = g.choice(range(n))
        stop = g.choice(range(start + 1, n + 1))
        step = g.choice([1, 2])
        item = f"{start or ''}:{'' if stop == n else stop}" + (f":{step}" if step != 1 else "")
        shape = x.shape[:ax] + (len(range(start, stop, step)),) + x.shape[ax + 1:]
        g.emit("slice", f"{x.ref}[{_index_key(x.ndim, ax, item)}]", [x], shape)
    else:
        m = g.choice([1, 2, 3])
        idx = [g.choice(range(n)) for _ in range(m)]      # repeats test untake's accumulation
        shape = x.shape[:ax] + (m,) + x.shape[ax + 1:]
        g.emit("take", f"fnp.take({x.ref}, {idx}, axis={ax})", [x], shape)
    return True


def gen_gather(g: _Gen) -> bool:
    """take / take_along_axis / softmax_cross_entropy with integer values as indices."""
    opts = []
    for y in g.cands(dtype="i"):
        for x in g.cands(lambda v: v.placement == y.placement and v.ndim >= 1):
            for ax, d in enumerate(x.shape):
                shape = x.shape[:ax] + y.shape + x.shape[ax + 1:]
                if d is not None and d >= y.high and g.small(shape):
                    opts.append(("take", x, y, ax, shape))
            if (x.ndim == 2 and y.ndim == 1 and x.shape[0] == y.shape[0]
                    and x.shape[1] is not None and x.shape[1] >= y.high):
                opts.append(("take_along_axis", x, y, 1, (x.shape[0], 1)))
                opts.append(("softmax_cross_entropy", x, y, 1, (x.shape[0],)))
    if not opts:
        return False
    kind, x, y, ax, shape = g.pick(opts)
    if kind == "take":
        src = (f"{x.ref}[{y.ref}]" if ax == 0 and g.draw(st.booleans())
               else f"fnp.take({x.ref}, {y.ref}, axis={ax})")
    elif kind == "take_along_axis":
        src = f"fnp.take_along_axis({x.ref}, fnp.expand_dims({y.ref}, -1), axis=-1)"
    else:
        src = f"nn.softmax_cross_entropy({x.ref}, {y.ref})"
    g.emit(kind, src, [x, y], shape)
    return True


def gen_labels(g: _Gen) -> bool:
    """one_hot / astype of integer values, argmax of constant floats: label plumbing."""
    opts = [("one_hot", y) for y in g.cands(dtype="i") if g.small(y.shape + (y.high,))]
    opts += [("astype", y) for y in g.cands(dtype=None) if y.dtype in "ib"]
    opts += [("argmax", x) for x in g.cands(lambda v: v.const and v.ndim >= 1
                                            and any(d is not None for d in v.shape))]
    if not opts:
        return False
    kind, y = g.pick(opts)
    if kind == "one_hot":
        dt = "" if g.fdt == "f64" else f", dtype={g.fnp_dtype}"
        g.emit("one_hot", f"fnp.one_hot({y.ref}, {y.high}{dt})", [y], y.shape + (y.high,),
               const=True)
    elif kind == "astype":
        src = g.choice([f"fnp.astype({y.ref}, {g.fnp_dtype})", f"{y.ref}.astype({g.fnp_dtype})"])
        g.emit("astype", src, [y], y.shape, const=True)
    else:
        ax = g.choice([i for i, d in enumerate(y.shape) if d is not None])
        g.emit("argmax", f"fnp.argmax({y.ref}, axis={ax})", [y],
               y.shape[:ax] + y.shape[ax + 1:], dtype="i", high=y.shape[ax], const=True)
    return True


def gen_compare_where(g: _Gen) -> bool:
    """Comparisons of constant values (labels, one-hots) and where() with their results."""
    conds = g.cands(dtype="b")
    wheres = [(c, a) for c in conds for a in g.cands(
        lambda v: v.placement == c.placement and _bshape(c.shape, v.shape) is not None
        and g.small(_bshape(c.shape, v.shape)))]
    comps = g.cands(lambda v: v.const and v.dtype in "if", dtype=None)
    if wheres and (not comps or g.draw(st.booleans())):
        c, a = g.pick(wheres)
        bs = g.cands(lambda v: v.placement == c.placement
                     and _bshape(c.shape, a.shape, v.shape) is not None
                     and g.small(_bshape(c.shape, a.shape, v.shape)))
        b = g.pick(bs)
        other = b.ref if b is not a else "0.0"
        ops = [a, b] if b is not a else [a]
        shape = _bshape(c.shape, a.shape, b.shape if b is not a else ())
        g.emit("where", f"fnp.where({c.ref}, {a.ref}, {other})", [c] + ops, shape,
               const=all(v.const for v in ops))
        return True
    if not comps:
        return False
    a = g.pick(comps)
    name, op = g.choice([("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">="), ("eq", "=="),
                         ("ne", "!=")])
    if a.dtype == "i":
        lit = str(g.choice(range(max(a.high, 1))))
    else:
        lit = "0.5"
    src = f"fnp.equal({a.ref}, {lit})" if op == "==" else f"{a.ref} {op} {lit}"
    g.emit(name, src, [a], a.shape, dtype="b", const=True)
    return True


def gen_misc(g: _Gen) -> bool:
    """zeros_like / ones_like, stop_gradient (of constants), clip_by_norm."""
    cs = g.cands()
    if not cs:
        return False
    kinds = ["ones_like", "zeros_like"]
    if any(v.const for v in cs):
        kinds.append("stop_gradient")
    if not g.o["smooth"]:
        kinds += ["clip_by_norm", "clip_by_norm_tree"]
    kind = g.choice(kinds)
    if kind == "stop_gradient":
        x = g.pick([v for v in cs if v.const])
        g.emit(kind, f"fnp.stop_gradient({x.ref})", [x], x.shape)
    elif kind == "ones_like":
        x = g.pick(cs)
        g.emit(kind, f"fnp.ones_like({x.ref})", [x], x.shape, const=True)
    elif kind == "zeros_like":
        x = g.pick(cs)
        g.emit(kind, f"{x.ref} + fnp.zeros_like({x.ref})", [x], x.shape)
    elif kind == "clip_by_norm":
        x = g.pick(cs)
        g.emit(kind, f"nn.clip_by_norm({x.ref}, 1.0)", [x], x.shape,
               kinks=[Kink("zero", f"nn.global_norm({x.ref}) - 1.0")])
    else:
        a = g.pick(cs)
        b = g.pick(g.cands(lambda v: v.placement == a.placement))
        g.emit("clip_by_norm", f"nn.clip_by_norm(({a.ref}, {b.ref}), 1.0)[0]", [a, b], a.shape,
               kinks=[Kink("zero", f"nn.global_norm(({a.ref}, {b.ref})) - 1.0")])
    return True


def gen_local_sgd(g: _Gen) -> bool:
    """One local gradient step inside the program: ``w - 0.1 * fad.grad(local_loss)(w, X)``."""
    pairs = [(w, x) for w in g.cands(lambda v: v.ndim == 1)
             for x in g.cands(lambda v: v.ndim == 2 and v.placement == w.placement
                              and v.shape[1] == w.shape[0])]
    if not pairs:
        return False
    w, x = g.pick(pairs)
    g.uses_local_loss = True
    g.emit("local_sgd", f"{w.ref} - 0.1 * fad.grad(local_loss)({w.ref}, {x.ref})", [w, x],
           w.shape)
    return True


def gen_broadcast(g: _Gen) -> bool:
    cs = g.cands(placement=S)
    if not cs:
        return False
    x = g.pick(cs)
    g.emit("broadcast", f"fad.broadcast({x.ref})", [x], x.shape, placement=C)
    return True


def _aggregate_src(g: _Gen, inner: str, operands: list):
    """``fad.<agg>(inner)`` for an allowed aggregation; returns (op name, source, operands)."""
    agg = g.choice(g.o["aggregations"])
    if agg == "weighted_mean":
        ws = g.cands(lambda v: v.placement == C and v.shape == ())
        if ws:
            w = g.pick(ws)
            return agg, f"fad.weighted_mean({inner}, fnp.exp(fnp.tanh({w.ref})))", operands + [w]
        return agg, f"fad.weighted_mean({inner}, fnp.ones_like(fnp.sum({inner})))", operands
    if agg == "secure_sum" and g.o["secure_only"] and g.draw(st.booleans()):
        return "secure_mean", f"fad.secure_sum({inner}) / {g.num_clients}", operands
    return agg, f"fad.{agg}({inner})", operands


def gen_aggregate(g: _Gen) -> bool:
    cs = g.cands(placement=C)
    if not cs:
        return False
    x = g.pick(cs)
    inner = x.ref
    shape = x.shape
    if x.ragged:
        axes = tuple(i for i, d in enumerate(x.shape) if d is None)
        red = g.choice(["mean", "sum"])
        inner = f"fnp.{red}({x.ref}, axis={_fmt_axes(axes)})"
        shape = tuple(d for d in x.shape if d is not None)
    name, src, ops = _aggregate_src(g, inner, [x])
    g.emit(name, src, ops, shape, placement=S)
    return True


def gen_round(g: _Gen) -> bool:
    """A new round: aggregate a client value, post-process it on the server, broadcast it."""
    before = len(g.steps)
    if not gen_aggregate(g):
        return False
    agg = g.vals[-1]
    name, tpl, _ = g.choice([u for u in UNARY if not u[2]])
    post = g.emit(name, tpl.format(agg.ref), [agg], agg.shape)
    g.emit("broadcast", f"fad.broadcast({post.ref})", [post], post.shape, placement=C)
    assert len(g.steps) == before + 3
    return True


def gen_num_clients(g: _Gen) -> bool:
    cs = g.cands(placement=S)
    if not cs:
        return False
    x = g.pick(cs)
    g.emit("num_clients", f"{x.ref} / {g.num_clients}", [x], x.shape)
    return True


def gen_user(op: Op):
    def gen(g: _Gen) -> bool:
        first = g.cands()
        if not first:
            return False
        a = g.pick(first)
        ops = [a]
        if op.arity == 2:
            bs = g.cands(lambda v: v.placement == a.placement
                         and (op.shape(a.shape, v.shape) if op.shape else
                              _bshape(a.shape, v.shape)) is not None)
            if not bs:
                return False
            ops.append(g.pick(bs))
        shape = (op.shape(*[v.shape for v in ops]) if op.shape else
                 _bshape(*[v.shape for v in ops]))
        if shape is None or not g.small(tuple(shape)):
            return False
        refs = [v.ref for v in ops]
        g.emit(op.name, op.template.format(*refs), ops, tuple(shape),
               kinks=_zero_kinks(op.kinks, *refs))
        return True
    return gen


#: name -> (weight, generator). The first entry is what shrinking falls back to.
GENERATORS: dict[str, tuple[int, Callable]] = {
    "unary": (5, gen_unary),
    "binary": (5, gen_binary),
    "kinked": (3, gen_kinked),
    "reduce": (3, gen_reduce),
    "matmul": (3, gen_matmul),
    "broadcast": (3, gen_broadcast),
    "aggregate": (3, gen_aggregate),
    "round": (4, gen_round),
    "softmax": (1, gen_softmax),
    "outer": (1, gen_outer),
    "reshape": (2, gen_reshape),
    "transpose": (1, gen_transpose),
    "expand_squeeze": (1, gen_expand_squeeze),
    "broadcast_to": (1, gen_broadcast_to),
    "concat_stack": (2, gen_concat_stack),
    "index": (2, gen_index),
    "gather": (3, gen_gather),
    "labels": (3, gen_labels),
    "compare_where": (3, gen_compare_where),
    "misc": (2, gen_misc),
    "local_sgd": (1, gen_local_sgd),
    "num_clients": (1, gen_num_clients),
}

#: The op families ``programs(ops=...)`` accepts.
OP_NAMES = tuple(GENERATORS)


# --------------------------------------------------------------------------- inputs and output

def _draw_inputs(g: _Gen, draw, dims, rows):
    d, k = dims["d"], dims["k"]
    rd = None if len(set(rows)) > 1 else rows[0]
    g.ragged = rd is None
    inputs = []
    # server parameters: an array, a tuple or a dict of arrays
    tree = draw(st.sampled_from(["leaf", "dict", "tuple"]))
    shapes = [(d,), (), (d, k), (k,)]
    if tree == "leaf":
        leaves = [Val("w", S, draw(st.sampled_from(shapes)))]
    else:
        n = draw(st.integers(2, 3))
        names = ["w", "b", "W"][:n]
        picks = [draw(st.sampled_from(shapes)) for _ in range(n)]
        refs = [f"p['{nm}']" if tree == "dict" else f"p[{i}]" for i, nm in enumerate(names)]
        leaves = [Val(r, S, s) for r, s in zip(refs, picks)]
    inputs.append(("p" if tree != "leaf" else "w", "server", tree, leaves))
    # client data, labels, per-client scalars and vectors
    X = Val("X", C, (rd, d))
    extra = []
    if draw(st.booleans()):
        extra.append(Val("y", C, (rd,), "i", high=k, const=True))
    if draw(st.booleans()):
        extra.append(Val("a", C, ()))
    if draw(st.booleans()):
        extra.append(Val("u", C, (d,)))
    if extra and extra[0].ref == "y" and draw(st.booleans()):
        X.ref, extra[0].ref = "data[0]", "data[1]"
        inputs.append(("data", "clients", "tuple", [X, extra[0]]))
        extra = extra[1:]
    else:
        inputs.append(("X", "clients", "leaf", [X]))
    for v in extra:
        inputs.append((v.ref, "clients", "leaf", [v]))
    for _, _, _, leaves in inputs:
        g.vals.extend(leaves)
    return inputs


def _draw_output(g: _Gen) -> str:
    """Reduce every unused value to a float scalar; aggregate the client ones; add them up.

    Integer and bool values count too (cast to the float dtype): otherwise client data consumed only
    by, e.g., an argmax would leave a program without any aggregation."""
    leaves = [v for v in g.vals if v.uses == 0]
    terms = []
    for v in leaves:
        ref = v.ref if v.dtype == "f" else f"fnp.astype({v.ref}, {g.fnp_dtype})"
        inner = ref if v.shape == () else f"fnp.{g.choice(['sum', 'mean'])}({ref})"
        if v.placement == C:
            _, inner, _ = _aggregate_src(g, inner, [v])
        terms.append(inner)
    return " + ".join(terms)


# --------------------------------------------------------------------------- probing

def _members(x):
    return x.members if isinstance(x, ClientValues) else [x]


def kink_margin(kink: Kink, value) -> float:
    """Distance of a probed value from its kink (inf when it has none)."""
    m = math.inf
    for x in _members(value):
        x = np.asarray(x, dtype=np.float64)
        if x.size == 0:
            continue
        if kink.kind == "zero":
            m = min(m, float(np.min(np.abs(x))))
            continue
        if kink.kind == "min":
            x = -x
        axes = tuple(a % x.ndim for a in kink.axes) if x.ndim else ()
        if not axes:
            continue
        keep = [i for i in range(x.ndim) if i not in axes]
        flat = np.transpose(x, keep + list(axes)).reshape(
            int(np.prod([x.shape[i] for i in keep])), -1)
        if flat.shape[1] < 2:
            continue
        top = np.sort(flat, axis=1)
        m = min(m, float(np.min(top[:, -1] - top[:, -2])))
    return m


def _check_types(recipe: Recipe, probe_graph, nk: int) -> None:
    """The generator's idea of every value's type must be what tracing produced."""
    for s, t in zip(recipe.steps, probe_graph.out_types[nk:], strict=True):
        v = s.out
        want_place = fad.SERVER if v.placement == S else fad.CLIENTS
        want_dtype = {"f": fad.f32 if recipe.fdt == "f32" else fad.f64, "i": fad.i64,
                      "b": fad.bool_}[v.dtype]
        if t.placement is not want_place or t.dtype is not want_dtype or t.shape != v.shape:
            raise AssertionError(
                f"strategies.programs: step {v.ref} = {s.expr} was expected to give "
                f"{v.type_str(recipe.fdt)}@{v.placement} but traced to {t} (a generator bug, or a "
                f"shape rule that changed)\n{recipe}")


# --------------------------------------------------------------------------- the strategy

def programs(*, max_ops: int = 8, max_clients: int = 3, max_rows: int = 6,
             max_dim: int = 4, secure_only: bool = False, aggregations: Sequence[str] = None,
             smooth: bool = False, ops: Sequence[str] | None = None,
             extra_ops: Sequence[Op] = (), kink_margin_min: float = 1e-3,
             max_value: float = 1e3, dtype: str = "float64"):
    """Random well-typed federated programs with a scalar SERVER output, and their arguments.

    Yields ``(f, args)``: ``f`` a :class:`Program` (a traced function; ``f.recipe`` is its
    :class:`Recipe`, ``repr(f)`` its source) and ``args`` a tuple of its arguments (a server
    pytree of float64 parameters first, then ragged client data and, at random, integer labels,
    per-client scalars and per-client vectors).

    - ``max_ops``: at most this many steps (each one op, possibly with a safe-domain wrapper);
    - ``max_clients``, ``max_rows``, ``max_dim``: 1..max_clients clients of 1..max_rows rows
      (ragged as soon as there are two clients), feature and class dimensions up to max_dim;
    - ``secure_only``: every clients->server flow is a ``secure_sum`` (means are
      ``secure_sum(x) / num_clients()``); same as ``aggregations=("secure_sum",)``;
    - ``aggregations``: the aggregations to draw from (default: all of :data:`AGGREGATIONS`);
    - ``smooth``: leave out every op with a kink (relu, abs, sign, clip, maximum, minimum,
      max/min reductions, clip_by_norm, and user ops with ``kinks``) — for higher-order checks;
    - ``ops``: restrict the built-in op families to these names (see :data:`OP_NAMES`);
    - ``extra_ops``: user :class:`Op` s, drawn like the built-in ones;
    - ``kink_margin_min``, ``max_value``: reject draws closer than this to a kink, or with an
      intermediate value larger than this in magnitude (or not finite);
    - ``dtype``: ``"float64"`` or ``"float32"``, the dtype of every float argument and value
      (labels stay int64).
    """
    if secure_only:
        aggregations = ("secure_sum",)
    aggregations = tuple(aggregations or AGGREGATIONS)
    for a in aggregations:
        if a not in AGGREGATIONS:
            raise ValueError(f"programs: unknown aggregation {a!r}; choose from {AGGREGATIONS}")
    if ops is not None:
        for name in ops:
            if name not in GENERATORS:
                raise ValueError(f"programs: unknown op family {name!r}; choose from {OP_NAMES}")
    for name, v, lo in (("max_ops", max_ops, 1), ("max_clients", max_clients, 1),
                        ("max_rows", max_rows, 1), ("max_dim", max_dim, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"programs: {name} must be an int >= {lo}, got {v!r}")
    if dtype not in ("float64", "float32"):
        raise ValueError(f"programs: dtype is 'float64' or 'float32', got {dtype!r}")
    for op in extra_ops:
        if not isinstance(op, Op):
            raise TypeError(f"programs: extra_ops holds Op(...) values, got {op!r}")
    return _programs(max_ops=max_ops, max_clients=max_clients, max_rows=max_rows,
                     max_dim=max_dim, secure_only=secure_only, aggregations=aggregations,
                     smooth=smooth, ops=None if ops is None else tuple(ops),
                     extra_ops=tuple(extra_ops), kink_margin_min=kink_margin_min,
                     max_value=max_value, fdt="f32" if dtype == "float32" else "f64")


@st.composite
def _programs(draw, *, max_ops, max_clients, max_rows, max_dim, secure_only, aggregations,
              smooth, ops, extra_ops, kink_margin_min, max_value, fdt):
    opts = dict(smooth=smooth, secure_only=secure_only, aggregations=aggregations,
                max_rows=max_rows, fdt=fdt)
    dims = {"d": draw(st.integers(1, max_dim)), "k": draw(st.integers(2, max(2, max_dim)))}
    g = _Gen(draw, opts, dims)
    n_clients = draw(st.integers(1, max_clients))
    rows = [draw(st.integers(1, max_rows)) for _ in range(n_clients)]
    if n_clients > 1 and len(set(rows)) == 1:
        rows[-1] = rows[-1] + 1 if rows[-1] < max_rows else rows[-1] - 1
    inputs = _draw_inputs(g, draw, dims, rows)

    table = []
    for name, (weight, gen) in GENERATORS.items():
        if (ops is None or name in ops) and not (smooth and name == "kinked"):
            table += [gen] * weight
    env: dict = {}
    for op in extra_ops:
        if smooth and op.kinks:
            continue
        table += [gen_user(op)] * op.weight
        env.update(op.env)
    if not table:
        raise ValueError("programs: no op family left to draw from")
    n_steps = draw(st.integers(1, max_ops))
    attempts = 0
    while len(g.steps) < n_steps and attempts < 3 * n_steps:
        attempts += 1
        try:
            draw(st.sampled_from(table))(g)
        except _Skip:
            pass
    output = _draw_output(g)
    seed = draw(st.integers(0, 2**32 - 1))
    recipe = Recipe(n_clients, tuple(rows), dims, inputs, g.steps, output, g.kinks, seed,
                    g.uses_local_loss, env, fdt)

    f = recipe.function()
    args = recipe.make_args()
    # probe: kinks and every intermediate value, at these arguments (reference backend)
    probe = recipe.function(probe=True)
    pg = probe.graph(*args)
    _check_types(recipe, pg, len(recipe.kinks))
    kinks, values = fad.run(pg, *args, backend="reference")
    for v, x in zip(recipe.steps, values):
        if v.out.dtype == "f":
            for m in _members(x):
                assume(np.all(np.isfinite(m)) and np.all(np.abs(m) <= max_value))
    for k, x in zip(recipe.kinks, kinks):
        assume(kink_margin(k, x) >= kink_margin_min)
    return f, args
