"""Compile the numba backend into its on-disk cache ahead of time.

    python -m fadcore.warmup        # or: fad warmup

The first run of fadcore's default backend in a fresh environment compiles its kernels and
interpreter (15-30 s, one log line says so); numba caches the machine code on disk
(``NUMBA_CACHE_DIR``, else ``__pycache__`` beside the package), and every later process loads
it in well under a second. Run this once after installing (or in a Docker build step) so that
no user-facing call pays the compile. It runs one small program through every kernel, on the
calling thread and in the parallel (prange) path.
"""

from __future__ import annotations

import sys
import time

import numpy as np

__all__ = ["warmup"]


def warmup(verbose: bool = True) -> float:
    """Compile (or load) every jitted function of the numba backend; returns the seconds."""
    t0 = time.perf_counter()
    import fadcore as fad
    from fadcore import numpy as fnp
    from fadcore.backends.numba import runtime

    def program(w, X, y, lab):
        z = X @ fad.broadcast(w)
        loss = fnp.mean(fnp.logaddexp(0.0, z) - y * z) + 0.1 * fnp.sum(
            fnp.take_along_axis(fnp.transpose(fnp.stack([z, -z])), lab[:, None], 1))
        return fad.mean(loss + fnp.max(z) * 0.0 + fnp.sum(X[:, 1:]) * 1e-3)

    rng = np.random.default_rng(0)
    rows = [3, 5, 2, 4]
    X = fad.clients([rng.normal(size=(r, 3)) for r in rows])
    y = fad.clients([(rng.random(r) < 0.5).astype(float) for r in rows])
    lab = fad.clients([rng.integers(0, 2, size=r) for r in rows])
    w = rng.normal(size=3)
    g = fad.value_and_grad(program)
    saved = runtime.PARALLEL_MIN_WORK
    try:
        for threshold in (saved, 0):        # serial, then the parallel path
            runtime.PARALLEL_MIN_WORK = threshold
            g(w, X, y, lab)
    finally:
        runtime.PARALLEL_MIN_WORK = saved
    dt = time.perf_counter() - t0
    if verbose:
        print(f"fadcore: numba backend ready ({dt:.1f} s); the compiled code is cached on disk")
    return dt


if __name__ == "__main__":
    warmup()
    sys.exit(0)
