"""Accumulation modes: graph rewrites producing derivative graphs in the same IR.

* :mod:`.forward` — the JVP rewrite (tangents travel beside primals, any number of directions);
* :mod:`.linearize` — the JVP graph split into a known graph and a linear graph;
* :mod:`.transpose` — a linear graph run backwards (transpose rules, the closure rule);
* :mod:`.reverse` — linearize → transpose → assemble; stateful, or rewritten by remat;
* :mod:`.mixed` — per aggregation boundary, reverse or push-forward (a rewrite of the linear
  graph: client Jacobian products aggregated in the forward round), chosen by a rule or by the
  cost model (``auto``);
* :mod:`.options` — the closed sets of choices (mode, state, seed, ...) as enums.
"""
