"""Accumulation modes: graph rewrites producing derivative graphs in the same IR.

* :mod:`.forward` — the JVP rewrite (tangents travel beside primals, any number of directions);
* :mod:`.reverse` — linearize (JVP + partial evaluation) then transpose; stateful or remat;
* :mod:`.mixed` — per aggregation boundary, reverse or push-forward (client Jacobian products
  aggregated in the forward round), chosen by a rule or by the cost model (``auto``).
"""
