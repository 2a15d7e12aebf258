"""``fad.vmap``: vectorize a local function over a batch axis, by a rewrite of its graph.

The function is traced once at the per-example types (the batch axis removed), then every
equation is re-emitted through its batching rule (``batch_rules``, keyed by primitive): a rule
receives the operands and which of them carry the batch axis (always axis 0 here) and returns
the batched result. Unbatched equations are emitted unchanged. The batch axis may be a client's
ragged row axis (``?``), so ``vmap(fad.grad(loss), in_axes=(None, 0, 0))(w, X, y)`` inside a
client gives per-example gradients over that client's own rows (DP-SGD clipping).

Only local functions are batched: a broadcast or aggregation moves values between placements,
which has no per-example meaning.
"""

from __future__ import annotations

from typing import Callable

from . import pytree
from .core import Builder, bind
from .errors import FadError
from .ir.graph import Graph, Literal
from .ir.primitives import primitives
from .ir.types import FederatedType, TensorType

__all__ = ["vmap", "batch_rules", "BatchingError"]


class BatchingError(FadError):
    """``fad.vmap`` cannot batch this function (a communicating or unsupported primitive)."""


#: primitive -> rule(args, batched: list[bool], **params) -> (out, out_batched)
batch_rules: dict = {}


def _p(name: str):
    return primitives[name]


def _shape(x) -> tuple:
    from .ops import shape_of
    return shape_of(x)


def _ex(x, b: bool) -> tuple:
    """Per-example shape of an operand."""
    s = _shape(x)
    return s[1:] if b else s


# --------------------------------------------------------------------------- helpers

def _bid(x, shape, dims):
    shape, dims = tuple(shape), tuple(dims)
    if _shape(x) == shape and dims == tuple(range(len(shape))):
        return x
    return bind(_p("broadcast_in_dim"), x, shape=shape, dims=dims)


def _transpose(x, perm):
    perm = tuple(perm)
    if perm == tuple(range(len(perm))):
        return x
    return bind(_p("transpose"), x, perm=perm)


def _batch(x, size):
    """An unbatched operand repeated along a new leading batch axis of ``size``."""
    s = _shape(x)
    return _bid(x, (size,) + s, range(1, len(s) + 1))


def _size(args, batched):
    return next(_shape(a)[0] for a, b in zip(args, batched) if b)


def _all_batched(args, batched):
    size = _size(args, batched)
    return [a if b else _batch(a, size) for a, b in zip(args, batched)]


def _einsum(spec: str, a, b):
    """A two-operand contraction ``"ab,bc->ac"`` built from broadcast_in_dim, mul and
    reduce_sum (the IR has no general dot): both operands are broadcast to the labels of the
    output followed by the contracted ones, multiplied, and the contracted axes summed."""
    ins, out = spec.split("->")
    la, lb = ins.split(",")
    sizes = {}
    for labels, x in ((la, a), (lb, b)):
        for c, d in zip(labels, _shape(x), strict=True):
            sizes.setdefault(c, d)
    full = out + "".join(sorted(set(la + lb) - set(out)))
    shape = tuple(sizes[c] for c in full)

    def spread(x, labels):
        order = sorted(range(len(labels)), key=lambda i: full.index(labels[i]))
        xt = _transpose(x, order)
        return _bid(xt, shape, [full.index(labels[i]) for i in order])

    prod = bind(_p("mul"), spread(a, la), spread(b, lb))
    red = tuple(range(len(out), len(full)))
    return bind(_p("reduce_sum"), prod, axes=red) if red else prod


def _letters(n: int, start: int = 0) -> str:
    return "".join(chr(ord("c") + start + i) for i in range(n))


# --------------------------------------------------------------------------- rule families

def _same(name: str) -> None:
    """Elementwise on one operand (and static params): the same primitive, batched."""
    def rule(args, batched, **params):
        return bind(_p(name), *args, **params), True
    batch_rules[_p(name)] = rule


