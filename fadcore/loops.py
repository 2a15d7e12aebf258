"""Loops as primitives: ``fad.fori_loop`` and ``fad.scan`` hold a body graph, never unrolled.

One primitive, ``loop``, applies a *body graph* a number of times. Its operands are

    lower, upper, carry_1 .. carry_C, xs_1 .. xs_X, const_1 .. const_K

and its body graph takes ``(i, carry_1 .. carry_C, x_1 .. x_X, const_1 .. const_K)`` and returns
``(carry_1' .. carry_C', y_1 .. y_Y)``. Iteration ``i`` runs from ``lower`` to ``upper - 1``
(downwards with ``reverse=True``); ``x_j`` is ``xs_j[i - lower]`` and the per-step outputs
``y_j`` are stacked along a new leading axis of static size ``length`` (so a loop with per-step
outputs or sliced inputs has a static trip count). Consts are the body's captured values
(model data, hyper-parameters): read every step, never stacked.

The IR is single-output, so a loop with ``C + Y`` results is ``C + Y`` equations that differ
only in their ``out`` param and share one body graph object; every evaluator runs such a group
once (its equations are pure, so reading them as one loop is exact), the printer shows the
group as one multi-result equation, and CSE/DCE treat each result like any equation.

The index is ``i64[]``: at CLIENTS (all equal) when every carry lives at the clients (a local
loop: client code uses ``i`` without a broadcast), at SERVER otherwise, and per client
(``{i64[]}@CLIENTS``) when ``upper`` is a client-placed integer (each client its own count).
"""

from __future__ import annotations

import numpy as np

from . import pytree
from .core import Builder, Primitive, Tracer, at_source, bind, current_builder, user_source
from .errors import DTypeError, PlacementError, ShapeError, TracingError, VerificationError
from .ir.graph import Graph, Literal, Var
from .ir.primitives import Comm, CostClass
from .ir.types import CLIENTS, SERVER, FederatedType, TensorType, i64

__all__ = ["fori_loop", "scan", "loop_p", "is_loop", "group_key", "loop_groups", "has_loops",
           "trip_count"]

INDEX = TensorType(i64, ())


# --------------------------------------------------------------------------- the primitive

def _compatible(op: FederatedType, slot: FederatedType) -> bool:
    """An operand of type ``op`` may fill a body input of type ``slot`` (all-equal client values
    may enter a slot whose members may differ)."""
    return (op.tensor == slot.tensor and op.placement is slot.placement
            and (op.all_equal or not slot.all_equal))


def _stacked(t: FederatedType, length: int) -> FederatedType:
    return FederatedType(t.tensor.with_shape((length,) + t.tensor.shape), t.placement,
                         t.all_equal)


def _sliced(t: FederatedType) -> FederatedType:
    return FederatedType(t.tensor.with_shape(t.tensor.shape[1:]), t.placement, t.all_equal)


