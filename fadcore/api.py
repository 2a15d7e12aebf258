"""The transformations: grad, value_and_grad, jvp, vjp, hvp, jacfwd, jacrev, hessian.

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
from .modes.options import Mode
from .tracing import TracedFunction, as_traced, cached_transform

__all__ = ["grad", "value_and_grad", "jvp", "vjp", "hvp", "jacfwd", "jacrev", "hessian",
           "MODES"]

MODES = tuple(m.value for m in Mode)


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


def _in_argnums_order(outs: list, in_tree, argnums) -> list:
    """Per-leaf results of the selected arguments, produced in argument order, rearranged
    into ``argnums`` order (``argnums=(1, 0)`` returns argument 1's first)."""
    ranges = _arg_leaf_ranges(in_tree)
    sel = sorted(set(argnums))
    start, k = {}, 0
    for a in sel:
        start[a] = k
        k += ranges[a][1] - ranges[a][0]
    assert k == len(outs)
    return [outs[start[a] + j] for a in argnums for j in range(ranges[a][1] - ranges[a][0])]


def _grad_tree(in_tree, argnums, single):
    children = in_tree[1]
    return children[argnums[0]] if single else ("tuple", tuple(children[a] for a in argnums))


# --------------------------------------------------------------------------- grad

def grad(f, argnums=0, mode: str = "reverse", state: str = "stateful", policy=None,
         weights=None, boundaries=None, has_aux: bool = False):
    """Gradient of ``f`` (one scalar SERVER output) w.r.t. the arguments ``argnums``.

    Results are placed like the arguments: per-client gradients for client arguments.
    ``mode``: "reverse" (default), "forward", "mixed" or "auto"; ``state``: "stateful" or
    "remat" (reverse/mixed); ``policy``: a :class:`fad.Policy`; ``weights``: cost weights for
    "auto" (:class:`fad.CostWeights`); ``boundaries``: explicit per-boundary choices for
    "mixed" (``{index: "reverse" | "pushforward"}``). ``has_aux=True``: ``f`` returns
    ``(loss, aux)`` and the gradient function returns ``(gradient, aux)``.

    ``fad.grad(f)`` made twice with the same options returns the same traced function, so
    ``fad.grad(f)(x)`` in a Python loop derives once per abstract signature.
    """
    return _grad_impl(f, argnums, mode, state, policy, weights, boundaries, False, has_aux)


def value_and_grad(f, argnums=0, mode: str = "reverse", state: str = "stateful", policy=None,
                   weights=None, boundaries=None, has_aux: bool = False):
    """Like :func:`grad`, returning ``(value, gradient)`` (``((value, aux), gradient)`` with
    ``has_aux=True``)."""
    return _grad_impl(f, argnums, mode, state, policy, weights, boundaries, True, has_aux)


def check_options(mode, state, policy) -> None:
    """Typed errors, with the caller's line, for option values no pass takes."""
    from .core import at_source, user_source
    from .errors import OptionError
    from .policy import Policy
    if mode not in MODES:
        raise OptionError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}"
                          f"{at_source(user_source())}")
    if state not in ("stateful", "remat"):
        raise OptionError(f"state must be 'stateful' or 'remat', got {state!r}"
                          f"{at_source(user_source())}")
    if policy is not None and not isinstance(policy, Policy):
        raise OptionError(f"policy must be a fad.Policy (e.g. fad.Policy(aggregation="
                          f"'secure_sum')) or None, got {policy!r:.60}{at_source(user_source())}")


def _grad_impl(f, argnums, mode, state, policy, weights, boundaries, with_value, has_aux):
    check_options(mode, state, policy)
    mode = Mode.parse(mode, f"mode must be one of {MODES}, got {{value!r}}")
    bkey = tuple(sorted(boundaries.items())) if isinstance(boundaries, dict) else boundaries
    key = ("grad", argnums, mode, state, policy, weights, bkey, with_value, has_aux)
    return cached_transform(f, key, lambda: _make_grad(f, argnums, mode, state, policy, weights,
                                                       boundaries, with_value, has_aux))


