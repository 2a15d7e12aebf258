"""Typed errors. Every error fadcore raises on bad input is a :class:`FadError`."""

from __future__ import annotations

import builtins

__all__ = [
    "FadError", "PlacementError", "ShapeError", "DTypeError", "ClosureError",
    "SerializationError", "VerificationError", "DifferentiationError",
    "CardinalityError", "LoweringError", "TracingError", "ResourceError",
    "SecureAggregationError", "OptionError",
]


class FadError(Exception):
    """Base class of every fadcore error."""


class PlacementError(FadError):
    """A value is used at a placement it does not live at (e.g. SERVER data in client code)."""


class ShapeError(FadError, ValueError):
    """Operand shapes do not fit an operation, or run-time data does not fit a graph's types."""


class DTypeError(FadError, builtins.TypeError):
    """Operand dtypes do not fit an operation (e.g. a float where integer labels are needed)."""


class ClosureError(FadError):
    """A derivative cannot be computed with the primitives a policy allows."""


class SerializationError(FadError, ValueError):
    """A serialized graph is malformed, truncated, of an unknown version, or hostile."""


class VerificationError(FadError):
    """A graph is not well typed. Raised by the verifier."""


class DifferentiationError(FadError):
    """A derivative was asked for something that has none (integer inputs, missing rules...)."""


class CardinalityError(FadError, ValueError):
    """Client-placed arguments disagree on the number of clients, or it cannot be known."""


class LoweringError(FadError):
    """A backend cannot execute a graph (raised before anything runs)."""


class TracingError(FadError):
    """A Python function cannot be traced (e.g. it branches on a traced value)."""


class ResourceError(FadError, MemoryError):
    """Running a graph would need more memory than allowed; raised before allocating it."""


class SecureAggregationError(FadError):
    """Secure aggregation cannot proceed: a cohort below its minimum, a value outside the
    fixed point range, clients that dropped out after masking, bad parameters."""


class OptionError(FadError, ValueError):
    """An option of a fadcore function has a value it does not take (``mode=``, ``state=``,
    ``policy=``, ``Policy(aggregation=...)``, ...)."""
