"""Compatibility name of :mod:`fadcore.backends.numba.kernels`."""

from .numba.kernels import *  # noqa: F401,F403