def _make_grad(f, argnums, mode, state, policy, weights, boundaries, with_value, has_aux):
    base = as_traced(f)
    fname = base.__name__
    what = f"{'value_and_' if with_value else ''}grad"

    def make_graph(tree, types):
        full, captured = base._graph_for(tree, types)
        g, aux = split_aux(full, f"{what} of {fname}") if has_aux else (full, None)
        _check_scalar_output(g, fname)
        nums, single = _normalize_argnums(argnums, len(tree[1]), fname)
        mask = _wrt_mask(g, nums, fname)
        name = f"{what}_{fname}"
        if mode is Mode.FORWARD:
            # the primal's flows must satisfy the policy too, even where the derivative graph
            # no longer contains them (reverse and mixed check this in their passes)
            reverse.broadcast_transpose_for(g, policy)
            dg = _forward_grad_graph(g, mask, with_value, name)
        elif mode is Mode.REVERSE or g.out_types[0].placement is CLIENTS:
            local = g.out_types[0].placement is CLIENTS
            dg = reverse.vjp_graph(g, mask, seed="one" if local else "barrier",
                                   with_value=with_value, state=state, policy=policy, name=name)
        elif mode == "auto" and not boundaries:
            dg = _auto_grad_graph(g, mask, tree, nums, with_value, policy, weights, name)
        else:
            from .modes import mixed
            dg = mixed.mixed_vjp_graph(g, mask, with_value=with_value, state=state,
                                       policy=policy, auto=mode is Mode.AUTO, weights=weights,
                                       boundaries=boundaries, name=name)
        gtree = _grad_tree(tree, nums, single)
        nv = 1 if with_value else 0
        ng = len(dg.outputs) - nv
        dg = dg.replace(outputs=dg.outputs[:nv] + _in_argnums_order(
            dg.outputs[nv:nv + ng], tree, nums))
        if aux is not None:
            dg = _append_aux(dg, full, aux)
            value_tree = ("tuple", (pytree.LEAF, aux[1]))
            out_tree = (("tuple", (value_tree, gtree)) if with_value
                        else ("tuple", (gtree, aux[1])))
            if with_value:      # outputs: value, grads..., aux... -> value, aux..., grads...
                nv, na = 1, len(aux[0])
                dg = dg.replace(outputs=dg.outputs[:nv] + dg.outputs[-na:] + dg.outputs[nv:-na])
        else:
            out_tree = ("tuple", (pytree.LEAF, gtree)) if with_value else gtree
        dg = dg.replace(in_tree=tree, out_tree=out_tree, meta={
            **dg.meta, "mode": mode.value, "state": state if mode is not Mode.FORWARD else None,
            **_policy_meta(policy)})
        _check_policy(dg, policy)
        return dg, captured

    out = TracedFunction(make_graph, f"{what}({fname})")
    out.recipe = (_grad_impl, (f, argnums, mode, state, policy, weights, boundaries, with_value,
                               has_aux), {})
    return out


# --------------------------------------------------------------------------- auxiliary outputs

def split_aux(g: Graph, what: str) -> tuple[Graph, tuple[list, tuple]]:
    """``g`` returns ``(main, aux)``: the graph of ``main`` alone, and (aux atoms, aux tree)."""
    t = g.out_tree
    if t[0] != "tuple" or len(t[1]) != 2:
        raise DifferentiationError(
            f"{what} with has_aux=True: the function must return a pair (output, aux), it "
            f"returns {pytree.tree_str(t)}")
    main_tree, aux_tree = t[1]
    n = pytree.num_leaves(main_tree)
    main = g.replace(outputs=g.outputs[:n], out_tree=main_tree)
    return main, (list(g.outputs[n:]), aux_tree)


def _append_aux(dg: Graph, full: Graph, aux) -> Graph:
    """``dg`` (inputs like ``full``'s) with ``full``'s aux outputs appended; shared work is
    merged by CSE."""
    from .core import Builder, inline
    from .ir.passes import simplify
    aux_graph = full.replace(outputs=aux[0], out_tree=aux[1])
    b = Builder(dg.name)
    with b:
        ins = [b.new_input(v.type) for v in dg.inputs]
        outs = inline(dg, ins) + inline(aux_graph, ins)
        atoms = [b.atom(x) for x in outs]
    return simplify(Graph(b.inputs, b.eqns, atoms, name=dg.name, meta=dict(dg.meta),
                          num_captured=dg.num_captured))


def _policy_meta(policy) -> dict:
    """fad.run's secure aggregation is on by default for graphs built under a secure policy."""
    return {"policy": "secure_sum"} if policy is not None and policy.secure else {}