def _elementwise(name: str) -> None:
    """Elementwise on several operands (equal shapes or scalars): align per-example shapes,
    then the same primitive."""
    def rule(args, batched, **params):
        size = _size(args, batched)
        shapes = {_ex(a, b) for a, b in zip(args, batched)} - {()}
        common = shapes.pop() if shapes else ()
        out = []
        for a, b in zip(args, batched):
            ex = _ex(a, b)
            if b and ex != common:                       # a per-example scalar
                a = _bid(a, (size,) + common, (0,))
            elif not b and ex != ():
                a = _batch(a, size)
            out.append(a)
        return bind(_p(name), *out, **params), True
    batch_rules[_p(name)] = rule


for _n in ("neg", "exp", "log", "log1p", "expm1", "sqrt", "tanh", "logistic", "sin", "cos",
           "sign", "abs", "convert", "stop_gradient", "zeros_like", "one_hot"):
    _same(_n)
for _n in ("add", "sub", "mul", "div", "pow", "max", "min", "logaddexp", "lt", "le", "gt",
           "ge", "eq", "ne", "select"):
    _elementwise(_n)


def _shift_axes(name: str, key: str) -> None:
    def rule(args, batched, **params):
        v = params[key]
        params[key] = tuple(a + 1 for a in v) if isinstance(v, tuple) else v + 1
        return bind(_p(name), *args, **params), True
    batch_rules[_p(name)] = rule


_shift_axes("reduce_sum", "axes")
_shift_axes("reduce_max", "axes")
_shift_axes("argmax", "axis")


def _rows_rule(x, batched, *, axis):
    return bind(_p("rows"), *x, axis=axis + 1), False     # row counts are not per example


batch_rules[_p("rows")] = _rows_rule


def _after_rule(args, batched):
    """``after(x, token)`` orders ``x`` after ``token`` (a schedule edge, no data)."""
    return bind(_p("after"), *args), batched[0]


batch_rules[_p("after")] = _after_rule


# --------------------------------------------------------------------------- shapes

def _bid_rule(args, batched, *, shape, dims):
    (x,) = args
    return _bid(x, (_shape(x)[0],) + tuple(shape), (0,) + tuple(d + 1 for d in dims)), True


def _reshape_rule(args, batched, *, shape):
    (x,) = args
    return bind(_p("reshape"), x, shape=(_shape(x)[0],) + tuple(shape)), True


def _transpose_rule(args, batched, *, perm):
    (x,) = args
    return _transpose(x, (0,) + tuple(p + 1 for p in perm)), True


def _slice_rule(args, batched, *, starts, limits, strides):
    (x,) = args
    n = _shape(x)[0]
    return bind(_p("slice"), x, starts=(0,) + starts, limits=(n,) + limits,
                strides=(1,) + strides), True


def _pad_rule(args, batched, *, shape, starts, limits, strides):
    (x,) = args
    n = _shape(x)[0]
    return bind(_p("pad"), x, shape=(n,) + tuple(shape), starts=(0,) + tuple(starts),
                limits=(n,) + tuple(limits), strides=(1,) + tuple(strides)), True


def _concat_rule(args, batched, *, axis):
    return bind(_p("concatenate"), *_all_batched(args, batched), axis=axis + 1), True


batch_rules[_p("broadcast_in_dim")] = _bid_rule
batch_rules[_p("reshape")] = _reshape_rule
batch_rules[_p("transpose")] = _transpose_rule
batch_rules[_p("slice")] = _slice_rule
batch_rules[_p("pad")] = _pad_rule
batch_rules[_p("concatenate")] = _concat_rule


# --------------------------------------------------------------------------- products

#: per-example contraction of each bilinear primitive
_CONTRACTIONS = {"matmul": "mk,kn->mn", "matvec": "mk,k->m", "vecmat": "m,mk->k",
                 "vdot": "k,k->", "outer": "m,n->mn"}


