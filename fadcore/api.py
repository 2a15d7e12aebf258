"""The transformations: grad, value_and_grad, jvp, vjp, hvp, jacfwd.

Each returns (or runs) a :class:`~fadcore.tracing.TracedFunction` whose graph is the
derivative graph: it prints, verifies, serializes, runs on every backend, can be costed and
differentiated again, and can be called inside another trace (client-side local SGD).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import pytree
from .errors import DifferentiationError
from .ir.graph import Graph
from .ir.types import CLIENTS, SERVER
from .modes import forward, reverse
from .tracing import TracedFunction, as_traced

__all__ = ["grad", "value_and_grad", "jvp", "vjp", "hvp", "jacfwd", "MODES"]

MODES = ("forward", "reverse", "mixed", "auto")


# --------------------------------------------------------------------------- argument selection

def _arg_leaf_ranges(in_tree) -> list[tuple[int, int]]:
    """Leaf index range of each top-level argument."""
    assert in_tree[0] == "tuple"
    out, k = [], 0
    for child in in_tree[1]:
        n = pytree.num_leaves(child)
        out.append((k, k + n))
        k += n
    return out


def _normalize_argnums(argnums, nargs: int, fname: str) -> tuple[tuple[int, ...], bool]:
    single = isinstance(argnums, (int, np.integer))
    nums = (int(argnums),) if single else tuple(int(a) for a in argnums)
    if not nums:
        raise DifferentiationError(f"grad of {fname}: argnums is empty")
    for a in nums:
        if not -nargs <= a < nargs:
            raise DifferentiationError(
                f"grad of {fname}: argnums {a} out of range for {nargs} arguments")
    return tuple(a % nargs for a in nums), single


def _wrt_mask(graph: Graph, argnums: tuple[int, ...], fname: str) -> list[bool]:
    ranges = _arg_leaf_ranges(graph.in_tree)
    mask = [False] * len(graph.inputs)
    for a in argnums:
        lo, hi = ranges[a]
        for k in range(lo, hi):
            t = graph.inputs[k].type
            if not t.dtype.is_float:
                raise DifferentiationError(
                    f"grad of {fname}: argument {a} has a leaf of type {t}; integer and bool "
                    "inputs are not differentiable (hold them fixed: leave them out of argnums)")
            mask[k] = True
    return mask


def _check_scalar_output(graph: Graph, fname: str) -> None:
    ts = graph.out_types
    if graph.out_tree != pytree.LEAF or len(ts) != 1:
        raise DifferentiationError(
            f"grad of {fname}: the function must return one scalar SERVER value, it returns "
            f"{pytree.tree_str(graph.out_tree)} of {[str(t) for t in ts]}; use fad.vjp for "
            "other outputs")
    t = ts[0]
    if t.placement is CLIENTS and t.shape == () and t.dtype.is_float:
        fed = sorted({e.prim.name for e in graph.eqns if e.prim.kind == "federated"})
        if not fed:
            return      # a local function applied at the clients: per-client gradients
        raise DifferentiationError(
            f"grad of {fname}: the output {t} is one value per client, and the function "
            f"communicates ({', '.join(fed)}); aggregate the output to the SERVER "
            "(fad.mean/fad.sum), or use fad.vjp")
    if t.placement is not SERVER or t.shape != () or not t.dtype.is_float:
        raise DifferentiationError(
            f"grad of {fname}: the output must be a float scalar at SERVER, got {t}"
            + (" (aggregate it with fad.mean/fad.sum first)" if t.placement is not SERVER else "")
            + (" (reduce it to a scalar, e.g. fnp.sum)" if t.shape != () else ""))


def _grad_tree(in_tree, argnums, single):
    children = in_tree[1]
    return children[argnums[0]] if single else ("tuple", tuple(children[a] for a in argnums))


# --------------------------------------------------------------------------- grad

def grad(f, argnums=0, mode: str = "reverse", state: str = "stateful", policy=None,
         weights=None, boundaries=None):
    """Gradient of ``f`` (one scalar SERVER output) w.r.t. the arguments ``argnums``.

    Results are placed like the arguments: per-client gradients for client arguments.
    ``mode``: "reverse" (default), "forward", "mixed" or "auto"; ``state``: "stateful" or
    "remat" (reverse/mixed); ``policy``: a :class:`fad.Policy`; ``weights``: cost weights for
    "auto" (:class:`fad.CostWeights`); ``boundaries``: explicit per-boundary choices for
    "mixed" (``{index: "reverse" | "pushforward"}``).
    """
    return _grad_impl(f, argnums, mode, state, policy, weights, boundaries, with_value=False)


def value_and_grad(f, argnums=0, mode: str = "reverse", state: str = "stateful", policy=None,
                   weights=None, boundaries=None):
    """Like :func:`grad`, returning ``(value, gradient)``."""
    return _grad_impl(f, argnums, mode, state, policy, weights, boundaries, with_value=True)


def _grad_impl(f, argnums, mode, state, policy, weights, boundaries, with_value):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    base = as_traced(f)
    fname = base.__name__

    def make_graph(tree, types):
        g, captured = base._graph_for(tree, types)
        _check_scalar_output(g, fname)
        nums, single = _normalize_argnums(argnums, len(tree[1]), fname)
        mask = _wrt_mask(g, nums, fname)
        name = f"{'value_and_' if with_value else ''}grad_{fname}"
        if mode == "forward":
            # the primal's flows must satisfy the policy too, even where the derivative graph
            # no longer contains them (reverse and mixed check this in their passes)
            reverse.broadcast_transpose_for(g, policy)
            dg = _forward_grad_graph(g, mask, with_value, name)
        elif mode == "reverse" or g.out_types[0].placement is CLIENTS:
            local = g.out_types[0].placement is CLIENTS
            dg = reverse.vjp_graph(g, mask, seed="one" if local else "barrier", with_value=with_value, state=state,
                                   policy=policy, name=name)
        else:
            from .modes import mixed
            dg = mixed.mixed_vjp_graph(g, mask, with_value=with_value, state=state,
                                       policy=policy, auto=(mode == "auto"), weights=weights,
                                       boundaries=boundaries, name=name)
        gtree = _grad_tree(tree, nums, single)
        dg.in_tree = tree
        dg.out_tree = ("tuple", (pytree.LEAF, gtree)) if with_value else gtree
        dg.meta.update(mode=mode, state=state if mode != "forward" else None)
        if policy is not None and policy.secure:
            dg.meta["policy"] = "secure_sum"     # fad.run's secure aggregation is on by default
        _check_policy(dg, policy)
        return dg, captured

    return TracedFunction(make_graph, f"{'value_and_' if with_value else ''}grad({fname})")


def _check_policy(g: Graph, policy) -> None:
    if policy is None:
        return
    from .errors import ClosureError
    from .policy import audit
    bad = audit(g, policy)
    if bad:
        raise ClosureError(f"the derivative graph {g.name} violates {policy}:\n  "
                           + "\n  ".join(bad))


def _forward_grad_graph(g: Graph, mask, with_value, name) -> Graph:
    """Gradient by forward mode: one tangent direction per element of the selected inputs."""
    from . import ops
    from .core import Builder
    from .ir.passes import simplify
    for v, m in zip(g.inputs, mask):
        if m and v.type.placement is not SERVER:
            raise DifferentiationError(
                f"grad of {g.name}, mode='forward': per-client gradients (w.r.t. the client "
                f"argument {v.type}) cannot be separated by forward mode; use mode='reverse' "
                "or 'mixed'")
    sel = [k for k, m in enumerate(mask) if m]
    dirs = []
    for k in sel:
        t = g.inputs[k].type
        for j in range(t.tensor.size()):
            dirs.append((k, j))
    ndirs = max(1, len(dirs))
    jg = forward.jvp_graph(g, mask, ndirs)
    ncap = g.meta.get("num_captured", 0)
    nuser = len(g.inputs) - ncap
    # a zero tangent entry times an infinite partial is 0 here, not NaN (docs/modes.md)
    jg = forward.strong_zero_tangents(jg, range(nuser, nuser + ndirs * len(sel)))
    b = Builder(name)
    from .core import inline
    with b:
        prim_in = [b.new_input(v.type) for v in g.inputs[:nuser]]
        cap_in = [b.new_input(v.type) for v in g.inputs[nuser:]]
        tangents = []
        for d in range(ndirs):
            for slot, k in enumerate(sel):
                t = g.inputs[k].type.tensor
                e = np.zeros(t.shape, dtype=t.dtype.np)
                if d < len(dirs) and dirs[d][0] == k:
                    e.reshape(-1)[dirs[d][1]] = 1.0
                tangents.append(e)
        outs = inline(jg, prim_in + tangents + cap_in)
        value, touts = outs[0], outs[1:]
        grads = []
        d = 0
        for k in sel:
            t = g.inputs[k].type.tensor
            n = t.size()
            parts = [ops.reshape(touts[d + j], (1,)) for j in range(n)]
            flat = ops.concatenate(parts, 0) if n else np.zeros((0,), t.dtype.np)
            grads.append(ops.reshape(flat, t.shape))
            d += n
        results = ([value] if with_value else []) + grads
        atoms = [b.atom(r) for r in results]
    out = Graph(b.inputs, b.eqns, atoms, name=name, meta={"num_captured": ncap} if ncap else {})
    return simplify(out)


# --------------------------------------------------------------------------- jvp / vjp

def jvp(f, primals: Sequence | None = None, tangents: Sequence | None = None):
    """``fad.jvp(f, primals, tangents) -> (out, tangent_out)``.

    ``primals`` and ``tangents`` are tuples aligned with ``f``'s arguments; a ``None`` tangent
    holds that argument fixed. ``fad.jvp(f)`` alone returns the traced function
    ``(primals, tangents) -> (out, tangent_out)``.
    """
    fn = _jvp_function(f)
    if primals is None:
        return fn
    return fn(tuple(primals), tuple(tangents))


def _jvp_function(f) -> TracedFunction:
    base = as_traced(f)
    fname = base.__name__

    def make_graph(tree, types):
        # tree: ("tuple", (primals_tree, tangents_tree))
        ptree, ttree = tree[1]
        if ptree[0] != "tuple" or ttree[0] != "tuple" or len(ptree[1]) != len(ttree[1]):
            raise DifferentiationError(f"jvp of {fname}: primals and tangents must be tuples "
                                       "of the same length")
        np_ = pytree.num_leaves(ptree)
        ptypes = types[:np_]
        ttypes = types[np_:]
        g, captured = base._graph_for(ptree, tuple(ptypes))
        mask = []
        ranges = _arg_leaf_ranges(ptree)
        tk = 0
        for (lo, hi), pt, tt in zip(ranges, ptree[1], ttree[1]):
            if tt == pytree.NONE:
                mask += [False] * (hi - lo)
                continue
            if tt != pt:
                raise DifferentiationError(
                    f"jvp of {fname}: a tangent has structure {pytree.tree_str(tt)} but its "
                    f"primal has {pytree.tree_str(pt)}")
            for k in range(lo, hi):
                want, got = g.inputs[k].type, ttypes[tk]
                tk += 1
                if not want.dtype.is_float:
                    raise DifferentiationError(f"jvp of {fname}: argument leaf {k} is {want}; "
                                               "integer inputs take a None tangent")
                if (want.placement, want.shape, want.dtype) != (got.placement, got.shape,
                                                                  got.dtype):
                    raise DifferentiationError(
                        f"jvp of {fname}: tangent {got} does not match its primal {want}")
                mask.append(True)
        jg = forward.jvp_graph(g, mask, 1, name=f"jvp_{fname}")
        ncap = g.meta.get("num_captured", 0)
        jg.in_tree = tree
        nout = len(g.outputs)
        jg.out_tree = ("tuple", (g.out_tree, g.out_tree))
        assert len(jg.outputs) == 2 * nout
        if ncap:
            jg.meta["num_captured"] = ncap
        jg.meta.update(mode="forward")
        return jg, captured

    return TracedFunction(make_graph, f"jvp({fname})")


class VJPFunction:
    """The pullback returned by :func:`vjp`: call it with output cotangents."""

    def __init__(self, traced: TracedFunction, primals: tuple, out_tree):
        self.traced = traced
        self.primals = primals
        self.out_tree = out_tree

    def __call__(self, cotangents):
        return self.traced(self.primals, cotangents)

    def graph(self, cotangents=None) -> Graph:
        if cotangents is None:
            raise TypeError("VJPFunction.graph(cotangents): pass cotangents (values or types)")
        return self.traced.graph(self.primals, cotangents)


def vjp(f, *primals, mode: str = "reverse", state: str = "stateful", policy=None):
    """``fad.vjp(f, *primals) -> (out, vjp_fn)``; ``vjp_fn(ct)`` returns one cotangent per
    argument (``None``-free: integer arguments get zeros of their own shape are not
    differentiable and get ``None``)."""
    base = as_traced(f)
    out = base(*primals)
    fn = _vjp_function(base, mode, state, policy)
    return out, VJPFunction(fn, tuple(primals), None)


def _vjp_function(base: TracedFunction, mode, state, policy) -> TracedFunction:
    fname = base.__name__

    def make_graph(tree, types):
        ptree, ctree = tree[1]
        np_ = pytree.num_leaves(ptree)
        g, captured = base._graph_for(ptree, tuple(types[:np_]))
        if ctree != g.out_tree:
            raise DifferentiationError(
                f"vjp of {fname}: cotangents have structure {pytree.tree_str(ctree)}, the "
                f"outputs {pytree.tree_str(g.out_tree)}")
        for k, (want, got) in enumerate(zip(g.out_types, types[np_:])):
            if (want.placement, want.shape, want.dtype) != (got.placement, got.shape, got.dtype):
                raise DifferentiationError(
                    f"vjp of {fname}: cotangent {k} is {got}, the output is {want}")
        mask = [v.type.dtype.is_float for v in g.inputs[:np_]] + \
            [False] * g.meta.get("num_captured", 0)
        if mode in ("mixed", "auto"):
            from .modes import mixed
            dg = mixed.mixed_vjp_graph(g, mask, seed="inputs", state=state, policy=policy,
                                       auto=(mode == "auto"), name=f"vjp_{fname}")
        else:
            dg = reverse.vjp_graph(g, mask, seed="inputs", state=state, policy=policy,
                                   name=f"vjp_{fname}")
        # outputs: one cotangent per float leaf; integer leaves get None
        it = iter(dg.outputs)
        outs = [next(it) if m else None for m in mask[:np_]]
        dg.outputs = [o for o in outs if o is not None]
        leaves_tree = []
        for m in mask[:np_]:
            leaves_tree.append(pytree.LEAF if m else pytree.NONE)
        dg.in_tree = tree
        dg.out_tree = _retree(ptree, leaves_tree)
        dg.meta.update(mode=mode, state=state)
        if policy is not None and policy.secure:
            dg.meta["policy"] = "secure_sum"     # fad.run's secure aggregation is on by default
        return dg, captured

    return TracedFunction(make_graph, f"vjp({fname})")


def _retree(tree, leaf_defs):
    it = iter(leaf_defs)

    def go(t):
        if t[0] == "leaf":
            return next(it)
        if t[0] == "none":
            return t
        if t[0] == "dict":
            return ("dict", t[1], tuple(go(c) for c in t[2]))
        return (t[0], tuple(go(c) for c in t[1]))
    return go(tree)


# --------------------------------------------------------------------------- hvp, jacfwd

def hvp(f, primals: Sequence, tangents: Sequence, mode: str = "reverse"):
    """Hessian-vector product (forward over reverse). Returns a tuple aligned with ``primals``,
    ``None`` where the tangent is ``None``."""
    primals, tangents = tuple(primals), tuple(tangents)
    idx = tuple(i for i, t in enumerate(tangents) if t is not None)
    if not idx:
        raise DifferentiationError("hvp: every tangent is None")
    g = grad(f, argnums=idx, mode=mode)
    _, hv = jvp(g, primals, tangents)
    out = [None] * len(primals)
    for i, h in zip(idx, hv):
        out[i] = h
    return tuple(out)


def jacfwd(f, argnums=0):
    """Forward-mode gradient of a scalar SERVER output (``grad(f, argnums, mode="forward")``)."""
    return grad(f, argnums, mode="forward")