def _loop_type(*types, body, num_carry, num_xs, length, reverse, out):
    if not isinstance(body, Graph):
        raise VerificationError(f"loop: body is a {type(body).__name__}, not a graph")
    for name, v in (("num_carry", num_carry), ("num_xs", num_xs), ("out", out)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise VerificationError(f"loop: {name} must be a non-negative int, got {v!r}")
    if length is not None and (not isinstance(length, int) or isinstance(length, bool)
                               or length < 0):
        raise VerificationError(f"loop: length must be None or a non-negative int, got {length!r}")
    if not isinstance(reverse, bool):
        raise VerificationError(f"loop: reverse must be a bool, got {reverse!r}")
    nops = len(types)
    nk = nops - 2 - num_carry - num_xs
    if nk < 0:
        raise VerificationError(f"loop: {nops} operands for {num_carry} carries and {num_xs} xs")
    if len(body.inputs) != 1 + nops - 2:
        raise VerificationError(f"loop: the body takes {len(body.inputs)} inputs, the loop "
                                f"gives it {1 + nops - 2} (index, carries, xs, consts)")
    ny = len(body.outputs) - num_carry
    if ny < 0:
        raise VerificationError(f"loop: the body returns {len(body.outputs)} values for "
                                f"{num_carry} carries")
    if out >= num_carry + ny:
        raise VerificationError(f"loop: result {out} of a loop with {num_carry + ny} results")
    if body.num_captured:
        raise VerificationError("loop: a body graph lists its captured values as consts")
    lo, hi = types[0], types[1]
    for nm, t in (("lower", lo), ("upper", hi)):
        if t.tensor != INDEX:
            raise DTypeError(f"loop: {nm} must be an i64 scalar, got {t}")
    if lo.placement is CLIENTS and not lo.all_equal:
        raise PlacementError("loop: lower must be the same for every client")
    idx = body.in_types[0]
    per_client = hi.placement is CLIENTS and not hi.all_equal
    if idx.tensor != INDEX or (per_client and idx != FederatedType(INDEX, CLIENTS, False)) or (
            not per_client and not idx.all_equal):
        raise VerificationError(f"loop: the body's index is {idx}; it must be i64[] "
                                f"({'per client' if per_client else 'all equal'})")
    if (num_xs or ny) and (length is None or per_client):
        raise VerificationError("loop: sliced inputs and stacked outputs need a static trip "
                                "count (length)")
    _verify_body(body)
    slots = body.in_types
    for k in range(num_carry):
        op, slot, res = types[2 + k], slots[1 + k], body.out_types[k]
        if not _compatible(op, slot):
            raise VerificationError(f"loop: carry {k} enters as {op} but the body takes {slot}")
        if not _compatible(res, slot):
            raise VerificationError(f"loop: the body returns carry {k} as {res} but takes {slot}")
    for j in range(num_xs):
        op, slot = types[2 + num_carry + j], slots[1 + num_carry + j]
        if op.tensor.ndim == 0 or op.tensor.shape[0] != length or not _compatible(
                _sliced(op), slot):
            raise VerificationError(f"loop: xs {j} is {op}; the body takes slices {slot} of "
                                    f"{length} steps")
    for j in range(nk):
        op, slot = types[2 + num_carry + num_xs + j], slots[1 + num_carry + num_xs + j]
        if not _compatible(op, slot):
            raise VerificationError(f"loop: const {j} is {op} but the body takes {slot}")
    if out < num_carry:
        return slots[1 + out]
    return _stacked(body.out_types[out], length)


def _verify_body(body: Graph) -> None:
    if body._lowered.get("loop-verified"):
        return
    from .ir.verifier import verify
    try:
        verify(body)
    except VerificationError as err:
        raise VerificationError(f"loop body {body.name}: {err}") from None
    body._lowered["loop-verified"] = True


loop_p = Primitive("loop", Comm.CONTROL, type_rule=_loop_type, cost=CostClass.FREE)


def is_loop(e) -> bool:
    return e.prim is loop_p


def group_key(e) -> tuple:
    """Equations with the same key are results of one loop."""
    p = e.params
    return (id(p["body"]), p["num_carry"], p["num_xs"], p["length"], p["reverse"],
            tuple(a.key() if isinstance(a, Literal) else id(a) for a in e.inputs))


def loop_groups(eqns) -> dict:
    """group key -> the loop equations of ``eqns`` in that group (in order)."""
    groups: dict = {}
    for e in eqns:
        if e.prim is loop_p:
            groups.setdefault(group_key(e), []).append(e)
    return groups


def communicates(g: Graph) -> bool:
    """Whether a graph (loop bodies included) moves values between placements."""
    return any(e.prim.communicates or e.prim.comm is Comm.CARDINALITY
               or (e.prim is loop_p and communicates(e.params["body"])) for e in g.eqns)


def has_loops(g: Graph) -> bool:
    hit = g._lowered.get("has-loops")
    if hit is None:
        hit = g._lowered["has-loops"] = any(e.prim is loop_p for e in g.eqns)
    return hit


def trip_count(e) -> int | None:
    """The static trip count of a loop equation, or None when it is only known at run time."""
    if e.params["length"] is not None:
        return e.params["length"]
    lo, hi = e.inputs[0], e.inputs[1]
    if isinstance(lo, Literal) and isinstance(hi, Literal):
        return max(0, int(hi.value) - int(lo.value))
    return None


def counts(e) -> dict:
    """What a cost report says about a loop's trip count (static, or the bounds as given)."""
    n = trip_count(e)
    return {"trips": n} if n is not None else {"trips": None}


# --------------------------------------------------------------------------- tracing bodies

def _type_of(x, src) -> FederatedType:
    if isinstance(x, Tracer):
        return x.type
    from .core import to_literal
    lit = to_literal(x)
    return FederatedType(lit.type, SERVER, True)


def _trace_body(fn, in_types: list[FederatedType], name: str):
    """Trace ``fn(*tracers) -> list of leaves`` into a closed graph.
    Returns (graph, consts): the outer values the body captured, appended as its last inputs."""
    b = Builder(name)
    with b:
        tracers = [b.new_input(t) for t in in_types]
        outs = fn(*tracers)
        atoms = []
        for k, x in enumerate(outs):
            atoms.append(b.atom(x))
    captured = list(b.captured.values())
    g = Graph(b.inputs + [v for _, v in captured], b.eqns, atoms, name=name)
    return g, [t for t, _ in captured]


def _check_carry(k: int, path: str, t_in: FederatedType, t_out, what: str, src) -> None:
    where = at_source(src)
    if isinstance(t_out, TensorType):
        t_out = FederatedType(t_out, SERVER, True)
    if t_out.tensor.dtype is not t_in.tensor.dtype:
        raise DTypeError(f"{what}: the body changes the dtype of carry {path} from {t_in} to "
                         f"{t_out}{where}; a loop carry keeps its type (cast the initial value)")
    if t_out.tensor.shape != t_in.tensor.shape:
        raise ShapeError(f"{what}: the body changes the shape of carry {path} from {t_in} to "
                         f"{t_out}{where}; a loop carry keeps its shape")
    if t_out.placement is not t_in.placement:
        raise PlacementError(f"{what}: the body moves carry {path} from {t_in} to {t_out}"
                             f"{where}; a loop carry keeps its placement (aggregate or "
                             "broadcast inside the body and carry the value at one placement)")


def _leaf_paths(tree) -> list[str]:
    """Printable paths of a tree's leaves, e.g. ``[0]``, ``['w']``."""
    out: list[str] = []

    def walk(t, path):
        kind = t[0]
        if kind == "leaf":
            out.append(path or "(the carry)")
        elif kind in ("tuple", "list"):
            for i, c in enumerate(t[1]):
                walk(c, f"{path}[{i}]")
        elif kind == "dict":
            for k, c in zip(t[1], t[2]):
                walk(c, f"{path}[{k!r}]")
    walk(tree, "")
    return out


def _int_bound(x, name: str, what: str, src):
    """A loop bound: a Python/NumPy int (static) or an integer scalar traced value."""
    if isinstance(x, (bool, np.bool_)):
        raise DTypeError(f"{what}: {name} must be an integer, got {x!r}{at_source(src)}")
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, np.ndarray) and x.shape == () and x.dtype.kind in "iu":
        return int(x)
    if isinstance(x, Tracer):
        t = x.type
        if not t.dtype.is_int or t.shape != ():
            raise DTypeError(f"{what}: {name} must be an integer scalar, got the traced value "
                             f"{t}{at_source(src)}")
        if t.dtype is not i64:
            from .numpy import astype
            x = astype(x, "int64")
        return x
    raise DTypeError(f"{what}: {name} must be an integer, got {type(x).__name__} {x!r}"
                     f"{at_source(src)}")


def _any_tracer(*trees) -> bool:
    for t in trees:
        leaves, _ = pytree.flatten(t)
        if any(isinstance(x, Tracer) for x in leaves):
            return True
    return False


