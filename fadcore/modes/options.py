"""The closed sets of choices the derivative passes take, as enums.

The public API still accepts the strings (``mode="reverse"``); each enum member *is* its
string (a ``str`` subclass), so comparisons with strings and the ``meta`` annotations written
into graphs are unchanged.
"""

from __future__ import annotations

import enum

from ..errors import OptionError


class _Choice(str, enum.Enum):
    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__

    @classmethod
    def parse(cls, value, message: str):
        """The member named by ``value`` (a member or its string), else ``ValueError(message)``
        (``message`` may use ``{value!r}``): a :class:`fadcore.errors.OptionError`, which is a
        ``ValueError``."""
        try:
            return cls(value)
        except ValueError:
            raise OptionError(message.format(value=value)) from None


class Mode(_Choice):
    """How a derivative is accumulated."""

    FORWARD = "forward"
    REVERSE = "reverse"
    MIXED = "mixed"
    AUTO = "auto"


class State(_Choice):
    """Whether clients keep residuals between rounds (``stateful``) or recompute (``remat``)."""

    STATEFUL = "stateful"
    REMAT = "remat"


class Seed(_Choice):
    """The output cotangent of a reverse pass: ``barrier`` (grad, ``after(1.0, out)``: the
    backward sweep comes after the forward rounds), ``one`` (the constant 1.0, which mixed
    modes fuse into the forward round) or ``inputs`` (vjp: cotangents are graph inputs)."""

    BARRIER = "barrier"
    ONE = "one"
    INPUTS = "inputs"


class Choice(_Choice):
    """What a mixed pass does at an aggregation boundary."""

    REVERSE = "reverse"
    PUSHFORWARD = "pushforward"


class AggregationClass(_Choice):
    """``secure`` when every clients->server flow of a graph is a secure aggregation."""

    SECURE = "secure"
    PLAIN = "plain"
