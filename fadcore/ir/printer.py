"""The text form of graphs: JAX-style SSA with TFF placement notation.

    { lambda a:f64[32]@SERVER b:{f64[?,32]}@CLIENTS .
      let c:f64[32]@CLIENTS = broadcast a
          d:{f64[?]}@CLIENTS = matvec b c
      in ( d ) }

Variable names are made at print time (a, b, ..., z, ba, bb, ...).
"""

from __future__ import annotations

import numpy as np

from .graph import Graph, Literal, Var


def _name(i: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    s = ""
    while True:
        s = letters[i % 26] + s
        i //= 26
        if i == 0:
            return s


def pp_literal(lit: Literal) -> str:
    v = lit.value
    if v.ndim == 0:
        x = v.item()
        if isinstance(x, float):
            s = repr(x)
            return s if lit.type.dtype.name == "f64" else f"{s}:{lit.type.dtype}"
        if isinstance(x, bool):
            return str(x)
        return str(x) if lit.type.dtype.name == "i64" else f"{x}:{lit.type.dtype}"
    if v.size <= 6:
        body = np.array2string(v, separator=",", max_line_width=10**6).replace("\n", "")
        return f"{lit.type}{body}"
    return f"{lit.type}{{...}}"


def pp_param(v) -> str:
    if isinstance(v, tuple):
        return "(" + ",".join("?" if x is None else pp_param(x) for x in v) + (
            ",)" if len(v) == 1 else ")")
    if v is None:
        return "?"
    return str(v)


class Namer:
    def __init__(self):
        self.names: dict[Var, str] = {}

    def __call__(self, v) -> str:
        if isinstance(v, Literal):
            return pp_literal(v)
        n = self.names.get(v)
        if n is None:
            n = self.names[v] = _name(len(self.names))
        return n


def pp_eqn(e, name: Namer) -> str:
    """One equation: ``d:{f64[?]}@CLIENTS = matvec b c``."""
    params = ""
    if e.params:
        params = "[" + ", ".join(f"{k_}={pp_param(v)}" for k_, v in e.params.items()) + "]"
    args = " ".join(name(a) for a in e.inputs)
    return f"{name(e.out)}:{e.out.type} = {e.prim.name}{params}{' ' + args if args else ''}"


def pp_context(g: Graph, k: int, around: int = 3) -> str:
    """Equation ``k`` of ``g`` marked ``>>``, with up to ``around`` equations on each side
    (names as :func:`pp_graph` gives them)."""
    name = Namer()
    for v in g.inputs:
        name(v)
    lines = []
    for j, e in enumerate(g.eqns[:k + around + 1]):
        try:
            text = pp_eqn(e, name)
        except Exception:           # a malformed equation: say what it is
            text = repr(e)
        if j >= k - around:
            lines.append(f"  {'>>' if j == k else '  '} {j:4d}  {text}")
    return "\n".join(lines)


def result_group(e) -> tuple | None:
    """Equations that are results of one multi-result application (a loop: equations sharing
    a body graph, params and operands, told apart by their ``out`` param) share this key."""
    body = e.params.get("body")
    if not isinstance(body, Graph) or "out" not in e.params:
        return None
    rest = tuple(sorted((k, repr(v)) for k, v in e.params.items() if k not in ("body", "out")))
    return (e.prim.name, id(body), rest,
            tuple(a.key() if isinstance(a, Literal) else id(a) for a in e.inputs))


def pp_graph(g: Graph, indent: int = 0) -> str:
    name = Namer()
    pad = " " * indent
    ins = " ".join(f"{name(v)}:{v.type}" for v in g.inputs)
    lines = [f"{pad}{{ lambda {ins} ."]
    groups: dict = {}
    for e in g.eqns:
        k = result_group(e)
        if k is not None:
            groups.setdefault(k, []).append(e)
    done = set()
    for e in g.eqns:
        prefix = f"{pad}  let " if len(lines) == 1 else f"{pad}      "
        k = result_group(e)
        if k is not None:
            if k in done:
                continue
            done.add(k)
            lines.extend(_pp_group(groups[k], name, prefix))
            continue
        lines.append(prefix + pp_eqn(e, name))
    outs = ", ".join(name(a) for a in g.outputs)
    lines.append(f"{pad}  in ( {outs} ) }}")
    return "\n".join(lines)


def _pp_group(members: list, name: Namer, prefix: str) -> list[str]:
    """A multi-result equation: ``a:T _ c:U = loop[...] args`` then its body, indented."""
    e = members[0]
    body = e.params["body"]
    by_out = {m.params["out"]: m for m in members}
    lhs = " ".join(f"{name(by_out[j].out)}:{by_out[j].out.type}" if j in by_out else "_"
                   for j in range(len(body.outputs)))
    params = ", ".join(f"{k}={pp_param(v)}" for k, v in e.params.items()
                       if k not in ("body", "out"))
    args = " ".join(name(a) for a in e.inputs)
    head = f"{prefix}{lhs} = {e.prim.name}[{params}]{' ' + args if args else ''}"
    return [head, pp_graph(body, indent=len(prefix) + 2)]