def _emit(what: str, lower, upper, init_leaves, init_tree, xs_leaves, length, body_fn, src,
          index_at_clients: bool, ys_tree_box: list):
    """Trace the body (widening all-equal carries that stop being all equal), emit the loop
    equations and return (carry leaves, y leaves)."""
    paths = _leaf_paths(init_tree)
    init_types = [_type_of(x, src) for x in init_leaves]
    slot_types = list(init_types)
    x_types = [_sliced(_type_of(x, src)) for x in xs_leaves]
    per_client = isinstance(upper, Tracer) and upper.placement is CLIENTS and not \
        upper.type.all_equal
    if per_client:
        idx_t = FederatedType(INDEX, CLIENTS, False)
    elif index_at_clients:
        idx_t = FederatedType(INDEX, CLIENTS, True)
    else:
        idx_t = FederatedType(INDEX, SERVER, True)
    for _attempt in range(2):
        body, consts = _trace_body(body_fn, [idx_t] + slot_types + x_types, f"{what}_body")
        out_types = body.out_types
        widened = False
        for k, (t_in, t_out) in enumerate(zip(slot_types, out_types)):
            _check_carry(k, paths[k], t_in, t_out, f"fad.{what}", src)
            if t_in.all_equal and not t_out.all_equal:
                slot_types[k] = FederatedType(t_in.tensor, t_in.placement, False)
                widened = True
        if not widened:
            break
    nc, nx = len(init_leaves), len(xs_leaves)
    ny = len(body.outputs) - nc
    if (nx or ny) and per_client:
        raise ShapeError(f"fad.{what}: a loop with per-client trip counts cannot slice xs or "
                         f"stack per-step outputs{at_source(src)}")
    if per_client and communicates(body):
        raise PlacementError(f"fad.{what}: a loop with per-client trip counts runs at each "
                             f"client alone; its body cannot communicate{at_source(src)}")
    from .core import to_literal
    operands = [x if isinstance(x, Tracer) else to_literal(x)
                for x in [lower, upper] + list(init_leaves) + list(xs_leaves) + consts]
    params = dict(body=body, num_carry=nc, num_xs=nx, length=length, reverse=False)
    from .core import source_scope
    with source_scope(src):
        outs = [bind(loop_p, *operands, **params, out=j) for j in range(nc + ny)]
    b = current_builder()
    members = b.eqns[len(b.eqns) - len(outs):]
    if outs and all(m.prim is loop_p and m.out is o.var for m, o in zip(members, outs)):
        pre, new = hoist_invariants(members)     # loop-invariant work runs once, before it
        if pre:
            b.eqns[len(b.eqns) - len(outs):] = pre + new
    return outs[:nc], outs[nc:]


# --------------------------------------------------------------------------- fori_loop

def fori_loop(lower, upper, body_fun, init_val):
    """``body_fun(i, val) -> val`` for ``i`` in ``range(lower, upper)``, as one loop equation.

    As ``jax.lax.fori_loop``: ``init_val`` may be a pytree; the body must return a value of the
    same structure, types and placements. ``lower``/``upper`` are ints (a static trip count) or,
    for ``upper``, an integer scalar traced value: at SERVER (one count for everyone) or at
    CLIENTS (each client runs its own number of steps, 0 included)."""
    src = user_source()
    lo = _int_bound(lower, "lower", "fad.fori_loop", src)
    hi = _int_bound(upper, "upper", "fad.fori_loop", src)
    if isinstance(lo, Tracer):
        raise DTypeError(f"fad.fori_loop: lower must be a Python int (only upper may be a "
                         f"traced count){at_source(src)}")
    if not isinstance(hi, Tracer) and hi < lo:
        raise ShapeError(f"fad.fori_loop: negative trip count: upper={hi} < lower={lo}"
                         f"{at_source(src)}")
    if current_builder() is None and not _any_tracer(init_val, hi):
        val = init_val
        for i in range(lo, hi):
            val = body_fun(np.int64(i), val)
        return val
    leaves, tree = pytree.flatten(init_val)
    at_clients = bool(leaves) and all(isinstance(x, Tracer) and x.placement is CLIENTS
                                      for x in leaves)

    def body_fn(i, *carry):
        out = body_fun(i, pytree.unflatten(tree, carry))
        out_leaves, out_tree = pytree.flatten(out)
        if out_tree != tree:
            raise TracingError(f"fad.fori_loop: the body returns a {pytree.tree_str(out_tree)} "
                               f"but the carry is a {pytree.tree_str(tree)}{at_source(src)}")
        return out_leaves

    length = None if isinstance(hi, Tracer) else hi - lo
    carry, _ = _emit("fori_loop", lo, hi, leaves, tree, [], length, body_fn, src, at_clients, [])
    return pytree.unflatten(tree, carry)


# --------------------------------------------------------------------------- scan

