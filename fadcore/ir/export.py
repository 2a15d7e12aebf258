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
- ``to_dot(g)``: Graphviz ``digraph`` text laid out by rounds: inputs at the top, one cluster
  per round (server work in blue, client work in green, the broadcasts and aggregations that
  move values between them as orange hexagons), server work after the last round at the
  bottom; ``after`` is a dashed scheduling edge, not communication.
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
    "schedule": 'shape=box, style="rounded,dashed", color="#777777"',
    "output": 'shape=box, style="rounded,filled,bold", fillcolor="#eeeeee", color="#555555"',
}
_FILL = {"SERVER": ('"#f3f8fd"', '"#2b6cb0"'), "CLIENTS": ('"#f2fbf2"', '"#2f855a"'),
         "round": ('"#fffaf0"', '"#c05621"')}


def _q(s: str) -> str:
    """A Graphviz double-quoted string."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _cluster(name: str, label: str, kind: str, body: list[str], indent: str) -> list[str]:
    fill, color = _FILL[kind]
    out = [f"{indent}subgraph {name} {{ label={_q(label)}; style=\"rounded,filled\"; "
           f"fillcolor={fill}; color={color};"]
    out += [f"{indent}  {b}" for b in body]
    out.append(f"{indent}}}")
    return out


def to_dot(graph: Graph) -> str:
    """Graphviz text for ``graph``, laid out by rounds.

    Server inputs sit in a SERVER cluster and client data in a CLIENTS cluster at the top; then
    one cluster per round (see :meth:`Graph.rounds`) holding the server work that prepares it,
    its broadcasts, the clients' work and its aggregations; server work after the last round
    at the bottom. Only primitives that move values between placements (broadcast and the
    aggregations) are orange hexagons with bold edges; ``after`` (a scheduling edge) is a
    dashed box and ``num_clients`` an ordinary server node. Edges carry no labels: every node
    shows its type."""
    from .primitives import Comm
    from .rounds import rounds as _rounds
    from .types import CLIENTS

    name = Namer()
    node: dict = {}
    for v in graph.inputs:
        n = name(v)
        node[v] = f"{_q(n)} [label={_q(f'{n}: {v.type}')}, {_STYLE[_placement(v.type)]}, " \
                  "peripheries=2];"
    edges: list[str] = []
    for e in graph.eqns:
        args = " ".join(name(a) if isinstance(a, Var) else pp_literal(a) for a in e.inputs)
        n = name(e.out)
        label = f"{n}: {e.out.type}\n{e.prim.name}{_params_str(e.params)}" + (
            f" {args}" if args else "")
        comm = e.prim.communicates
        group = ("comm" if comm else "schedule" if e.prim.comm is Comm.SCHEDULE
                 else _placement(e.out.type))
        tip = f", tooltip={_q(e.source)}" if e.source else ""
        node[e.out] = f"{_q(n)} [label={_q(label)}, {_STYLE[group]}{tip}];"
        seen = set()
        for k, a in enumerate(e.inputs):
            if isinstance(a, Var) and a not in seen:
                seen.add(a)
                style = (' [color="#c05621", penwidth=2]' if comm else
                         ' [style=dashed, color="#777777"]' if group == "schedule" and k > 0
                         else "")
                edges.append(f"{_q(name(a))} -> {_q(n)}{style};")
    rs = _rounds(graph)
    lines = [f"digraph {_q(graph.name)} {{",
             '  rankdir=TB; compound=true; nodesep=0.25; ranksep=0.35; '
             'fontname="Helvetica";',
             '  node [fontname="Helvetica", fontsize=10, margin="0.08,0.03"]; '
             'edge [color="#555555", arrowsize=0.7];']
    server_in = [node[v] for v in graph.inputs if v.type.placement is not CLIENTS]
    client_in = [node[v] for v in graph.inputs if v.type.placement is CLIENTS]
    if server_in:
        lines += _cluster("cluster_server", "SERVER inputs", "SERVER", server_in, "  ")
    if client_in:
        lines += _cluster("cluster_clients", "CLIENTS data (each client its own)", "CLIENTS",
                          client_in, "  ")
    for r in rs:
        body: list[str] = []
        if r.prepare:
            body += _cluster(f"cluster_r{r.index}_server", "SERVER", "SERVER",
                             [node[e.out] for e in r.prepare], "")
        body += [node[e.out] for e in r.broadcasts]
        if r.client:
            body += _cluster(f"cluster_r{r.index}_clients", "CLIENTS (per client)", "CLIENTS",
                             [node[e.out] for e in r.client], "")
        body += [node[e.out] for e in r.aggregations]
        if r.update:
            body += _cluster(f"cluster_r{r.index}_update", "SERVER", "SERVER",
                             [node[e.out] for e in r.update], "")
        lines += _cluster(f"cluster_round{r.index}", f"round {r.index}", "round", body, "  ")
    if rs.final:
        lines += _cluster("cluster_final", "SERVER", "SERVER", [node[e.out] for e in rs.final],
                          "  ")
    # rounds run one after the other: invisible edges keep each round below the previous one
    for prev, nxt in zip(rs.rounds, rs.rounds[1:]):
        first = (nxt.prepare + nxt.broadcasts + nxt.client)[:1]
        for e in prev.aggregations if first else ():
            edges.append(f"{_q(name(e.out))} -> {_q(name(first[0].out))} [style=invis];")
    for i, a in enumerate(graph.outputs):
        n = f"out{i}"
        text = name(a) if isinstance(a, Var) else pp_literal(a)
        lines.append(f"  {_q(n)} [label={_q(f'out {i}: {text}')}, {_STYLE['output']}, "
                     f"tooltip={_q(str(a.type))}];")
        if isinstance(a, Var):
            edges.append(f"{_q(name(a))} -> {_q(n)};")
    lines += [f"  {s}" for s in edges]
    lines.append("}")
    return "\n".join(lines) + "\n"
