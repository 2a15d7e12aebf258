"""Placements, dtypes, tensor types and federated types.

Types are small immutable values printed in TFF's notation::

    f64[32]@SERVER        a server value
    {f64[?,32]}@CLIENTS   one value per client, members may differ (``?`` = the client's rows)
    f64[32]@CLIENTS       one value per client, all equal (the result of a broadcast)

``None`` in a shape is the per-client *ragged* dimension: at run time it is the number of rows
the client holds. A client has one row count, so every ``?`` of a client's values is that count.
The number of clients is not part of any type: graphs are cardinality-polymorphic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ShapeError

__all__ = [
    "Placement", "SERVER", "CLIENTS", "DType", "f32", "f64", "i32", "i64", "bool_",
    "TensorType", "FederatedType", "dtype_of", "DTYPES",
]


# --------------------------------------------------------------------------- placements

@dataclass(frozen=True, slots=True)
class Placement:
    name: str

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__

    def __reduce__(self):          # placements are singletons (compared with `is`)
        return (_placement_named, (self.name,))


def _placement_named(name: str) -> "Placement":
    return PLACEMENTS[name]


SERVER = Placement("SERVER")
CLIENTS = Placement("CLIENTS")
PLACEMENTS = {"SERVER": SERVER, "CLIENTS": CLIENTS}


# --------------------------------------------------------------------------- dtypes

@dataclass(frozen=True, slots=True)
class DType:
    """An element type. ``f64[32]`` makes a :class:`TensorType`."""

    name: str           # short name used in printed types: f64, f32, i64, i32, bool
    np_name: str        # numpy's name: float64, ...

    @property
    def np(self) -> np.dtype:
        return np.dtype(self.np_name)

    @property
    def itemsize(self) -> int:
        return self.np.itemsize

    @property
    def is_float(self) -> bool:
        return self.name.startswith("f")

    @property
    def is_int(self) -> bool:
        return self.name.startswith("i")

    def __reduce__(self):          # dtypes are singletons (compared with `is`)
        return (_dtype_named, (self.name,))

    def __getitem__(self, shape) -> "TensorType":
        if not isinstance(shape, tuple):
            shape = (shape,)
        if len(shape) == 1 and isinstance(shape[0], tuple) and not shape[0]:
            shape = ()                      # f64[(),]
        return TensorType(self, _check_shape(shape))

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


def _dtype_named(name: str) -> "DType":
    return DTYPES[name]


f32 = DType("f32", "float32")
f64 = DType("f64", "float64")
i32 = DType("i32", "int32")
i64 = DType("i64", "int64")
bool_ = DType("bool", "bool")
DTYPES = {d.name: d for d in (f32, f64, i32, i64, bool_)}
_BY_NP = {d.np: d for d in DTYPES.values()}


def dtype_of(x) -> DType:
    """The fadcore dtype of a NumPy dtype, array or Python scalar."""
    if isinstance(x, DType):
        return x
    if isinstance(x, bool):
        return bool_
    if isinstance(x, int):
        return i64
    if isinstance(x, float):
        return f64
    npdt = np.dtype(getattr(x, "dtype", x))
    try:
        return _BY_NP[npdt]
    except KeyError:
        from ..errors import DTypeError
        raise DTypeError(
            f"dtype {npdt} is not supported by fadcore (use float64, float32, int64, int32 "
            "or bool)") from None


def _check_shape(shape) -> tuple:
    out = []
    for d in shape:
        if d is None:
            out.append(None)
        elif isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0:
            out.append(int(d))
        else:
            raise ShapeError(f"bad dimension {d!r} in shape {shape!r}: use ints >= 0 or None")
    return tuple(out)


def shape_str(shape: tuple) -> str:
    return ",".join("?" if d is None else str(d) for d in shape)


# --------------------------------------------------------------------------- tensor types

@dataclass(frozen=True, slots=True)
class TensorType:
    """dtype and shape of one value (one member, for client values)."""

    dtype: DType
    shape: tuple

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def ragged(self) -> bool:
        return None in self.shape

    def size(self, rows: int | None = None) -> int:
        """Number of elements; ``?`` dimensions count ``rows`` (required if ragged)."""
        n = 1
        for d in self.shape:
            if d is None:
                if rows is None:
                    raise ShapeError(f"size of ragged type {self} needs a row count")
                d = rows
            n *= d
        return n

    def nbytes(self, rows: int | None = None) -> int:
        return self.size(rows) * self.dtype.itemsize

    def concrete_shape(self, rows: int | None) -> tuple:
        return tuple(rows if d is None else d for d in self.shape)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(dtype, self.shape)

    def __matmul__(self, placement: Placement) -> "FederatedType":
        if not isinstance(placement, Placement):
            return NotImplemented
        return FederatedType(self, placement, placement is SERVER)

    def __str__(self) -> str:
        return f"{self.dtype.name}[{shape_str(self.shape)}]"

    __repr__ = __str__


# --------------------------------------------------------------------------- federated types

@dataclass(frozen=True, slots=True)
class FederatedType:
    """A tensor type at a placement. ``all_equal`` is True at SERVER and after a broadcast."""

    tensor: TensorType
    placement: Placement
    all_equal: bool = True

    def __post_init__(self):
        if not isinstance(self.tensor, TensorType):
            raise ShapeError(f"a federated type holds a tensor type, not {self.tensor!r}")
        if self.placement is SERVER:
            if not self.all_equal:
                object.__setattr__(self, "all_equal", True)
            if self.tensor.ragged:
                raise ShapeError(
                    f"{self.tensor}@SERVER: a ragged dimension (?) exists only at CLIENTS, "
                    "where it is each client's row count")

    # convenient views
    dtype = property(lambda self: self.tensor.dtype)
    shape = property(lambda self: self.tensor.shape)
    ndim = property(lambda self: self.tensor.ndim)

    @property
    def at_clients(self) -> bool:
        return self.placement is CLIENTS

    def with_tensor(self, tensor: TensorType) -> "FederatedType":
        return FederatedType(tensor, self.placement, self.all_equal)

    def __str__(self) -> str:
        if self.placement is CLIENTS and not self.all_equal:
            return f"{{{self.tensor}}}@CLIENTS"
        return f"{self.tensor}@{self.placement.name}"

    __repr__ = __str__


def clients_type(tensor: TensorType, all_equal: bool = False) -> FederatedType:
    return FederatedType(tensor, CLIENTS, all_equal)


def server_type(tensor: TensorType) -> FederatedType:
    return FederatedType(tensor, SERVER, True)