def scan(f, init, xs=None, length=None, reverse=False):
    """``f(carry, x) -> (carry, y)`` over the leading axis of ``xs``, as ``jax.lax.scan``.

    Returns ``(final carry, ys)`` with the ``y``s stacked along a new leading axis. ``xs`` (a
    pytree of arrays, or None with ``length``) is sliced along its leading axis."""
    src = user_source()
    if reverse:
        raise TracingError(f"fad.scan: reverse=True is not supported yet{at_source(src)}")
    x_leaves, x_tree = pytree.flatten(xs)
    lens = set()
    for x in x_leaves:
        shape = x.shape if isinstance(x, Tracer) else np.shape(x)
        if len(shape) == 0:
            raise ShapeError(f"fad.scan: xs must have a leading axis to slice, got a scalar"
                             f"{at_source(src)}")
        if shape[0] is None:
            raise ShapeError(f"fad.scan: xs with a ragged (per-client) leading axis are not "
                             f"supported yet{at_source(src)}")
        lens.add(int(shape[0]))
    if length is not None:
        length = _int_bound(length, "length", "fad.scan", src)
        if isinstance(length, Tracer):
            raise DTypeError(f"fad.scan: length must be a Python int{at_source(src)}")
        if length < 0:
            raise ShapeError(f"fad.scan: negative length {length}{at_source(src)}")
        lens.add(length)
    if not lens:
        raise ShapeError(f"fad.scan: give xs or length{at_source(src)}")
    if len(lens) > 1:
        raise ShapeError(f"fad.scan: xs leading axes and length disagree: {sorted(lens)}"
                         f"{at_source(src)}")
    n = lens.pop()
    if current_builder() is None and not _any_tracer(init, xs):
        carry, ys = init, []
        for i in range(n):
            x = pytree.unflatten(x_tree, [np.asarray(v)[i] for v in x_leaves])
            carry, y = f(carry, x)
            ys.append(y)
        if not ys:
            raise TracingError("fad.scan: zero steps outside a trace give no per-step output "
                               "structure; call it inside a traced function")
        y_leaves = [pytree.flatten(y)[0] for y in ys]
        stacked = [np.stack([np.asarray(l[j]) for l in y_leaves]) for j in range(len(y_leaves[0]))]
        return carry, pytree.unflatten(pytree.flatten(ys[0])[1], stacked)
    leaves, tree = pytree.flatten(init)
    at_clients = bool(leaves) and all(isinstance(x, Tracer) and x.placement is CLIENTS
                                      for x in leaves)
    nc = len(leaves)
    y_tree_box: list = []

    def body_fn(i, *args):
        carry, x = args[:nc], args[nc:]
        res = f(pytree.unflatten(tree, carry), pytree.unflatten(x_tree, x))
        if not (isinstance(res, tuple) and len(res) == 2):
            raise TracingError(f"fad.scan: the body must return a pair (carry, y)"
                               f"{at_source(src)}")
        c, y = res
        c_leaves, c_tree = pytree.flatten(c)
        if c_tree != tree:
            raise TracingError(f"fad.scan: the body returns a carry {pytree.tree_str(c_tree)} "
                               f"but the carry is a {pytree.tree_str(tree)}{at_source(src)}")
        y_leaves, y_tree = pytree.flatten(y)
        y_tree_box[:] = [y_tree]
        return c_leaves + y_leaves

    carry, ys = _emit("scan", 0, n, leaves, tree, x_leaves, n, body_fn, src, at_clients,
                      y_tree_box)
    return pytree.unflatten(tree, carry), pytree.unflatten(y_tree_box[0], ys)


# --------------------------------------------------------------------------- reference evaluator

def _eval_loop(e, args, n, rows, memo):
    """Reference rule: run the group's loop once per evaluation, as a Python loop."""
    key = group_key(e)
    hit = memo.get(key)
    if hit is None:
        hit = memo[key] = _run_loop(e, args, n, rows)
    return hit[e.params["out"]]


def _at_clients(a) -> bool:
    return isinstance(a, Var) and a.type.placement is CLIENTS


def _scalar(v) -> int:
    return int(v[0]) if isinstance(v, list) else int(v)


def _where(e) -> str:
    return f" (from {e.source})" if e.source else ""


def _run_loop(e, args, n, rows) -> list:
    from .backends.reference import evaluate
    p = e.params
    body, nc, nx = p["body"], p["num_carry"], p["num_xs"]
    if body.in_types[0].placement is CLIENTS and not body.in_types[0].all_equal:
        # per-client trip counts: every client runs its own loop, alone
        lo = _scalar(args[0])
        per = []
        for c in range(n):
            vals = [[v[c]] if _at_clients(a) else v for a, v in zip(e.inputs, args)]
            r = None if rows is None else rows[c:c + 1]
            count = int(vals[1][0]) - lo
            if count < 0:
                raise ShapeError(f"loop{_where(e)}: client {c} has a negative trip count "
                                 f"({count})")
            per.append(_steps(e, body, nc, nx, lo, count, vals, 1, r, evaluate))
        return [[per[c][k][0] for c in range(n)] for k in range(len(body.outputs))]
    lo, hi = _scalar(args[0]), _scalar(args[1])
    count = hi - lo
    if count < 0:
        raise ShapeError(f"loop{_where(e)}: negative trip count (upper {hi} < lower {lo})")
    if p["length"] is not None and count != p["length"]:
        raise ShapeError(f"loop{_where(e)}: {count} steps but the loop stacks {p['length']}")
    return _steps(e, body, nc, nx, lo, count, args, n, rows, evaluate)


def _steps(e, body, nc, nx, lo, count, args, n, rows, evaluate) -> list:
    idx_clients = body.in_types[0].placement is CLIENTS
    carry = list(args[2:2 + nc])
    xs = args[2 + nc:2 + nc + nx]
    x_client = [_at_clients(a) for a in e.inputs[2 + nc:2 + nc + nx]]
    consts = list(args[2 + nc + nx:])
    ny = len(body.outputs) - nc
    ys: list = [[None] * count for _ in range(ny)]
    order = range(count - 1, -1, -1) if e.params["reverse"] else range(count)
    for k in order:
        i = np.int64(lo + k)
        xk = [[m[k] for m in x] if c else x[k] for x, c in zip(xs, x_client)]
        outs = evaluate(body, [[i] * n if idx_clients else i] + carry + xk + consts, n, rows)
        carry = outs[:nc]
        for j in range(ny):
            ys[j][k] = outs[nc + j]
    stacked = []
    for j, t in enumerate(body.out_types[nc:]):
        if t.placement is CLIENTS:
            stacked.append([_stack([s[c] for s in ys[j]], t, None if rows is None
                                   else int(rows[c])) for c in range(n)])
        else:
            stacked.append(_stack(ys[j], t, None))
    return carry + stacked


def _stack(items, t, r):
    if items:
        return np.stack([np.asarray(x) for x in items])
    return np.zeros((0,) + tuple(t.tensor.concrete_shape(r) if r is not None else t.shape),
                    dtype=t.dtype.np)


def _register() -> None:
    from .backends import reference
    reference.eqn_impls[loop_p] = _eval_loop


_register()


# --------------------------------------------------------------------------- forward mode

def _tangent_live(body: Graph, mask: list[bool]) -> list[bool]:
    """Which outputs of ``body`` may have a nonzero tangent when the inputs in ``mask`` do."""
    live = {v for v, m in zip(body.inputs, mask) if m}
    for e in body.eqns:
        if e.prim.differentiable and any(isinstance(a, Var) and a in live for a in e.inputs):
            live.add(e.out)
    return [isinstance(a, Var) and a in live for a in body.outputs]


