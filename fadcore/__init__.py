"""fadcore: federated automatic differentiation.

Trace federated Python functions into a placement-typed dataflow graph, differentiate across
communication boundaries in forward, reverse or mixed mode, and run the result fast.
"""

from __future__ import annotations

import logging as _logging

# fadcore logs (tracing, backends) to the "fadcore" logger and prints nothing: see them with
# logging.basicConfig(level=logging.DEBUG), or logging.getLogger("fadcore").setLevel(...)
_logging.getLogger("fadcore").addHandler(_logging.NullHandler())

from . import ops as _ops  # noqa: F401  (defines the primitives)
from . import numpy, nn, pytree  # noqa: F401
from .backends import run, set_default_backend, default_backend
from .errors import (CardinalityError, ClosureError, DifferentiationError, DTypeError,
                     FadError, LoweringError, OptionError, PlacementError, ResourceError,
                     SecureAggregationError, SerializationError, ShapeError, TracingError,
                     VerificationError)
from .federated import broadcast, map, mean, num_clients, secure_sum, sum, weighted_mean
from .loops import fori_loop, scan
from .ir.graph import Graph
from .ir.types import (CLIENTS, SERVER, DType, FederatedType, Placement, TensorType, bool_,
                       f32, f64, i32, i64)
from .pytree import tree_leaves, tree_map, tree_structure
from .tracing import RetraceWarning, TracedFunction, trace
from .values import ClientValues, clients

__version__ = "0.1.0"

__all__ = [
    "trace", "TracedFunction", "RetraceWarning", "Graph", "run", "clients", "ClientValues",
    "broadcast", "sum", "mean", "weighted_mean", "secure_sum", "num_clients", "map",
    "fori_loop", "scan",
    "SERVER", "CLIENTS", "Placement", "TensorType", "FederatedType", "DType",
    "f64", "f32", "i64", "i32", "bool_", "numpy", "nn",
    "FadError", "PlacementError", "ShapeError", "DTypeError", "ClosureError",
    "SerializationError", "VerificationError", "DifferentiationError", "CardinalityError",
    "LoweringError", "TracingError", "ResourceError", "OptionError", "set_default_backend",
    "default_backend", "tree_map", "tree_leaves", "tree_structure",
]

from .api import grad, hessian, hvp, jacfwd, jacrev, jvp, value_and_grad, vjp  # noqa: E402
from .policy import Policy, audit  # noqa: E402

__all__ += ["grad", "value_and_grad", "jvp", "vjp", "hvp", "jacfwd", "jacrev", "hessian",
            "Policy", "audit"]
from .ir.cost import CostReport, cost, cost_table  # noqa: E402
from .modes.mixed import CostWeights  # noqa: E402
from .modes.auto import explain  # noqa: E402

__all__ += ["cost", "cost_table", "CostReport", "CostWeights", "explain"]
from .testing.gradcheck import check_grads  # noqa: E402
from .batching import BatchingError, vmap  # noqa: E402

__all__ += ["check_grads", "vmap", "BatchingError"]
from .backends.secagg import SecureAggregation  # noqa: E402

__all__ += ["SecureAggregation", "SecureAggregationError"]
