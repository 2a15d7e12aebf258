"""Graphs as networkx digraphs and as Graphviz text.

Both views name nodes the way the printer names variables (``a``, ``b``, ...), so a node of
``to_networkx(g)`` or ``to_dot(g)`` is the variable of the same name in ``str(g)``.

- ``to_networkx(g)``: a :class:`networkx.DiGraph` with one node per input (``kind="input"``),
  per equation (``kind="eqn"``, named like the variable it defines) and per output that is a
  variable (``kind="output"``, named ``out0``, ``out1``, ...; a literal output has no node).
  Node attributes: ``kind``, ``primitive`` (equations), ``type`` (the printed type),
  ``placement`` (``"SERVER"``/``"CLIENTS"``), ``params`` (a dict), ``literals`` (equation
  operands that are constants: position -> printed value), ``communication`` (True for
  federated primitives), ``source`` and ``index``. Edges follow the data flow; an edge carries
  ``type`` and ``args``, the operand positions it feeds (``mul f f`` gives ``args=[0, 1]``).
- ``to_dot(g)``: Graphviz ``digraph`` text. SERVER nodes sit in a blue cluster, CLIENTS nodes
  in a green one; communication primitives (broadcast, sum, mean, ...) are orange hexagons
  between the clusters, so each crossing between placements is visible at a glance.
"""

from __future__ import annotations

from .graph import Graph, Literal, Var
from .printer import Namer, pp_literal, pp_param

__all__ = ["to_networkx", "to_dot"]


def _params_str(params: dict) -> str:
    if not params:
        return ""
    return "[" + ", ".join(f"{k}={pp_param(v)}" for k, v in params.items()) + "]"


def _placement(t) -> str:
    return t.placement.name


def to_networkx(graph: Graph):
    """The data-flow digraph of ``graph`` (see the module docstring for its attributes)."""
    import networkx as nx

    from .. import pytree

    name = Namer()
    g = nx.DiGraph(name=graph.name, in_tree=pytree.tree_str(graph.in_tree),
                   out_tree=pytree.tree_str(graph.out_tree))
    for i, v in enumerate(graph.inputs):
        g.add_node(name(v), kind="input", index=i, type=str(v.type),
                   placement=_placement(v.type), params={}, communication=False)
    for k, e in enumerate(graph.eqns):
        node = name(e.out)
        g.add_node(node, kind="eqn", index=k, primitive=e.prim.name, type=str(e.out.type),
                   placement=_placement(e.out.type), params=dict(e.params),
                   literals={i: pp_literal(a) for i, a in enumerate(e.inputs)
                             if isinstance(a, Literal)},
                   communication=e.prim.kind == "federated", source=e.source)
        for i, a in enumerate(e.inputs):
            if isinstance(a, Var):
                _add_edge(g, name(a), node, i, a.type)
    for i, a in enumerate(graph.outputs):
        if isinstance(a, Var):
            node = f"out{i}"
            g.add_node(node, kind="output", index=i, type=str(a.type),
                       placement=_placement(a.type), params={}, communication=False)
            _add_edge(g, name(a), node, 0, a.type)
    return g


def _add_edge(g, src: str, dst: str, arg: int, t) -> None:
    if g.has_edge(src, dst):
        g.edges[src, dst]["args"].append(arg)
    else:
        g.add_edge(src, dst, type=str(t), args=[arg])


# --------------------------------------------------------------------------- Graphviz

_STYLE = {
    "SERVER": 'shape=box, style="rounded,filled", fillcolor="#dbe9f6", color="#2b6cb0"',
    "CLIENTS": 'shape=box, style="rounded,filled", fillcolor="#dcf2dc", color="#2f855a"',
    "comm": 'shape=hexagon, style="filled,bold", fillcolor="#fbd38d", color="#c05621", '
            'penwidth=2',
    "output": 'shape=box, style="rounded,filled,bold", fillcolor="#eeeeee", color="#555555"',
}
_CLUSTER = {
    "SERVER": 'label="SERVER"; style="rounded,filled"; fillcolor="#f3f8fd"; color="#2b6cb0"',
    "CLIENTS": 'label="CLIENTS (per client)"; style="rounded,filled"; fillcolor="#f2fbf2"; '
               'color="#2f855a"',
}


def _q(s: str) -> str:
    """A Graphviz double-quoted string."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: Graph) -> str:
    """Graphviz text for ``graph``: placements as clusters, communication highlighted."""
    name = Namer()
    nodes = {"SERVER": [], "CLIENTS": [], "comm": [], "output": []}
    edges: list[str] = []
    for v in graph.inputs:
        n = name(v)
        nodes[_placement(v.type)].append(f"{_q(n)} [label={_q(f'{n}: {v.type}')}, "
                                         f"{_STYLE[_placement(v.type)]}, peripheries=2];")
    for e in graph.eqns:
        args = " ".join(name(a) for a in e.inputs)
        n = name(e.out)
        label = f"{n}: {e.out.type}\n{e.prim.name}{_params_str(e.params)}" + (
            f" {args}" if args else "")
        comm = e.prim.kind == "federated"
        group = "comm" if comm else _placement(e.out.type)
        tip = f", tooltip={_q(e.source)}" if e.source else ""
        nodes[group].append(f"{_q(n)} [label={_q(label)}, {_STYLE[group]}{tip}];")
        seen = set()
        for a in e.inputs:
            if isinstance(a, Var) and a not in seen:
                seen.add(a)
                style = ', color="#c05621", penwidth=2' if comm else ""
                edges.append(f"{_q(name(a))} -> {_q(n)} [label={_q(str(a.type))}{style}];")
    for i, a in enumerate(graph.outputs):
        n = f"out{i}"
        text = name(a) if isinstance(a, Var) else pp_literal(a)
        nodes["output"].append(f"{_q(n)} [label={_q(f'out {i}: {text}')}, {_STYLE['output']}, "
                               f"tooltip={_q(str(a.type))}];")
        if isinstance(a, Var):
            edges.append(f"{_q(name(a))} -> {_q(n)};")
    lines = [f"digraph {_q(graph.name)} {{",
             '  rankdir=TB; compound=true; fontname="Helvetica";',
             '  node [fontname="Helvetica", fontsize=10]; edge [fontname="Helvetica", '
             'fontsize=8, color="#555555"];']
    for place in ("SERVER", "CLIENTS"):
        if nodes[place]:
            lines.append(f"  subgraph cluster_{place.lower()} {{ {_CLUSTER[place]};")
            lines += [f"    {s}" for s in nodes[place]]
            lines.append("  }")
    lines += [f"  {s}" for s in nodes["comm"] + nodes["output"]]
    lines += [f"  {s}" for s in edges]
    lines.append("}")
    return "\n".join(lines) + "\n"