def _floating(t: FederatedType) -> bool:
    return t.tensor.dtype.is_float


def _widen(t: FederatedType, all_equal: bool) -> FederatedType:
    return t if t.all_equal == all_equal else FederatedType(t.tensor, t.placement, all_equal)


def _jvp_body(body: Graph, nc: int, nx: int, mask: tuple, tslots: tuple) -> Graph:
    """The body of a loop's JVP: inputs (i, carries, carry tangents, xs, x tangents, consts,
    const tangents), outputs (carries, carry tangents, ys, y tangents); tangents only where
    ``mask`` says (index 0 is the loop index, never differentiated). Cached on the body."""
    key = ("loop-jvp", mask, tslots)
    hit = body._lowered.get(key)
    if hit is not None:
        return hit
    from .modes.forward import emit_jvp
    from .ops import Zero, instantiate
    slots = body.in_types
    b = Builder(f"jvp_{body.name}")
    tslot = iter(tslots)
    with b:
        prim_in, tan_in = [None] * len(slots), [None] * len(slots)
        groups = [(1, 1 + nc), (1 + nc, 1 + nc + nx), (1 + nc + nx, len(slots))]
        prim_in[0] = b.new_input(slots[0])
        for lo, hi in groups:
            for k in range(lo, hi):
                prim_in[k] = b.new_input(slots[k])
            for k in range(lo, hi):
                if mask[k]:
                    tan_in[k] = b.new_input(next(tslot))
        tangents = [t if t is not None else Zero(s) for t, s in zip(tan_in, slots)]
        outs, (touts,) = emit_jvp(body, prim_in, [tangents])
        carry_t = [instantiate(touts[k], outs[k]) for k in range(nc) if mask[1 + k]]
        ys_t = [instantiate(t, o) for t, o in zip(touts[nc:], outs[nc:])]
        results = outs[:nc] + carry_t + outs[nc:] + ys_t
        atoms = [b.atom(x) for x in results]
    if b.captured:
        raise VerificationError("loop: the JVP of a body captured outer values")
    g = Graph(b.inputs, b.eqns, atoms, name=b.name)
    from .ir.passes import simplify
    g = simplify(g)
    body._lowered[key] = g
    return g


def _loop_jvp(primals, tangents, *, body, num_carry, num_xs, length, reverse, out):
    from .ops import instantiate, is_zero, Zero, tensor_type
    nc, nx = num_carry, num_xs
    slots = body.in_types
    nz = [False] + [not is_zero(t) for t in tangents[2:]]
    floating = [False] + [_floating(t) for t in slots[1:]]
    mask = [a and b for a, b in zip(nz, floating)]
    while True:                      # carries whose tangent becomes nonzero in some step
        live = _tangent_live(body, mask)
        new = list(mask)
        for k in range(nc):
            new[1 + k] = mask[1 + k] or (live[k] and floating[1 + k])
        if new == mask:
            break
        mask = new
    # tangent operands, and the body input types they fill (wider if they differ by client)
    t_ops, tslots = [], []
    for k in range(1, len(slots)):
        if mask[k]:
            t = instantiate(tangents[1 + k], primals[1 + k])
            t_ops.append(t)
            tt = getattr(t, "type", None)
            ae = slots[k].all_equal and (not isinstance(tt, FederatedType) or tt.all_equal)
            tslots.append(_widen(slots[k], ae))
    while True:                      # carry tangents that stop being all-equal widen
        jbody = _jvp_body(body, nc, nx, tuple(mask), tuple(tslots))
        nct = sum(mask[1:1 + nc])
        widened = False
        for p, (slot_t, out_t) in enumerate(zip(tslots[:nct], jbody.out_types[nc:nc + nct])):
            if slot_t.all_equal and not out_t.all_equal:
                tslots[p] = _widen(slot_t, False)
                widened = True
        if not widened:
            break
    ny = len(body.outputs) - nc
    nxt = sum(mask[1 + nc:1 + nc + nx])
    it = iter(t_ops)
    ct_ops = [next(it) for k in range(nc) if mask[1 + k]]
    xt_ops = [next(it) for k in range(nx) if mask[1 + nc + k]]
    kt_ops = list(it)
    carries = list(primals[2:2 + nc])
    xs = list(primals[2 + nc:2 + nc + nx])
    consts = list(primals[2 + nc + nx:])
    ops_ = [primals[0], primals[1]] + carries + ct_ops + xs + xt_ops + consts + kt_ops
    params = dict(body=jbody, num_carry=nc + nct, num_xs=nx + nxt, length=length,
                  reverse=reverse)
    if out < nc:
        p_out = bind(loop_p, *ops_, **params, out=out)
        if not mask[1 + out]:
            return p_out, Zero(tensor_type(p_out))
        return p_out, bind(loop_p, *ops_, **params, out=nc + sum(mask[1:1 + out]))
    j = out - nc
    p_out = bind(loop_p, *ops_, **params, out=nc + nct + j)
    return p_out, bind(loop_p, *ops_, **params, out=nc + nct + ny + j)




# --------------------------------------------------------------------------- reverse mode
# Reverse mode linearizes (the JVP graph), splits it into known and linear equations, then
# transposes the linear ones. A JVP loop mixes both, so before the split every loop with
# tangent operands is *partially evaluated* into
#   - a known loop: the primal work, which also stacks the residuals the tangents need
#     (one slice per step: the forward loop "stores residuals"), and
#   - a linear loop: the tangent work, reading the residuals as sliced inputs.
# The linear loop's transpose is a loop running backwards over the same residuals.

