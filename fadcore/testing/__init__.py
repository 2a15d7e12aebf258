"""Testing utilities: the gradient checker and hypothesis strategies for federated programs."""

from .gradcheck import check_grads, check_jvp, check_vjp, numerical_jvp

__all__ = ["check_grads", "check_jvp", "check_vjp", "numerical_jvp"]
