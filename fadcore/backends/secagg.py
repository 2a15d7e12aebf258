"""Secure aggregation for ``secure_sum``: pairwise-masked fixed point sums (SecAgg style).

The protocol (Bonawitz et al., CCS 2017, without the dropout-recovery stage; see
``docs/secure-aggregation.md`` for the threat model and why dropouts are an error):

1. **Key agreement** (one extra round per run, before the first round with a secure sum):
   every client makes an X25519 key pair for the run's :class:`Session` and uploads its public
   key; the server relays the table of all public keys to every client (with each round's
   step). Private keys never leave the client (:class:`ClientKeys`).
2. **Masking** (in every round with secure sums, on the client, before anything leaves it):
   client ``i`` encodes its contribution ``x_i`` in fixed point, ``q_i = round(x_i * 2^f)``
   modulo ``2^k``, refusing values outside ``±bound`` (no silent wrap-around), and adds for
   every other client ``j`` the mask ``+m_ij`` (``i < j``) or ``-m_ij`` (``i > j``), where
   ``m_ij`` is a ChaCha20 keystream keyed by HKDF-SHA256 of the X25519 shared secret of
   ``i`` and ``j`` and the session, with the round and the secure sum's position as nonce.
3. **Unmasking** (server): the masks cancel in the sum of all clients' messages modulo
   ``2^k``; the server decodes the signed fixed point sum. It refuses to decode unless every
   client of the cohort delivered (a missing client's masks would not cancel) and the cohort
   has at least ``min_clients`` clients.

``cryptography`` is imported only when a secure run starts (``pip install 'fadcore[secure]'``).
The same classes serve every runtime: a runtime calls :meth:`Runtime.public_keys` with
:class:`ClientKeys` made where the clients are, and :func:`~.executor.run_client_step` masks with
:meth:`RoundMasking.for_group`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import FadError, SecureAggregationError
from ..ir.cost import SECURE_KEY_BYTES

__all__ = ["SecureAggregation", "Session", "ClientKeys", "RoundMasking", "MaskingContext",
           "ServerSession", "resolve", "KEY_BYTES"]

#: Bytes of an X25519 public key (what each client uploads in the key agreement).
KEY_BYTES = SECURE_KEY_BYTES


@dataclass(frozen=True)
class SecureAggregation:
    """Parameters of secure aggregation (``fad.SecureAggregation``).

    ``frac_bits``: fixed point scale ``2**frac_bits`` (each client's value is rounded to a
    multiple of ``2**-frac_bits``: a sum of ``n`` clients is within ``n * 2**-(frac_bits+1)``
    of the exact sum, per element). ``bound``: the largest ``|value|`` a client may contribute
    (larger, inf or nan is a :class:`~fadcore.SecureAggregationError` on that client, never a
    wrap-around). ``modulus_bits``: ``k``, arithmetic modulo ``2**k`` (at most 64); a run
    needs ``clients * bound * 2**frac_bits < 2**(k-1)``, checked before anything runs.
    ``min_clients``: a secure sum over fewer clients is refused (a masked sum of one client is
    that client's value).
    """

    frac_bits: int = 24
    bound: float = 2.0 ** 20
    modulus_bits: int = 64
    min_clients: int = 3

    def __post_init__(self):
        def integer(name, lo, hi):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
                raise SecureAggregationError(
                    f"SecureAggregation({name}=...) must be an integer in [{lo}, {hi}], got {v!r}")
        integer("modulus_bits", 8, 64)
        integer("frac_bits", 0, self.modulus_bits - 2)
        integer("min_clients", 2, 1 << 40)
        b = self.bound
        if isinstance(b, bool) or not isinstance(b, (int, float, np.floating, np.integer)) \
                or not math.isfinite(b) or b <= 0:
            raise SecureAggregationError(
                f"SecureAggregation(bound=...) must be a positive finite number, got {b!r}")
        if self.max_clients() < 1:
            raise SecureAggregationError(
                f"SecureAggregation: bound={b} at frac_bits={self.frac_bits} does not fit "
                f"modulo 2**{self.modulus_bits} (need bound * 2**frac_bits < "
                f"2**{self.modulus_bits - 1})")

    @property
    def scale(self) -> float:
        return float(2 ** self.frac_bits)

    def max_clients(self) -> int:
        """The most clients whose sum fits: ``n * bound * 2**frac_bits < 2**(k-1)``."""
        per_client = math.ceil(self.bound * 2 ** self.frac_bits)
        return (2 ** (self.modulus_bits - 1) - 1) // per_client

    def error_bound(self, clients: int) -> float:
        """Largest absolute error of one element of a secure sum over ``clients`` clients
        (rounding to the fixed point grid; the decoding is exact below 2**53 units and adds at
        most one float64 rounding of the result above it)."""
        return clients * 2.0 ** -(self.frac_bits + 1)


def resolve(option, graph) -> SecureAggregation | None:
    """``secure_aggregation=`` of ``fad.run``: None (on iff ``graph`` was made under
    ``Policy(aggregation="secure_sum")``), True, False or a :class:`SecureAggregation`."""
    if option is None:
        option = graph.meta.get("policy") == "secure_sum"
    if option is False:
        return None
    if option is True:
        return SecureAggregation()
    if isinstance(option, SecureAggregation):
        return option
    raise FadError(f"secure_aggregation= must be True, False, None or a fad.SecureAggregation, "
                   f"got {type(option).__name__}")


def _crypto():
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric.x25519 import (X25519PrivateKey,
                                                                      X25519PublicKey)
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError as err:
        raise FadError("secure aggregation needs the cryptography package: "
                       "pip install 'fadcore[secure]'") from err
    return dict(hashes=hashes, serialization=serialization, X25519PrivateKey=X25519PrivateKey,
                X25519PublicKey=X25519PublicKey, Cipher=Cipher, algorithms=algorithms, HKDF=HKDF)


# --------------------------------------------------------------------------- public values

class Session:
    """What every party knows about one secure run: a fresh random id and the parameters."""

    __slots__ = ("id", "params", "graph_name")

    def __init__(self, id: bytes, params: SecureAggregation, graph_name: str):
        self.id, self.params, self.graph_name = id, params, graph_name

    def __reduce__(self):
        return Session, (self.id, self.params, self.graph_name)


class RoundMasking:
    """What the server sends the clients with a round's step: the session, the round, the
    secure positions of the step and the relayed public keys (client order)."""

    __slots__ = ("session", "round", "positions", "table", "sources")

    def __init__(self, session: Session, round: int, positions, table, sources):
        self.session, self.round, self.positions = session, round, tuple(positions)
        self.table, self.sources = list(table), dict(sources)

    def __reduce__(self):
        return RoundMasking, (self.session, self.round, self.positions, self.table,
                              self.sources)

    def to_dict(self) -> dict:
        """Plain values only (bytes, ints, strings, lists): for runtimes whose messages do not
        carry pickles (Flower's records). :meth:`from_dict` inverts it."""
        p = self.session.params
        return {"session": self.session.id, "graph": self.session.graph_name,
                "frac_bits": p.frac_bits, "bound": float(p.bound),
                "modulus_bits": p.modulus_bits, "min_clients": p.min_clients,
                "round": self.round, "positions": list(self.positions),
                "table": list(self.table),
                "sources": [[j, src] for j, src in sorted(self.sources.items())]}

    @staticmethod
    def from_dict(d: dict) -> "RoundMasking":
        params = SecureAggregation(int(d["frac_bits"]), float(d["bound"]),
                                   int(d["modulus_bits"]), int(d["min_clients"]))
        session = Session(bytes(d["session"]), params, str(d["graph"]))
        return RoundMasking(session, int(d["round"]), [int(j) for j in d["positions"]],
                            [bytes(k) for k in d["table"]],
                            {int(j): str(src) for j, src in d["sources"]})

    def for_group(self, lo: int, hi: int, keys: "ClientKeys") -> "MaskingContext":
        """The masking context of clients ``lo..hi-1``, whose private keys ``keys`` holds."""
        if (keys.lo, keys.hi) != (lo, hi) or keys.session_id != self.session.id:
            raise SecureAggregationError(
                f"secure aggregation, round {self.round} of {self.session.graph_name!r}: "
                f"clients {lo}..{hi - 1} were given the keys of clients {keys.lo}..{keys.hi - 1}"
                " or of another run")
        return MaskingContext(self, keys)


# --------------------------------------------------------------------------- client side

class ClientKeys:
    """The X25519 private keys of clients ``clients`` (a range) for one session. Lives where
    those clients are; pickles (a worker may hand it to another worker of the same party)."""

    def __init__(self, session: Session, clients: range, _raw=None):
        c = _crypto()
        self.session_id, self.lo, self.hi = session.id, clients.start, clients.stop
        self._session = session
        if _raw is None:
            self._private = [c["X25519PrivateKey"].generate() for _ in clients]
        else:
            self._private = [c["X25519PrivateKey"].from_private_bytes(r) for r in _raw]
        raw = c["serialization"].Encoding.Raw
        self.public = [k.public_key().public_bytes(raw, c["serialization"].PublicFormat.Raw)
                       for k in self._private]
        self._pairs: dict = {}

    def __reduce__(self):
        c = _crypto()
        ser = c["serialization"]
        raw = [k.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
               for k in self._private]
        return ClientKeys, (self._session, range(self.lo, self.hi), raw)

    def pair_key(self, i: int, j: int, public_j: bytes) -> bytes:
        """The 32-byte mask key client ``i`` shares with client ``j`` (symmetric in i, j)."""
        got = self._pairs.get((i, j))
        if got is None:
            c = _crypto()
            shared = self._private[i - self.lo].exchange(
                c["X25519PublicKey"].from_public_bytes(public_j))
            lo, hi = min(i, j), max(i, j)
            info = b"fadcore-secagg-v1|" + self.session_id + f"|{lo}|{hi}".encode()
            got = c["HKDF"](algorithm=c["hashes"].SHA256(), length=32, salt=None,
                            info=info).derive(shared)
            self._pairs[(i, j)] = got
        return got


def _stream(key: bytes, round: int, position: int, words: int) -> np.ndarray:
    c = _crypto()
    nonce = b"\0\0\0\0" + round.to_bytes(4, "little") + position.to_bytes(8, "little")
    enc = c["Cipher"](c["algorithms"].ChaCha20(key, nonce), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(8 * words)), dtype=np.uint64)


class MaskingContext:
    """A group's masking for one round: :meth:`mask` turns the members' contributions to a
    secure position into per-client masked rows (a :class:`~.executor.SecurePartial`)."""

    def __init__(self, rm: RoundMasking, keys: ClientKeys):
        self.rm, self.keys = rm, keys
        self.positions = rm.positions

    def mask(self, position: int, members: list):
        from .executor import SecurePartial
        rm, keys, p = self.rm, self.keys, self.rm.session.params
        n = len(rm.table)
        rows = []
        for k, member in enumerate(members):
            i = keys.lo + k
            if keys.public[k] != rm.table[i]:
                raise SecureAggregationError(
                    f"secure aggregation, round {rm.round} of {rm.session.graph_name!r}: "
                    f"client {i} no longer holds the key it agreed on (its process was "
                    "restarted and lost it): treated as a dropped client; rerun the computation")
            x = np.asarray(member, dtype=np.float64).reshape(-1)
            bad = ~(np.abs(x) <= p.bound)       # also nan
            if bad.any():
                at = int(np.argmax(bad))
                raise SecureAggregationError(
                    f"secure aggregation, round {rm.round} of {rm.session.graph_name!r}: "
                    f"client {i}'s contribution to the secure_sum at "
                    f"{rm.sources.get(position) or 'position ' + str(position)} has value "
                    f"{x[at]!r} (element {at}) outside ±bound={p.bound}; scale the value or "
                    "pass fad.SecureAggregation(bound=...) (and fewer frac_bits)")
            q = np.rint(x * p.scale).astype(np.int64).view(np.uint64)
            for j in range(n):
                if j == i:
                    continue
                m = _stream(keys.pair_key(i, j, rm.table[j]), rm.round, position, q.size)
                q = q + m if i < j else q - m
            if p.modulus_bits < 64:
                q &= np.uint64((1 << p.modulus_bits) - 1)
            rows.append(q)
        arr = np.stack(rows) if rows else np.zeros((0, 0), np.uint64)
        return SecurePartial(list(range(keys.lo, keys.lo + len(members))), arr)


# --------------------------------------------------------------------------- server side

class ServerSession:
    """The server's side of secure aggregation in one run."""

    def __init__(self, params: SecureAggregation, graph, n: int, secure_rounds: list):
        self.params, self.graph, self.n = params, graph, n
        first = secure_rounds[0]
        if n < params.min_clients:
            raise SecureAggregationError(
                f"secure aggregation refuses the secure_sum of round {first} of "
                f"{graph.name!r} over {n} clients: fewer than min_clients={params.min_clients}"
                " (a masked sum of so few clients reveals their values)")
        if n > params.max_clients():
            raise SecureAggregationError(
                f"secure aggregation: a sum of {n} clients of values up to bound={params.bound}"
                f" at frac_bits={params.frac_bits} does not fit modulo "
                f"2**{params.modulus_bits} (at most {params.max_clients()} clients); lower "
                "bound= or frac_bits=")
        self.session = Session(os.urandom(16), params, graph.name)
        self.table: list = []

    def agree(self, runtime) -> None:
        """The key agreement round: collect the clients' public keys."""
        table = list(runtime.public_keys(self.session))
        if len(table) != self.n or any(not isinstance(k, bytes) or len(k) != KEY_BYTES
                                       for k in table):
            raise SecureAggregationError(
                f"secure aggregation of {self.graph.name!r}: the key agreement returned "
                f"{len(table)} keys for {self.n} clients (or keys that are not {KEY_BYTES} bytes)")
        if len(set(table)) != len(table):
            raise SecureAggregationError(
                f"secure aggregation of {self.graph.name!r}: two clients sent the same public key")
        self.table = table

    def masking(self, rp) -> RoundMasking:
        sources = {j: e.source for e, j in rp.aggregations if j in rp.secure and e.source}
        return RoundMasking(self.session, rp.index, rp.secure, self.table, sources)

    def unmask(self, rp, e, partials: list) -> np.ndarray:
        """The sum of one secure position from the groups' masked rows."""
        p, n = self.params, self.n
        rows: dict = {}
        for sp in partials:
            if sp is None:
                continue
            for i, row in zip(sp.clients, sp.rows, strict=True):
                if i in rows or not 0 <= i < n:
                    raise SecureAggregationError(
                        f"secure aggregation, round {rp.index} of {self.graph.name!r}: client "
                        f"{i} delivered twice or is not in the cohort of {n}")
                rows[i] = row
        missing = [i for i in range(n) if i not in rows]
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
            raise SecureAggregationError(
                f"secure aggregation, round {rp.index} of {self.graph.name!r}: clients "
                f"[{shown}] dropped out after masking ({len(rows)} of {n} delivered); their "
                "pairwise masks cannot be removed, so the sum is not revealed, and a derivative "
                "needs the same clients in every round: rerun with the clients that remain")
        size = int(np.prod(e.out.type.shape, dtype=np.int64))
        total = np.zeros(size, dtype=np.uint64)
        for i in range(n):
            if rows[i].shape != (size,):
                raise SecureAggregationError(
                    f"secure aggregation, round {rp.index} of {self.graph.name!r}: client {i} "
                    f"sent {rows[i].shape[0]} words for a sum of {size}")
            total += rows[i]
        k = p.modulus_bits
        if k < 64:
            total &= np.uint64((1 << k) - 1)
            signed = total.astype(np.int64)
            signed = np.where(signed >= (1 << (k - 1)), signed - (1 << k), signed)
        else:
            signed = total.view(np.int64)
        return (signed.astype(np.float64) / p.scale).reshape(e.out.type.shape)