def _auto_grad_graph(g, mask, tree, nums, with_value, policy, weights, name) -> Graph:
    """mode="auto": every mode (and forward + reverse combinations per argument) costed; the
    cheapest kept (:mod:`fadcore.modes.auto`)."""
    from .core import Builder, inline
    from .ir.passes import simplify
    from .modes import auto, mixed
    reverse.broadcast_transpose_for(g, policy)
    ranges = _arg_leaf_ranges(tree)
    arg_leaves = {f"arg {a}": list(range(*ranges[a])) for a in sorted(set(nums))}
    w = weights or mixed.CostWeights()

    def forward_graph(m, ndirs=None):
        return _forward_grad_graph(g, m, with_value, name, max_dirs=ndirs)

    def reverse_graph(m, state):
        return reverse.vjp_graph(g, m, seed="barrier", with_value=with_value, state=state,
                                 policy=policy, name=name)

    def mixed_graph(m, state, greedy, boundaries=None):
        return mixed.mixed_vjp_graph(g, m, with_value=with_value, state=state, policy=policy,
                                     auto=greedy, weights=w, boundaries=boundaries, name=name)

    def combine(fg, fmask, rg, rmask):
        nv = 1 if with_value else 0
        b = Builder(name)
        with b:
            ins = [b.new_input(v.type) for v in g.inputs]
            fo, ro = inline(fg, ins), inline(rg, ins)
            fgr, rgr = iter(fo[nv:]), iter(ro[nv:])
            grads = [next(fgr) if fmask[k] else next(rgr) for k in range(len(mask)) if mask[k]]
            atoms = [b.atom(x) for x in fo[:nv] + grads]
        return simplify(Graph(b.inputs, b.eqns, atoms, name=name, num_captured=g.num_captured))

    return auto.auto_grad_graph(g, mask, arg_leaves, weights=w, with_value=with_value,
                                policy=policy, name=name, forward_graph=forward_graph,
                                reverse_graph=reverse_graph, mixed_graph=mixed_graph,
                                combine=combine)


def _check_policy(g: Graph, policy) -> None:
    if policy is None:
        return
    from .errors import ClosureError
    from .policy import audit
    bad = audit(g, policy)
    if bad:
        raise ClosureError(f"the derivative graph {g.name} violates {policy}:\n  "
                           + "\n  ".join(bad))


def _forward_grad_graph(g: Graph, mask, with_value, name, max_dirs=None) -> Graph:
    """Gradient by forward mode: one tangent direction per element of the selected inputs.
    ``max_dirs``: only the first directions, their raw tangents as outputs (for costing)."""
    from . import ops
    from .core import Builder
    from .ir.passes import simplify
    fed = _communicates(g)
    for v, m in zip(g.inputs, mask):
        if m and v.type.placement is not SERVER and fed:
            raise DifferentiationError(
                f"grad of {g.name}, mode='forward': w.r.t. the client argument {v.type} of a "
                f"function that communicates ({', '.join(fed)}). Every client's argument "
                "reaches the output through the aggregation, so separating the per-client "
                "gradients by forward mode needs one direction per client and element (the "
                "number of clients is only known when the graph runs), or the server's "
                "derivative sent back to the clients, which is reverse mode's extra round. "
                "Use mode='reverse', 'mixed' or 'auto' (see docs/modes.md, 'Forward mode and "
                "client arguments')")
        if m and None in v.type.shape:
            raise DifferentiationError(
                f"grad of {g.name}, mode='forward': the argument {v.type} has a ragged "
                "dimension (?); forward mode needs a static number of directions")
    sel = [k for k, m in enumerate(mask) if m]
    dirs = []
    for k in sel:
        t = g.inputs[k].type
        for j in range(t.tensor.size()):
            dirs.append((k, j))
    if max_dirs is not None:
        dirs = dirs[:max_dirs]
    ndirs = max(1, len(dirs))
    jg = forward.jvp_graph(g, mask, ndirs)
    ncap = g.num_captured
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
                tangents.append(_placed_like(e, prim_in[k]))
        outs = inline(jg, prim_in + tangents + cap_in)
        value, touts = outs[0], outs[1:]
        if max_dirs is not None:
            atoms = [b.atom(r) for r in ([value] if with_value else []) + list(touts)]
            return simplify(Graph(b.inputs, b.eqns, atoms, name=name))
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
    out = Graph(b.inputs, b.eqns, atoms, name=name, num_captured=ncap)
    return simplify(out)


