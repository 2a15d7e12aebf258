"""Cross-check fadcore derivatives against JAX (float64) on programs covering the op list.

Not a test (JAX is an optional, heavy dependency): run it where JAX is installed,
``pip install jax`` then ``python benchmarks/check_against_jax.py``. It prints the largest
relative error of every gradient in every fadcore mode, including values at kinks (exact zeros
for relu/abs/maximum) where conventions matter, and exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys

import numpy as np

import fadcore as fad
from fadcore import numpy as fnp

try:
    import jax
    import jax.numpy as jnp
except ImportError:
    sys.exit("this script needs JAX: pip install jax")

jax.config.update("jax_enable_x64", True)

rng = np.random.default_rng(0)
SIZES = (4, 7, 3)
D, C = 5, 3
Xs = [rng.normal(size=(n, D)) for n in SIZES]
Xs[0][0] = 0.0                 # a zero row: relu/abs/maximum kinks at exactly 0
labs = [rng.integers(0, C, size=n) for n in SIZES]
ys = [rng.normal(size=n) for n in SIZES]
alpha = rng.random(len(SIZES)) + 0.5


def programs(np_):
    """The same programs written against a NumPy-like module: fnp or jnp (+ nn helpers)."""
    if np_ is fnp:
        sce = fad.nn.softmax_cross_entropy
        clip = fad.nn.clip_by_norm
    else:
        def sce(logits, labels):
            return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
                logits, labels[:, None], axis=-1)[:, 0]

        def clip(x, c):
            return x * jnp.minimum(1.0, c / jnp.sqrt(jnp.sum(x * x)))

    relu = fnp.relu if np_ is fnp else jax.nn.relu
    sigmoid = fnp.sigmoid if np_ is fnp else jax.nn.sigmoid
    softplus = fnp.softplus if np_ is fnp else jax.nn.softplus
    log_softmax = fnp.log_softmax if np_ is fnp else jax.nn.log_softmax
    softmax = fnp.softmax if np_ is fnp else jax.nn.softmax
    one_hot = (lambda l, k: fnp.one_hot(l, k)) if np_ is fnp else (lambda l, k: jax.nn.one_hot(l, k))

    def mlp(p, X, lab, y):
        h = relu(X @ p["W1"] + p["b1"])
        logits = h @ p["W2"]
        return np_.mean(sce(logits, lab)) + 0.1 * np_.mean((np_.tanh(h).sum(axis=1) - y) ** 2)

    def kinks(p, X, lab, y):
        z = X @ p["W1"]
        a = np_.abs(z) + np_.maximum(z, 0.0) + np_.minimum(z, 0.0) * 0.5 + relu(z)
        return np_.mean(np_.max(a, axis=1, keepdims=True) * sigmoid(z)) + np_.sum(clip(p["b1"], 0.5))

    def softmaxes(p, X, lab, y):
        z = X @ p["W1"] @ p["W2"]
        lp = log_softmax(z, axis=1)
        return (np_.mean(np_.sum(one_hot(lab, C) * lp, axis=1)) + np_.mean(softmax(z)[:, 0])
                + np_.mean(softplus(z[:, 1:]) ** 1.5) + np_.mean(np_.log1p(np_.exp(z) ** 2)))

    def shapes(p, X, lab, y):
        z = np_.transpose(X @ p["W1"])
        s = np_.concatenate([z[:2], np_.expand_dims(np_.sum(z, axis=0), 0)], axis=0)
        t = np_.stack([s.sum(axis=1), s.mean(axis=1)], axis=1)
        return np_.sum(np_.reshape(t, (-1,)) ** 2) + np_.sum(np_.sqrt(p["b1"] ** 2 + 1.0)) \
            + np_.sum(np_.where(z > 0, z, np_.expm1(z)))

    return dict(mlp=mlp, kinks=kinks, softmaxes=softmaxes, shapes=shapes)


params = {"W1": rng.normal(size=(D, 4)) * 0.5, "b1": rng.normal(size=4) * 0.1,
          "W2": rng.normal(size=(4, C)) * 0.5}
params["b1"][0] = 0.0


def fed(local):
    @fad.trace(name=local.__name__)
    def f(p, alpha, X, lab, y):
        pc = {k: fad.broadcast(v) for k, v in p.items()}
        losses = local(pc, X, lab, y)
        return fad.weighted_mean(losses, alpha) + 0.5 * fad.mean(losses * losses)
    return f


def jax_fed(local):
    def f(p, alpha):
        losses = jnp.stack([local(p, jnp.asarray(X), jnp.asarray(l), jnp.asarray(y))
                            for X, l, y in zip(Xs, labs, ys)])
        return jnp.sum(alpha * losses) / jnp.sum(alpha) + 0.5 * jnp.mean(losses * losses)
    return f


def rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b)) / max(1e-300, np.max(np.abs(b)), 1.0))


worst = 0.0
args = (params, fad.clients(alpha), fad.clients(Xs), fad.clients(labs), fad.clients(ys))
for name, local in programs(fnp).items():
    jf = jax_fed(programs(jnp)[name])
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    jval = jf(jp, jnp.asarray(alpha))
    jg_p, jg_a = jax.grad(jf, argnums=(0, 1))(jp, jnp.asarray(alpha))
    f = fed(local)
    line = [f"{name:10s} value {rel(f(*args), jval):.1e}"]
    for mode in ("reverse", "mixed", "auto"):
        for state in ("stateful", "remat"):
            gp, ga = fad.grad(f, argnums=(0, 1), mode=mode, state=state)(*args)
            e = max(max(rel(gp[k], jg_p[k]) for k in gp), rel(np.array(ga.tolist()), jg_a))
            worst = max(worst, e)
            line.append(f"{mode}/{state} {e:.1e}")
    gf = fad.grad(f, argnums=0, mode="forward")(*args)
    e = max(rel(gf[k], jg_p[k]) for k in gf)
    worst = max(worst, e)
    line.append(f"forward {e:.1e}")
    # Hessian-vector product against jax's forward-over-reverse
    v = {k: rng.normal(size=np.shape(x)) for k, x in params.items()}
    hv = fad.hvp(f, args, (v, None, None, None, None))[0]
    jhv = jax.jvp(lambda p: jax.grad(jf)(p, jnp.asarray(alpha)), (jp,),
                  ({k: jnp.asarray(x) for k, x in v.items()},))[1]
    e = max(rel(hv[k], jhv[k]) for k in hv)
    worst = max(worst, e)
    line.append(f"hvp {e:.1e}")
    print("  ".join(line))

print(f"largest relative error vs JAX x64: {worst:.2e}")
sys.exit(0 if worst < 1e-10 else 1)