def _bilinear_rule(name: str):
    spec = _CONTRACTIONS[name]

    def rule(args, batched, **params):
        a, b = args
        ba, bb = batched
        # one batched operand: an ordinary product with the batch axis as rows
        if name == "vdot" and ba != bb:
            return (bind(_p("matvec"), a, b) if ba else bind(_p("matvec"), b, a)), True
        if name == "vecmat" and ba and not bb:
            return bind(_p("matmul"), a, b), True
        if name == "matvec" and bb and not ba:
            return bind(_p("matmul"), b, _transpose(a, (1, 0))), True
        (la, lb), lo = spec.split("->")[0].split(","), spec.split("->")[1]
        full = f"{'z' if ba else ''}{la},{'z' if bb else ''}{lb}->z{lo}"
        return _einsum(full, a, b), True
    batch_rules[_p(name)] = rule


for _n in _CONTRACTIONS:
    _bilinear_rule(_n)


# --------------------------------------------------------------------------- gathers

def _one_hot(idx, depth, like):
    from .ops import dtype
    return bind(_p("one_hot"), idx, depth=depth, dtype=dtype(like))


def _take_rule(args, batched, *, axis):
    x, idx = args
    bx, bi = batched
    if bx and not bi:
        return bind(_p("take"), x, idx, axis=axis + 1), True
    if bi and not bx:
        out = bind(_p("take"), x, idx, axis=axis)           # batch axis lands at `axis`
        nd = len(_shape(out))
        return _transpose(out, (axis,) + tuple(i for i in range(nd) if i != axis)), True
    # both batched: contract with the one-hot indices, example by example
    xs, ish = _ex(x, True), _ex(idx, True)
    pre, post = _letters(axis), _letters(len(xs) - axis - 1, start=axis)
    il = _letters(len(ish), start=len(xs))
    oh = _one_hot(idx, xs[axis], x)
    return _einsum(f"z{pre}n{post},z{il}n->z{pre}{il}{post}", x, oh), True


def _untake_rule(args, batched, *, axis, dim):
    ct, idx = args
    bc, bi = batched
    if bc and not bi:
        return bind(_p("untake"), ct, idx, axis=axis + 1, dim=dim), True
    if not bc:
        ct = _batch(ct, _shape(idx)[0])
    cs, ish = _ex(ct, True), _ex(idx, True)
    k = len(ish)
    pre, jl = _letters(axis), _letters(k, start=axis)
    post = _letters(len(cs) - axis - k, start=axis + k)
    oh = _one_hot(idx, dim, ct)
    return _einsum(f"z{pre}{jl}{post},z{jl}n->z{pre}n{post}", ct, oh), True


def _along_rule(name: str):
    def rule(args, batched, *, axis, **params):
        return bind(_p(name), *_all_batched(args, batched), axis=axis + 1, **params), True
    batch_rules[_p(name)] = rule


batch_rules[_p("take")] = _take_rule
batch_rules[_p("untake")] = _untake_rule
_along_rule("take_along_axis")
_along_rule("untake_along_axis")


# --------------------------------------------------------------------------- the transform

def batch_rule_for(prim) -> Callable:
    rule = batch_rules.get(prim)
    if rule is None:
        if prim.kind == "federated":
            raise BatchingError(
                f"vmap: the function uses fad.{prim.name}, which moves values between "
                "placements; vmap batches local functions (apply it inside a client, or to "
                "server values)")
        raise BatchingError(f"batching rule for primitive '{prim.name}' not implemented "
                            "(needed by vmap)")
    return rule


def batch_graph(g: Graph, args: list, batched: list[bool]) -> tuple[list, list[bool]]:
    """Emit ``g`` batched into the current builder: ``args[k]`` carries a leading batch axis
    where ``batched[k]``. Returns the outputs and which of them are batched."""
    env = {v: (a, b) for v, a, b in zip(g.inputs, args, batched, strict=True)}

    def read(a):
        return (a.value, False) if isinstance(a, Literal) else env[a]

    for e in g.eqns:
        ins = [read(a) for a in e.inputs]
        vals, flags = [x for x, _ in ins], [b for _, b in ins]
        if not any(flags):
            env[e.out] = (bind(e.prim, *vals, **e.params), False)
            continue
        env[e.out] = batch_rule_for(e.prim)(vals, flags, **dict(e.params))
    outs = [read(a) for a in g.outputs]
    return [x for x, _ in outs], [b for _, b in outs]