# --------------------------------------------------------------------------- jvp / vjp

def jvp(f, primals: Sequence | None = None, tangents: Sequence | None = None, *,
        num_clients: int | None = None):
    """``fad.jvp(f, primals, tangents) -> (out, tangent_out)``.

    ``primals`` and ``tangents`` are tuples aligned with ``f``'s arguments; a ``None`` tangent
    holds that argument fixed. ``num_clients=`` binds the cohort size of a function with no
    client-placed argument. ``fad.jvp(f)`` alone returns the traced function
    ``(primals, tangents) -> (out, tangent_out)``.
    """
    fn = cached_transform(f, ("jvp",), lambda: _jvp_function(f))
    if primals is None:
        return fn
    return fn(tuple(primals), tuple(tangents), num_clients=num_clients)


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
        assert len(jg.outputs) == 2 * len(g.outputs)
        jg = jg.replace(in_tree=tree, out_tree=("tuple", (g.out_tree, g.out_tree)),
                        num_captured=g.num_captured, meta={**jg.meta, "mode": "forward"})
        return jg, captured

    out = TracedFunction(make_graph, f"jvp({fname})")
    out.recipe = (_jvp_function, (f,), {})
    return out


class VJPFunction:
    """The pullback returned by :func:`vjp`: call it with output cotangents."""

    def __init__(self, traced: TracedFunction, primals: tuple, out_tree,
                 num_clients: int | None = None):
        self.traced = traced
        self.primals = primals
        self.out_tree = out_tree
        self.num_clients = num_clients

    def __call__(self, cotangents):
        return self.traced(self.primals, cotangents, num_clients=self.num_clients)

    def graph(self, cotangents=None) -> Graph:
        if cotangents is None:
            raise TypeError("VJPFunction.graph(cotangents): pass cotangents (values or types)")
        return self.traced.graph(self.primals, cotangents)


def vjp(f, *primals, argnums=None, has_aux: bool = False, mode: str = "reverse",
        state: str = "stateful", policy=None, num_clients: int | None = None):
    """``fad.vjp(f, *primals) -> (out, vjp_fn)``.

    ``vjp_fn(ct)`` takes cotangents shaped like ``out`` and returns one cotangent per argument
    (``None`` for integer arguments, which are not differentiable); with ``argnums`` (an int or
    a tuple) only those arguments' cotangents, as ``grad`` returns them. ``has_aux=True``:
    ``f`` returns ``(out, aux)`` and ``vjp`` returns ``(out, vjp_fn, aux)``. ``num_clients=``
    binds the cohort size of a function with no client-placed argument.
    """
    check_options(mode, state, policy)
    mode = Mode.parse(mode, f"mode must be one of {MODES}, got {{value!r}}")
    base = as_traced(f)
    out = base(*primals, num_clients=num_clients)
    key = ("vjp", argnums, has_aux, mode, state, policy)
    fn = cached_transform(base, key, lambda: _vjp_function(base, mode, state, policy, argnums,
                                                           has_aux))
    pullback = VJPFunction(fn, tuple(primals), None, num_clients)
    if has_aux:
        return out[0], pullback, out[1]
    return out, pullback