def partial_eval_loops(jg: Graph, tangent_inputs) -> Graph:
    """Split every loop of ``jg`` that has tangent (linear) operands into a known loop and a
    linear loop (see above). Other equations are kept as they are."""
    if not has_loops(jg):
        return jg
    from .ir.graph import Eqn
    lin = set(tangent_inputs)
    groups = loop_groups(jg.eqns)
    eqns: list = []
    done = set()
    for e in jg.eqns:
        if e.prim is loop_p:
            key = group_key(e)
            if key in done:
                continue
            done.add(key)
            pre, members = hoist_invariants(groups[key])
            for x in pre:
                if any(isinstance(a, Var) and a in lin for a in x.inputs):
                    lin.add(x.out)
                eqns.append(x)
            e = members[0]
            if any(isinstance(a, Var) and a in lin for a in e.inputs):
                members = _split_loop(members, lin)
            for m in members:
                if any(isinstance(a, Var) and a in lin for a in m.inputs):
                    lin.add(m.out)
            eqns.extend(members)
            continue
        if any(isinstance(a, Var) and a in lin for a in e.inputs):
            lin.add(e.out)
        eqns.append(e)
    return jg.replace(eqns=eqns)


def _dependents(body: Graph, unknown_inputs: set) -> set:
    lin = set(unknown_inputs)
    for e in body.eqns:
        if any(isinstance(a, Var) and a in lin for a in e.inputs):
            lin.add(e.out)
    return lin


def _split_loop(members: list, lin: set) -> list:
    from .errors import DifferentiationError
    from .ir.graph import Eqn
    e0 = members[0]
    p = e0.params
    body, nc, nx, length = p["body"], p["num_carry"], p["num_xs"], p["length"]
    ops_ = list(e0.inputs)
    nin = len(body.inputs)
    if any(isinstance(a, Var) and a in lin for a in ops_[:2]):
        raise DifferentiationError("loop: the trip count cannot depend on a differentiated value")
    if length is None or body.in_types[0].placement is CLIENTS and not \
            body.in_types[0].all_equal:
        raise DifferentiationError(
            f"reverse mode through a loop with a run-time trip count{_where(e0)} is not "
            "supported yet (it needs the residuals of a static number of steps); use "
            "mode='forward' or a static trip count")
    unknown = [False] + [isinstance(a, Var) and a in lin for a in ops_[2:]]
    orig = body
    while True:
        # loops nested in the body are split first, so their primal results stay known
        unknown_in = [v for v, u in zip(orig.inputs, unknown) if u]
        body = partial_eval_loops(orig, unknown_in)
        dep = _dependents(body, set(unknown_in))
        new = list(unknown)
        for k in range(nc):
            a = body.outputs[k]
            new[1 + k] = unknown[1 + k] or (isinstance(a, Var) and a in dep)
        if new == unknown:
            break
        unknown = new
    ny = len(body.outputs) - nc
    out_unknown = [isinstance(a, Var) and a in dep for a in body.outputs]
    for k in range(nc):
        out_unknown[k] = unknown[1 + k]
    known_eqns = [be for be in body.eqns if be.out not in dep]
    lin_eqns = [be for be in body.eqns if be.out in dep]
    # residuals: known values the linear equations (or unknown outputs) read
    used = []
    for be in lin_eqns:
        used += [a for a in be.inputs if isinstance(a, Var) and a not in dep]
    used += [a for a, u in zip(body.outputs, out_unknown) if u and isinstance(a, Var)
             and a not in dep]
    used = list(dict.fromkeys(used))
    in_pos = {v: k for k, v in enumerate(body.inputs)}
    res_const = [v for v in used if v in in_pos and in_pos[v] >= 1 + nc + nx]
    res_x = [v for v in used if v in in_pos and 1 + nc <= in_pos[v] < 1 + nc + nx]
    res_stack = [v for v in used if (v not in in_pos) or 1 <= in_pos[v] < 1 + nc]
    # ---- the known loop: known carries, known xs, known consts; stacks the residuals
    kc = [k for k in range(nc) if not unknown[1 + k]]
    kx = [j for j in range(nx) if not unknown[1 + nc + j]]
    kk = [j for j in range(nin - 1 - nc - nx) if not unknown[1 + nc + nx + j]]
    k_inputs = ([body.inputs[0]] + [body.inputs[1 + k] for k in kc]
                + [body.inputs[1 + nc + j] for j in kx] + [body.inputs[1 + nc + nx + j] for j in kk])
    kys = [j for j in range(ny) if not out_unknown[nc + j]]
    k_outputs = ([body.outputs[k] for k in kc] + [body.outputs[nc + j] for j in kys]
                 + res_stack)
    kbody = Graph(k_inputs, known_eqns, k_outputs, name=f"{body.name}_known")
    from .ir.passes import simplify
    kbody = simplify(kbody)
    k_ops = ([ops_[0], ops_[1]] + [ops_[2 + k] for k in kc] + [ops_[2 + nc + j] for j in kx]
             + [ops_[2 + nc + nx + j] for j in kk])
    by_out = {m.params["out"]: m for m in members}
    kparams = dict(body=kbody, num_carry=len(kc), num_xs=len(kx), length=length,
                   reverse=p["reverse"])
    out_eqns = []
    k_types = [a.type if isinstance(a, Var) else FederatedType(a.type, SERVER, True)
               for a in k_ops]

    def emit(params, operands, types, j, var=None):
        t = _loop_type(*types, **params, out=j)
        v = var if var is not None else Var(t)
        if var is not None and var.type != t:
            raise DifferentiationError(f"loop: partial evaluation changed a result type "
                                       f"({var.type} -> {t})")
        out_eqns.append(Eqn(loop_p, operands, v, {**params, "out": j}, e0.source))
        return v

    for pos, k in enumerate(kc):
        if k in by_out:
            emit(kparams, k_ops, k_types, pos, by_out[k].out)
    for pos, j in enumerate(kys):
        if nc + j in by_out:
            emit(kparams, k_ops, k_types, len(kc) + pos, by_out[nc + j].out)
    stacks = [emit(kparams, k_ops, k_types, len(kc) + len(kys) + r) for r in range(len(res_stack))]
    # ---- the linear loop: unknown carries; unknown xs + stacked residuals + known xs it
    # reads; unknown consts + known consts it reads
    uc = [k for k in range(nc) if unknown[1 + k]]
    ux = [j for j in range(nx) if unknown[1 + nc + j]]
    uk = [j for j in range(nin - 1 - nc - nx) if unknown[1 + nc + nx + j]]
    sub = {}
    l_inputs = [Var(body.in_types[0])]
    sub[body.inputs[0]] = l_inputs[0]
    for k in uc:
        v = body.inputs[1 + k]
        l_inputs.append(v)
    for j in ux:
        l_inputs.append(body.inputs[1 + nc + j])
    for v in res_stack:
        nv = Var(v.type)
        sub[v] = nv
        l_inputs.append(nv)
    for v in res_x:
        l_inputs.append(v)
    for j in uk:
        l_inputs.append(body.inputs[1 + nc + nx + j])
    for v in res_const:
        l_inputs.append(v)
    # zero templates: a known client value of each client-placed unknown carry's type, so the
    # transpose can start that carry's cotangent at zero (unused by the body itself)
    templates = []
    for k in uc:
        t = body.in_types[1 + k]
        if t.placement is not CLIENTS or (len(uc) == 1 and not any(
                out_unknown[nc:])):
            continue
        have = [a for a in ops_[2:] if isinstance(a, Var) and a not in lin
                and a.type.placement is CLIENTS and a.type.tensor == t.tensor]
        if have and not any(x.type == have[0].type for x in templates):
            templates.append(have[0])
            l_inputs.append(Var(have[0].type))
    lys = [j for j in range(ny) if out_unknown[nc + j]]

    def s(a):
        return sub.get(a, a) if isinstance(a, Var) else a
    l_eqns = [Eqn(be.prim, tuple(s(a) for a in be.inputs), be.out, be.params, be.source)
              for be in lin_eqns]
    l_outputs = [s(body.outputs[k]) for k in uc] + [s(body.outputs[nc + j]) for j in lys]
    lbody = Graph(l_inputs, l_eqns, l_outputs, name=f"{body.name}_linear")
    l_ops = ([ops_[0], ops_[1]] + [ops_[2 + k] for k in uc] + [ops_[2 + nc + j] for j in ux]
             + stacks + [ops_[1 + in_pos[v]] for v in res_x]
             + [ops_[2 + nc + nx + j] for j in uk] + [ops_[1 + in_pos[v]] for v in res_const]
             + templates)
    lparams = dict(body=lbody, num_carry=len(uc), num_xs=len(ux) + len(stacks) + len(res_x),
                   length=length, reverse=p["reverse"])
    l_types = [a.type if isinstance(a, Var) else FederatedType(a.type, SERVER, True)
               for a in l_ops]
    for pos, k in enumerate(uc):
        if k in by_out:
            emit(lparams, l_ops, l_types, pos, by_out[k].out)
    for pos, j in enumerate(lys):
        if nc + j in by_out:
            emit(lparams, l_ops, l_types, len(uc) + pos, by_out[nc + j].out)
    lbody._lowered["loop-linear"] = (len(uc), len(ux), len(stacks) + len(res_x), len(uk))
    return out_eqns