def _leaf_axes(in_axes, tree) -> list:
    """One batch axis (or None) per argument leaf."""
    children = tree[1]
    if isinstance(in_axes, (list, tuple)):
        if len(in_axes) != len(children):
            raise BatchingError(f"vmap: in_axes has {len(in_axes)} entries for "
                                f"{len(children)} arguments")
        per_arg = list(in_axes)
    else:
        per_arg = [in_axes] * len(children)
    out = []
    for ax, child in zip(per_arg, children):
        if ax is not None and not isinstance(ax, int):
            raise BatchingError(f"vmap: an in_axes entry is an int or None, got {ax!r}")
        out += [ax] * pytree.num_leaves(child)
    return out


def vmap(f, in_axes=0, out_axes=0):
    """Vectorize the local function ``f`` over a batch axis.

    ``in_axes``: an int (every argument batched along that axis), None, or a tuple with one
    int or None per argument (None: shared by every example). ``out_axes``: the axis of the
    batch in every output. The batch may be a client's ragged row axis: inside a traced
    function, ``fad.vmap(fad.grad(loss), in_axes=(None, 0, 0))(w, X, y)`` gives one gradient
    per row of each client's ``X``. Returns a traced function (it can be differentiated,
    nested and run like any other).
    """
    from .tracing import as_traced, cached_transform
    if not isinstance(out_axes, int):
        raise BatchingError(f"vmap: out_axes is an int, got {out_axes!r}")
    key = ("vmap", tuple(in_axes) if isinstance(in_axes, list) else in_axes, out_axes)
    return cached_transform(f, key, lambda: _make_vmap(as_traced(f), in_axes, out_axes))


def _make_vmap(base, in_axes, out_axes):
    from .tracing import TracedFunction
    fname = base.__name__

    def make_graph(tree, types):
        axes = _leaf_axes(in_axes, tree)
        size, per = None, []
        found = False
        for t, ax in zip(types, axes, strict=True):
            if ax is None:
                per.append(t)
                continue
            if not -t.ndim <= ax < t.ndim:
                raise BatchingError(f"vmap of {fname}: in_axes {ax} out of range for {t}")
            ax %= t.ndim
            n = t.shape[ax]
            if found and n != size:
                raise BatchingError(f"vmap of {fname}: batch sizes differ ({size} and {n})")
            size, found = n, True
            shape = t.shape[:ax] + t.shape[ax + 1:]
            per.append(FederatedType(TensorType(t.dtype, shape), t.placement,
                                     t.all_equal and None not in shape))
        if not found:
            raise BatchingError(f"vmap of {fname}: no argument is batched (in_axes={in_axes!r})")
        g, captured = base._graph_for(tree, tuple(per))
        ncap = g.num_captured
        nuser = len(g.inputs) - ncap
        b = Builder(f"vmap_{fname}")
        with b:
            ins = [b.new_input(t) for t in types]
            cap = [b.new_input(v.type) for v in g.inputs[nuser:]]
            moved, flags = [], []
            for x, ax in zip(ins, axes):
                if ax is None:
                    moved.append(x)
                    flags.append(False)
                    continue
                ax %= len(x.shape)
                moved.append(_transpose(x, (ax,) + tuple(i for i in range(len(x.shape))
                                                          if i != ax)))
                flags.append(True)
            outs, oflags = batch_graph(g, moved + cap, flags + [False] * ncap)
            results = []
            for o, ob in zip(outs, oflags):
                if not ob:
                    o = _batch(o, size)
                nd = len(_shape(o))
                if not -nd <= out_axes < nd:
                    raise BatchingError(f"vmap of {fname}: out_axes {out_axes} out of range "
                                        f"for an output of rank {nd}")
                ax = out_axes % nd
                perm = list(range(1, nd))
                perm.insert(ax, 0)
                results.append(b.atom(_transpose(o, perm)))
        vg = Graph(b.inputs, b.eqns, results, in_tree=tree, out_tree=g.out_tree,
                   name=f"vmap_{fname}", num_captured=ncap)
        from .ir.passes import simplify
        return simplify(vg).replace(in_tree=tree, out_tree=g.out_tree), captured

    return TracedFunction(make_graph, f"vmap({fname})")