def _vjp_function(base: TracedFunction, mode, state, policy, argnums=None,
                  has_aux=False) -> TracedFunction:
    fname = base.__name__

    def make_graph(tree, types):
        ptree, ctree = tree[1]
        np_ = pytree.num_leaves(ptree)
        g, captured = base._graph_for(ptree, tuple(types[:np_]))
        if has_aux:
            g, _ = split_aux(g, f"vjp of {fname}")
        if ctree != g.out_tree:
            raise DifferentiationError(
                f"vjp of {fname}: cotangents have structure {pytree.tree_str(ctree)}, the "
                f"outputs {pytree.tree_str(g.out_tree)}")
        for k, (want, got) in enumerate(zip(g.out_types, types[np_:])):
            if (want.placement, want.shape, want.dtype) != (got.placement, got.shape, got.dtype):
                raise DifferentiationError(
                    f"vjp of {fname}: cotangent {k} is {got}, the output is {want}")
        if argnums is None:
            mask = [v.type.dtype.is_float for v in g.inputs[:np_]]
        else:
            nums, single = _normalize_argnums(argnums, len(ptree[1]), f"vjp of {fname}")
            mask = _wrt_mask(g, nums, fname)[:np_]
        mask = mask + [False] * g.num_captured
        if mode in ("mixed", "auto"):
            from .modes import mixed
            dg = mixed.mixed_vjp_graph(g, mask, seed="inputs", state=state, policy=policy,
                                       auto=(mode == "auto"), name=f"vjp_{fname}")
        elif mode == "forward":
            raise DifferentiationError(
                f"vjp of {fname}: mode='forward' has no pullback; use fad.jvp or fad.jacfwd")
        else:
            dg = reverse.vjp_graph(g, mask, seed="inputs", state=state, policy=policy,
                                   name=f"vjp_{fname}")
        if argnums is None:
            # one cotangent per argument leaf; integer leaves get None
            leaves_tree = [pytree.LEAF if m else pytree.NONE for m in mask[:np_]]
            dg = dg.replace(out_tree=_retree(ptree, leaves_tree))
        else:
            dg = dg.replace(out_tree=_grad_tree(ptree, nums, single),
                            outputs=_in_argnums_order(dg.outputs, ptree, nums))
        dg = dg.replace(in_tree=tree, meta={**dg.meta, "mode": mode.value, "state": state,
                                            **_policy_meta(policy)})
        return dg, captured

    out = TracedFunction(make_graph, f"vjp({fname})")
    out.recipe = (_vjp_function, (base, mode, state, policy, argnums, has_aux), {})
    return out


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


# --------------------------------------------------------------------------- hvp

def hvp(f, primals: Sequence, tangents: Sequence, mode: str = "reverse", *,
        num_clients: int | None = None):
    """Hessian-vector product (forward over reverse). Returns a tuple aligned with ``primals``,
    ``None`` where the tangent is ``None``."""
    primals, tangents = tuple(primals), tuple(tangents)
    idx = tuple(i for i, t in enumerate(tangents) if t is not None)
    if not idx:
        raise DifferentiationError("hvp: every tangent is None")
    g = grad(f, argnums=idx, mode=mode)
    _, hv = jvp(g, primals, tangents, num_clients=num_clients)
    out = [None] * len(primals)
    for i, h in zip(idx, hv):
        out[i] = h
    return tuple(out)


# --------------------------------------------------------------------------- Jacobians

def jacfwd(f, argnums=0, has_aux: bool = False):
    """The Jacobian of ``f`` w.r.t. ``argnums`` by forward mode: one JVP per input element.

    Any output (a pytree of any shapes, at SERVER or CLIENTS): each output leaf of shape ``O``
    becomes the argument's structure with leaves of shape ``O + I`` (``I`` the input leaf's
    shape), placed like the output (per-client Jacobians for client outputs). Inputs are
    SERVER arguments, or client arguments of a function that does not communicate.
    ``has_aux=True``: ``f`` returns ``(out, aux)`` and the result is ``(jacobian, aux)``.
    """
    return cached_transform(f, ("jacfwd", argnums, has_aux),
                            lambda: _make_jacobian(f, argnums, has_aux, "jacfwd", {}))


def jacrev(f, argnums=0, has_aux: bool = False, *, mode: str = "reverse",
           state: str = "stateful", policy=None):
    """The Jacobian of ``f`` w.r.t. ``argnums`` by reverse mode: one VJP per output element.

    Output leaves have static shapes, at SERVER (at CLIENTS for a function that does not
    communicate); any argument placement: a client argument's Jacobian is per client
    (``{O + I}@CLIENTS``). Same result structure as :func:`jacfwd`. ``mode``, ``state`` and
    ``policy`` as for :func:`grad`.
    """
    if mode not in ("reverse", "mixed", "auto"):
        raise ValueError(f"jacrev: mode must be 'reverse', 'mixed' or 'auto', got {mode!r}")
    opts = dict(mode=mode, state=state, policy=policy)
    return cached_transform(f, ("jacrev", argnums, has_aux, mode, state, policy),
                            lambda: _make_jacobian(f, argnums, has_aux, "jacrev", opts))