def _loop_transpose(ct, *args, body, num_carry, num_xs, length, reverse, out, ctx=None):
    """Transpose of a linear loop (one result at a time: the loop is linear, so the
    contributions of its results add up). Runs backwards over the same residuals; ``ctx`` (the
    pass's :class:`~fadcore.ops.TransposeContext`) is handed to the body's transpose rules."""
    from .errors import DifferentiationError
    from .ops import TransposeContext, is_undefined, reduce_sum
    ctx = ctx if ctx is not None else TransposeContext()
    nc, nx = num_carry, num_xs
    nin = len(body.inputs)
    und = [False] + [is_undefined(a) for a in args[2:]]
    if length is None:
        raise DifferentiationError("loop: transposing a loop needs a static trip count")
    ny = len(body.outputs) - nc
    # which undefined inputs are linear in the body; the known ones are read as values
    key = ("loop-T", tuple(und), out, ctx.aggregation.name)
    T = body._lowered.get(key)
    if T is None:
        T = body._lowered[key] = _transpose_body(body, nc, nx, und, out, ctx)
    tbody, c_idx, x_idx, k_idx, zero_src = T
    # operands: ct carries (the result's ct for carry `out`, zeros for the others),
    # ct of ys (for `out` a y), the known xs and the known consts
    ct_carries = []
    for k in range(nc):
        if k == out:
            ct_carries.append(ct)
        else:
            ct_carries.append(_zeros(body.in_types[1 + k], args))
    x_ops = ([ct] if out >= nc else []) + [args[2 + nc + j] for j in range(nx) if not und[1 + nc + j]]
    k_ops = [args[2 + nc + nx + j] for j in range(nin - 1 - nc - nx) if not und[1 + nc + nx + j]]
    operands = [args[0], args[1]] + ct_carries + x_ops + k_ops
    params = dict(body=tbody, num_carry=nc, num_xs=len(x_ops), length=length,
                  reverse=not reverse)
    res = [None] * len(args)
    for k in range(nc):
        if und[1 + k]:
            res[2 + k] = bind(loop_p, *operands, **params, out=k)
    for pos, j in enumerate(x_idx):
        res[2 + nc + j] = bind(loop_p, *operands, **params, out=nc + pos)
    for pos, j in enumerate(k_idx):
        st = bind(loop_p, *operands, **params, out=nc + len(x_idx) + pos)
        res[2 + nc + nx + j] = reduce_sum(st, (0,))
    return res


def _zeros(t: FederatedType, args):
    """A zero cotangent of type ``t``: a literal at SERVER; at CLIENTS made from a known
    operand of that type (the linear loops made by the split carry one)."""
    from .core import Tracer
    from .ops import zeros_like
    if t.placement is SERVER:
        return np.zeros(t.shape, dtype=t.dtype.np)
    for a in args[2:]:
        if isinstance(a, Tracer) and a.type.placement is CLIENTS and a.type.tensor == t.tensor:
            return zeros_like(a)
    from .errors import DifferentiationError
    raise DifferentiationError(f"loop: no known value to build a zero cotangent of {t} from")


