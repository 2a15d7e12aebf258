"""Linearize: the JVP graph split by partial evaluation into two graphs.

``linearize(graph, mask)`` traces the JVP of ``graph`` w.r.t. the inputs selected by ``mask``
(:func:`fadcore.modes.forward.jvp_graph`) and splits its equations:

- the **known** graph holds every equation with no tangent operand (the primal work). Its
  inputs are the primal's (user inputs, then captured values); its outputs the primal outputs,
  then the *residuals*: the known values the linear side reads.
- the **linear** graph holds the equations linear in the tangents. Its inputs are the
  residuals, then one tangent per selected input; its outputs one tangent per primal output.

Reverse mode transposes the linear graph (:mod:`.transpose`) and assembles the known graph with
the transposed one (:mod:`.reverse`); mixed modes rewrite the linear graph first
(:mod:`.mixed`). Both graphs share their variables with each other (the residuals are outputs of
one and inputs of the other), so an equation found in the linear graph stays that equation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..ir.checks import checked
from ..ir.graph import Graph, Var
from .forward import jvp_graph


#: Rewrites ``(jvp_graph, tangent_inputs) -> graph`` applied before the split, for primitives
#: that hold a body graph and must be split inside it. :mod:`fadcore.loops` registers
#: ``partial_eval_loops`` here: the loop primitive lives above ``modes/`` (its rules call the
#: passes, as JAX's control flow calls its interpreters), so ``modes/`` does not import it.
JVP_SPLITTERS: list = []


@dataclass(frozen=True)
class Linearized:
    """A primal graph's known and linear graphs (see the module docstring)."""

    known: Graph
    linear: Graph
    num_outputs: int        # primal outputs (the known graph's first outputs)
    num_residuals: int      # the linear graph's first inputs
    mask: tuple[bool, ...]  # which of the primal's inputs have a tangent

    @property
    def tangent_inputs(self) -> list[Var]:
        return self.linear.inputs[self.num_residuals:]

    def linear_vars(self) -> set:
        """The linear graph's values that depend on its tangent inputs."""
        return linear_vars(self.linear, self.tangent_inputs)

    def with_linear(self, linear: Graph) -> "Linearized":
        """The same split with a rewritten linear graph (same inputs and outputs)."""
        return replace(self, linear=linear)


def linear_vars(g: Graph, tangent_inputs) -> set:
    """The tangent inputs and every value computed from them."""
    lin = set(tangent_inputs)
    for e in g.eqns:
        if any(isinstance(a, Var) and a in lin for a in e.inputs):
            lin.add(e.out)
    return lin


def linearize(graph: Graph, mask: list[bool]) -> Linearized:
    """Split the JVP of ``graph`` (w.r.t. the inputs selected by ``mask``) into its known and
    linear graphs."""
    jg = jvp_graph(graph, mask)
    nuser, n_t, nout = graph.num_user_inputs, sum(mask), len(graph.outputs)
    for split in JVP_SPLITTERS:       # loops: a known loop stacking residuals + a linear loop
        jg = split(jg, jg.inputs[nuser:nuser + n_t])
    tangent_in = jg.inputs[nuser:nuser + n_t]
    lin = linear_vars(jg, tangent_in)
    known_eqns = [e for e in jg.eqns if e.out not in lin]
    linear_eqns = [e for e in jg.eqns if e.out in lin]
    residuals = _residuals(linear_eqns, jg.outputs[nout:], lin)
    known = Graph(jg.inputs[:nuser] + jg.inputs[nuser + n_t:], known_eqns,
                  jg.outputs[:nout] + residuals, name=f"known_{graph.name}",
                  num_captured=graph.num_captured)
    linear = Graph(residuals + tangent_in, linear_eqns, jg.outputs[nout:],
                   name=f"linear_{graph.name}")
    return Linearized(checked("linearize (known graph)", known),
                      checked("linearize (linear graph)", linear), nout, len(residuals),
                      tuple(mask))


def _residuals(linear_eqns, tangent_outputs, lin: set) -> list[Var]:
    """The known values the linear side reads, in first-use order."""
    seen: dict[Var, None] = {}
    for a in [a for e in linear_eqns for a in e.inputs] + list(tangent_outputs):
        if isinstance(a, Var) and a not in lin:
            seen.setdefault(a)
    return list(seen)