def hessian(f, argnums=0, has_aux: bool = False):
    """``jacfwd(jacrev(f))``: for a scalar output the Hessian, shaped ``I + I`` per pair of
    argument leaves (nested like the arguments, twice)."""
    return cached_transform(f, ("hessian", argnums, has_aux), lambda: jacfwd(
        jacrev(f, argnums, has_aux=has_aux), argnums, has_aux=has_aux))


def _jac_tree(out_tree, gtree):
    """``out_tree`` with each leaf replaced by ``gtree`` (the arguments' structure)."""
    kind = out_tree[0]
    if kind == "leaf":
        return gtree
    if kind == "none":
        return out_tree
    if kind == "dict":
        return ("dict", out_tree[1], tuple(_jac_tree(c, gtree) for c in out_tree[2]))
    return (kind, tuple(_jac_tree(c, gtree) for c in out_tree[1]))


def _communicates(g: Graph) -> list[str]:
    return sorted({e.prim.name for e in g.eqns if e.prim.kind == "federated"})


def _make_jacobian(f, argnums, has_aux, what, opts) -> TracedFunction:
    base = as_traced(f)
    fname = base.__name__

    def make_graph(tree, types):
        full, captured = base._graph_for(tree, types)
        g, aux = split_aux(full, f"{what} of {fname}") if has_aux else (full, None)
        nums, single = _normalize_argnums(argnums, len(tree[1]), f"{what} of {fname}")
        mask = _wrt_mask(g, nums, fname)
        sel = [k for k, m in enumerate(mask) if m]
        name = f"{what}_{fname}"
        build = _jacfwd_outputs if what == "jacfwd" else _jacrev_outputs
        jg = build(g, mask, sel, name, fname, opts)
        per = len(sel)
        jg = jg.replace(outputs=[x for o in range(len(g.outputs)) for x in _in_argnums_order(
            jg.outputs[o * per:(o + 1) * per], tree, nums)])
        jtree = _jac_tree(g.out_tree, _grad_tree(tree, nums, single))
        if aux is not None:
            jg = _append_aux(jg, full, aux)
            jtree = ("tuple", (jtree, aux[1]))
        jg = jg.replace(in_tree=tree, out_tree=jtree, meta={
            **jg.meta, "mode": "forward" if what == "jacfwd" else str(opts["mode"])})
        return jg, captured

    out = TracedFunction(make_graph, f"{what}({fname})")
    out.recipe = (_make_jacobian, (f, argnums, has_aux, what, opts), {})
    return out


def _one_hot(t, j: int) -> np.ndarray:
    e = np.zeros(t.shape, dtype=t.dtype.np)
    if e.size:
        e.reshape(-1)[j] = 1.0
    return e


def _placed_like(e: np.ndarray, x):
    """The constant ``e`` at ``x``'s placement (a client constant is ``zeros_like(x) + e``)."""
    from . import ops
    if x.type.placement is CLIENTS:
        return ops.add(ops.zeros_like(x), e)
    return e


def _stack_columns(cols: list, lead: tuple, trail: tuple, first: bool):
    """Join per-element results into one ``lead + trail`` array: ``cols[j]`` has shape
    ``lead`` (``first=False``, one column per trailing element) or ``trail`` (``first=True``,
    one row per leading element)."""
    from . import ops
    if first:
        parts = [ops.reshape(c, (1,) + trail) for c in cols]
        return ops.reshape(ops.concatenate(parts, 0), lead + trail)
    parts = [ops.reshape(c, lead + (1,)) for c in cols]
    return ops.reshape(ops.concatenate(parts, len(lead)), lead + trail)


def _jac_graph(g: Graph, name: str, body) -> Graph:
    """A graph with ``g``'s inputs whose outputs ``body(user_inputs, captured)`` emits."""
    from .core import Builder
    from .ir.passes import simplify
    ncap = g.num_captured
    nuser = len(g.inputs) - ncap
    b = Builder(name)
    with b:
        prim_in = [b.new_input(v.type) for v in g.inputs[:nuser]]
        cap_in = [b.new_input(v.type) for v in g.inputs[nuser:]]
        atoms = [b.atom(x) for x in body(prim_in, cap_in)]
    return simplify(Graph(b.inputs, b.eqns, atoms, name=name, num_captured=ncap))