def _transpose_body(body, nc, nx, und, out, ctx):
    """The transposed body: inputs (i, ct carries, [ct of y `out`], known xs, known consts);
    outputs (ct carries before the step, cts of the linear xs, const ct contributions)."""
    from .modes.reverse import backpropagate
    from .ops import UndefinedPrimal, zeros_like
    nin = len(body.inputs)
    ny = len(body.outputs) - nc
    # carries are linear whatever their initial value (a known one is a zero tangent): their
    # values inside the loop are not residuals
    lin_inputs = {v for k, (v, u) in enumerate(zip(body.inputs, und)) if u or 1 <= k <= nc}
    lin = _dependents(body, lin_inputs)
    b = Builder(f"T_{body.name}")
    slots = body.in_types
    with b:
        i = b.new_input(slots[0])
        cts = [b.new_input(_widen(slots[1 + k], False) if slots[1 + k].placement is CLIENTS
                           else slots[1 + k]) for k in range(nc)]
        ct_y = None
        if out >= nc:
            t = body.out_types[out]
            ct_y = b.new_input(_widen(t, False) if t.placement is CLIENTS else t)
        env = {body.inputs[0]: i}
        for j in range(nx):
            if not und[1 + nc + j]:
                env[body.inputs[1 + nc + j]] = b.new_input(slots[1 + nc + j])
        for j in range(nin - 1 - nc - nx):
            if not und[1 + nc + nx + j]:
                env[body.inputs[1 + nc + nx + j]] = b.new_input(slots[1 + nc + nx + j])
        # known equations of the body (the linear body of a split has none, but be general)
        from .core import source_scope
        for be in body.eqns:
            if be.out not in lin:
                with source_scope(be.source):
                    env[be.out] = bind(be.prim, *[a.value if isinstance(a, Literal) else env[a]
                                                  for a in be.inputs], **be.params)

        def read(a):
            return a.value if isinstance(a, Literal) else env[a]
        ct_env: dict = {}
        from .modes.reverse import add_cotangents
        seeds = list(zip(body.outputs[:nc], cts))
        if ct_y is not None:
            seeds.append((body.outputs[out], ct_y))
        for a, c in seeds:
            if isinstance(a, Var) and a in lin:
                ct_env[a] = add_cotangents(ct_env.get(a), c)
        lin_eqns = [be for be in body.eqns if be.out in lin]
        backpropagate(lin_eqns, lin, read, ct_env, ctx=ctx)
        outs = []
        zero_src = {}
        for k in range(nc):
            c = ct_env.get(body.inputs[1 + k])
            outs.append(c if c is not None else zeros_like(cts[k]))
        x_idx, k_idx = [], []
        for j in range(nx):
            v = body.inputs[1 + nc + j]
            if und[1 + nc + j] and ct_env.get(v) is not None:
                x_idx.append(j)
                outs.append(ct_env[v])
        for j in range(nin - 1 - nc - nx):
            v = body.inputs[1 + nc + nx + j]
            if und[1 + nc + nx + j] and ct_env.get(v) is not None:
                k_idx.append(j)
                outs.append(ct_env[v])
        atoms = [b.atom(x) for x in outs]
    if b.captured:
        from .errors import DifferentiationError
        raise DifferentiationError("loop: the transposed body captured outer values")
    g = Graph(b.inputs, b.eqns, atoms, name=b.name)
    from .ir.passes import simplify
    return simplify(g), None, x_idx, k_idx, zero_src


def _register_rules() -> None:
    from .core import jvp_rules, transpose_rules
    jvp_rules[loop_p] = _loop_jvp
    _loop_transpose.uses_context = True     # receives the pass's TransposeContext
    transpose_rules[loop_p] = _loop_transpose
    from .modes.linearize import JVP_SPLITTERS
    JVP_SPLITTERS.append(partial_eval_loops)


_register_rules()


# --------------------------------------------------------------------------- loop-invariant code

def hoist_invariants(members: list) -> tuple[list, list]:
    """Move the local equations of a loop's body that read only its consts (loop-invariant
    values: a client's row count, ``1 / rows``, a transposed data matrix...) out of the loop.

    Returns (equations to put before the loop, the loop's new result equations): the hoisted
    values become new consts, computed once instead of every step (and, in reverse mode, read
    as consts instead of being stacked as residuals). Result variables are kept."""
    from .ir.graph import Eqn
    from .ir.primitives import infer_type
    e0 = members[0]
    p = e0.params
    body, nc, nx = p["body"], p["num_carry"], p["num_xs"]
    first = 1 + nc + nx
    if trip_count(e0) == 0:
        return [], members                   # nothing runs: nothing to compute once
    inv = set(body.inputs[first:])
    hoist = []
    for be in body.eqns:
        if (be.prim.comm is Comm.LOCAL and any(isinstance(a, Var) for a in be.inputs)
                and all(not isinstance(a, Var) or a in inv for a in be.inputs)):
            inv.add(be.out)
            hoist.append(be)
    if not hoist:
        return [], members
    hoisted = set(id(be) for be in hoist)
    rest = [be for be in body.eqns if id(be) not in hoisted]
    used = set()
    for be in rest:
        used.update(a for a in be.inputs if isinstance(a, Var))
    used.update(a for a in body.outputs if isinstance(a, Var))
    outer = {body.inputs[first + j]: a for j, a in enumerate(e0.inputs[2 + nc + nx:])}
    pre = []
    for be in hoist:
        ins = tuple(outer.get(a, a) if isinstance(a, Var) else a for a in be.inputs)
        t = infer_type(be.prim, [a.type for a in ins], be.params)
        v = Var(t)
        pre.append(Eqn(be.prim, ins, v, be.params, be.source))
        outer[be.out] = v
    new_consts = [be.out for be in hoist if be.out in used]
    key = ("loop-hoisted",)
    new_body = body._lowered.get(key)
    if new_body is None:
        new_body = Graph(list(body.inputs) + new_consts, rest, body.outputs, name=body.name)
        body._lowered[key] = new_body
    operands = tuple(e0.inputs) + tuple(outer[v] for v in new_consts)
    new = [Eqn(m.prim, operands, m.out, {**m.params, "body": new_body}, m.source)
           for m in members]
    from .ir.passes import dce
    keep = {id(x) for x in dce(Graph([], pre, [outer[v] for v in new_consts])).eqns}
    return [x for x in pre if id(x) in keep], new
