"""Client-placed values: one array per client, members may differ in their rows."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .errors import DTypeError, ShapeError
from .ir.types import CLIENTS, FederatedType, TensorType, dtype_of

__all__ = ["ClientValues", "clients"]


class ClientValues:
    """The members of a client-placed value, in client order.

    ``len(cv)`` is the number of clients, ``cv[i]`` client i's array, ``cv.tolist()`` all of
    them, ``cv.stack()`` / ``np.asarray(cv)`` one array with a leading clients axis (only when
    every member has the same shape).
    """

    __slots__ = ("members", "all_equal", "ragged", "_shapes", "_type")

    def __init__(self, members: Iterable, all_equal: bool = False, ragged: bool = False):
        ms = [np.asarray(m) for m in members]
        ms = [m if m.flags.c_contiguous else m.copy() for m in ms]
        if not ms:
            raise ShapeError("fad.clients: needs at least one client")
        dts = {m.dtype for m in ms}
        if len(dts) > 1:
            raise DTypeError(f"fad.clients: members have different dtypes {sorted(map(str, dts))}")
        nds = {m.ndim for m in ms}
        if len(nds) > 1:
            raise ShapeError(f"fad.clients: members have different ranks {sorted(nds)}")
        if ms[0].dtype == np.float16 or ms[0].dtype.kind not in "fib":
            raise DTypeError(f"fad.clients: dtype {ms[0].dtype} is not supported")
        if ragged and ms[0].ndim == 0:
            raise ShapeError("fad.clients(..., ragged=True): scalar members have no rows")
        self.members = ms
        self.all_equal = all_equal
        self.ragged = ragged
        self._shapes = None
        self._type = None

    @classmethod
    def _trusted(cls, members: list, all_equal: bool = False,
                 shapes: np.ndarray | None = None) -> "ClientValues":
        """For backends: members already C-contiguous arrays of one dtype and rank (and their
        shapes, if known), so no per-member checking pass is needed."""
        self = object.__new__(cls)
        self.members = members
        self.all_equal = all_equal
        self.ragged = False
        self._shapes = shapes
        self._type = None
        return self

    # -- sequence protocol ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i):
        """``cv[k]``: client k's array; ``cv[a:b]``, ``cv[[0, 2]]``, ``cv[mask]``: a
        ClientValues of those clients (in that order)."""
        if isinstance(i, slice):
            return self._select(range(len(self))[i], i)
        if isinstance(i, (list, tuple, np.ndarray)):
            idx = np.asarray(i)
            if idx.dtype == bool:
                if idx.shape != (len(self),):
                    raise IndexError(f"a boolean client mask needs {len(self)} entries, got "
                                     f"shape {idx.shape}")
                idx = np.flatnonzero(idx)
            elif idx.size == 0:
                idx = idx.astype(np.int64)
            elif idx.dtype.kind not in "iu" or idx.ndim != 1:
                raise IndexError(f"clients are selected by an int, a slice, a list of ints or a "
                                 f"boolean mask, got {i!r:.60}")
            return self._select([int(k) for k in idx], i)
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise IndexError(f"clients are selected by an int, a slice, a list of ints or a "
                             f"boolean mask, got {type(i).__name__} {i!r:.60}")
        try:
            return self.members[i]
        except IndexError:
            raise IndexError(f"client {i} out of range for {len(self)} clients") from None

    def _select(self, ks, key) -> "ClientValues":
        n = len(self)
        bad = [k for k in ks if not -n <= k < n]
        if bad:
            raise IndexError(f"client {bad[0]} out of range for {n} clients")
        if not len(ks):
            raise IndexError(f"the selection {key!r:.60} holds no client (a client value needs "
                             "at least one)")
        return ClientValues([self.members[k] for k in ks], self.all_equal, self.ragged)

    def __iter__(self):
        return iter(self.members)

    def tolist(self) -> list[np.ndarray]:
        return list(self.members)

    def stack(self) -> np.ndarray:
        shapes = {m.shape for m in self.members}
        if len(shapes) > 1:
            raise ShapeError(
                f"cannot stack client values of different shapes {sorted(shapes)[:3]}...; "
                "use .tolist()")
        return np.stack(self.members)

    def __array__(self, dtype=None, copy=None):
        out = self.stack()
        return out if dtype is None else out.astype(dtype)

    # -- types ---------------------------------------------------------------------------
    @property
    def dtype(self):
        return self.members[0].dtype

    @property
    def shapes(self) -> np.ndarray:
        """The members' shapes, one row per client (computed once: shapes never change)."""
        if self._shapes is None:
            nd = self.members[0].ndim
            self._shapes = (np.array([m.shape for m in self.members], dtype=np.int64)
                            .reshape(len(self.members), nd))
        return self._shapes

    @property
    def type(self) -> FederatedType:
        """Federated type: dims on which the members differ are ragged (``?``)."""
        if self._type is None:
            s = self.shapes
            shape = tuple(None if (i == 0 and self.ragged) or not (s[:, i] == s[0, i]).all()
                          else int(s[0, i]) for i in range(s.shape[1]))
            self._type = FederatedType(TensorType(dtype_of(self.dtype), shape), CLIENTS,
                                       self.all_equal)
        return self._type

    def __repr__(self) -> str:
        n = len(self)
        return f"fad.clients({n} member{'' if n == 1 else 's'}, {self.type})"

    def __eq__(self, other):
        return NotImplemented

    __hash__ = None


def clients(values, all_equal: bool = False, ragged: bool = False) -> ClientValues:
    """Client-placed data: a list with one array per client, or an array whose first axis
    indexes clients.

    Dimensions on which the members differ are typed ``?`` (the client's row count).
    ``ragged=True`` types the members' first axis ``?`` even when every client happens to hold
    the same number of rows: use it for per-row data (features, labels) so that its type, and
    the graph traced for it, do not depend on whether a cohort's sizes happen to agree."""
    if isinstance(values, ClientValues):
        return values if not ragged or values.ragged else ClientValues(
            values.members, values.all_equal, ragged=True)
    if isinstance(values, np.ndarray):
        if values.ndim == 0:
            raise ShapeError("fad.clients: a stacked array needs a leading clients axis")
    return ClientValues(list(values), all_equal, ragged)