def _jacfwd_outputs(g: Graph, mask, sel, name, fname, opts) -> Graph:
    from .core import inline
    fed = _communicates(g)
    for k in sel:
        if g.inputs[k].type.placement is CLIENTS and fed:
            raise DifferentiationError(
                f"jacfwd of {fname}: w.r.t. the client argument {g.inputs[k].type} of a function "
                f"that communicates ({', '.join(fed)}): every client's input reaches every "
                "output through the aggregation, so per-client columns need one forward pass "
                "per client; use fad.jacrev (or fad.grad) for client arguments")
    for k in sel:
        if None in g.inputs[k].type.shape:
            raise DifferentiationError(
                f"jacfwd of {fname}: the argument leaf {g.inputs[k].type} has a ragged "
                "dimension (?); forward mode needs a static number of input elements (one "
                "direction each); use fad.jacrev")
    dirs = [(k, j) for k in sel for j in range(g.inputs[k].type.tensor.size())]
    if not dirs:
        raise DifferentiationError(f"jacfwd of {fname}: the arguments have no elements")
    nout = len(g.outputs)
    jg = forward.jvp_graph(g, mask, len(dirs))

    def body(prim_in, cap_in):
        tangents = []
        for dk, dj in dirs:
            for k in sel:
                t = g.inputs[k].type.tensor
                e = _one_hot(t, dj) if k == dk else np.zeros(t.shape, t.dtype.np)
                tangents.append(_placed_like(e, prim_in[k]))
        outs = inline(jg, prim_in + tangents + cap_in)
        touts = [outs[nout * (d + 1):nout * (d + 2)] for d in range(len(dirs))]
        results = []
        for o, ot in enumerate(g.out_types):
            d = 0
            for k in sel:
                n = g.inputs[k].type.tensor.size()
                cols = [touts[d + j][o] for j in range(n)]
                results.append(_stack_columns(cols, ot.shape, g.inputs[k].type.shape, False))
                d += n
        return results

    return _jac_graph(g, name, body)


def _jacrev_outputs(g: Graph, mask, sel, name, fname, opts) -> Graph:
    from .core import inline
    fed = _communicates(g)
    for ot in g.out_types:
        if None in ot.shape or not ot.dtype.is_float:
            raise DifferentiationError(
                f"jacrev of {fname}: the output {ot} needs a static shape and a float dtype "
                "(one reverse pass per output element); use fad.jacfwd")
        if ot.placement is CLIENTS and fed:
            raise DifferentiationError(
                f"jacrev of {fname}: the output {ot} is one value per client and the function "
                f"communicates ({', '.join(fed)}): a cotangent seeded at every client sums "
                "their contributions; aggregate the output to the SERVER, or use fad.jacfwd "
                "(per-client Jacobians w.r.t. SERVER arguments)")
    if opts["mode"] == "reverse":
        vg = reverse.vjp_graph(g, mask, seed="inputs", state=opts["state"],
                               policy=opts["policy"], name=name)
    else:
        from .modes import mixed
        vg = mixed.mixed_vjp_graph(g, mask, seed="inputs", state=opts["state"],
                                   policy=opts["policy"], auto=(opts["mode"] == "auto"),
                                   name=name)
    outs_t = g.out_types

    def body(prim_in, cap_in):
        primal_outs = inline(g, prim_in + cap_in) if any(
            t.placement is CLIENTS for t in outs_t) else [None] * len(outs_t)
        rows = []           # rows[o][j] = cotangents of the selected inputs for element j of o
        for o, ot in enumerate(outs_t):
            per = []
            for j in range(ot.tensor.size()):
                cts = [_placed_like(_one_hot(t.tensor, j) if q == o else
                                    np.zeros(t.shape, t.dtype.np), primal_outs[q])
                       if t.placement is CLIENTS else
                       (_one_hot(t.tensor, j) if q == o else np.zeros(t.shape, t.dtype.np))
                       for q, t in enumerate(outs_t)]
                per.append(inline(vg, prim_in + cts + cap_in))
            rows.append(per)
        results = []
        for o, ot in enumerate(outs_t):
            for s, k in enumerate(sel):
                cols = [rows[o][j][s] for j in range(ot.tensor.size())]
                results.append(_stack_columns(cols, ot.shape, g.inputs[k].type.shape, True))
        return results

    return _jac_graph(g, name, body)
