"""Muon with the Newton-Schulz iteration run in Gram space (`optim.name="muon"`).

Muon (Jordan 2024) orthogonalises each weight matrix's Nesterov momentum with five quintic
Newton-Schulz steps, X <- a X + b (X X^T) X + c (X X^T)^2 X, for X of shape [m, n], m <= n.
Each step costs two [m, m] x [m, n] sized matmuls, ten per update. A conv kernel viewed as
[kt*kh*kw*cin, cout] is tall (3456 x 128 in the VAE), so those ten rectangular matmuls are
most of the optimizer's time: at the quick VAE's batch they cost more than its forward and
backward on a CPU (docs/vae.md, sprint 13).

Every step multiplies X on the left by a polynomial in its own Gram matrix: X_{k+1} = Q_k X_k
with Q_k = a I + b A_k + c A_k^2 and A_k = X_k X_k^T. Q_k commutes with A_k, so
A_{k+1} = Q_k A_k Q_k and X_5 = (Q_4 ... Q_0) X_0: the whole iteration runs on [m, m]
matrices, with one rectangular matmul to form A_0 and one to apply the product (Dao lab,
"Gram Newton-Schulz", 2026). That is the same function of X_0, not an approximation; it
differs from the direct form by rounding only, which the tests bound against optax's
`orthogonalize_via_newton_schulz`. The blog's restarts (rebuild X and its Gram matrix from
the product part-way) are for half-precision matmuls; here the iteration runs in fp32 at
HIGHEST precision, and `gram_restarts` keeps the option. The form is chosen per matrix by
its FLOPs: square-ish matrices (n < ~1.5 m) keep the direct iteration.

The rest is optax.contrib.muon's recipe, which this replaces for the orthogonalisation only:
Nesterov momentum (beta), Frobenius pre-scaling, the update RMS matched to AdamW's
(`consistent_rms`, Liu et al. 2025), decoupled weight decay and the schedule; the other
parameters (norms, biases, a stage's excluded layers) train with optax's Nesterov AdamW.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

# Keller Jordan's quintic coefficients, as in optax (_DEFAULT_NS_COEFFS).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


def newton_schulz_flops(m: int, n: int, steps: int, form: str, gram_restarts: tuple = ()) -> int:
    """Multiply-adds of `steps` iterations on an [m, n] matrix, m <= n, in either form."""
    if form == "direct":
        return steps * (2 * m * m * n + m ** 3)  # X X^T, (bA + cA^2) X; A^2
    # A_0 and the final P X_0; per step A^2 and Q P, and Q A Q for all but the last; a restart
    # rebuilds X and A (two rectangular matmuls).
    restarts = sum(1 for k in gram_restarts if 0 < k < steps)
    return (2 + 2 * restarts) * m * m * n + steps * 2 * m ** 3 + (steps - 1) * 2 * m ** 3 - m ** 3


def orthogonalize(x: jax.Array, steps: int = 5, coeffs=NS_COEFFS, eps: float = 1e-8,
                  form: str = "auto", gram_restarts: tuple = ()) -> jax.Array:
    """Newton-Schulz orthogonalisation of one 2-D matrix (Frobenius pre-scaling, fp32).

    form: "direct" (optax's iteration), "gram" (above) or "auto" (the one with fewer FLOPs).
    gram_restarts: Gram-form steps before which X is rebuilt from the running product and
    its Gram matrix recomputed (two more rectangular matmuls each).
    """
    if x.ndim != 2:
        raise ValueError(f"orthogonalize expects a 2-D matrix, got shape {x.shape}")
    dtype = x.dtype
    x = x.astype(jnp.float32)
    transposed = x.shape[0] > x.shape[1]
    if transposed:  # iterate on the side with the smaller Gram matrix, as optax does
        x = x.T
    m, n = x.shape
    if form == "auto":
        form = min(("direct", "gram"), key=lambda f: newton_schulz_flops(m, n, steps, f, gram_restarts))
    if form not in ("direct", "gram"):
        raise ValueError(f"form must be 'auto', 'direct' or 'gram', got {form!r}")
    a, b, c = coeffs
    x = x / (jnp.linalg.norm(x) + eps)
    if form == "direct":
        for _ in range(steps):
            gram = _mm(x, x.T)
            x = a * x + _mm(b * gram + c * _mm(gram, gram), x)
    else:
        eye = jnp.eye(m, dtype=x.dtype)
        gram, product = _mm(x, x.T), None
        for k in range(steps):
            if k in gram_restarts and product is not None:
                x, product = _mm(product, x), None
                gram = _mm(x, x.T)
            q = a * eye + b * gram + c * _mm(gram, gram)
            product = q if product is None else _mm(q, product)
            if k < steps - 1:
                gram = _mm(_mm(q, gram), q)
        x = _mm(product, x)
    if transposed:
        x = x.T
    return x.astype(dtype)


def _axes(x: jax.Array, dims: MuonDimensionNumbers) -> tuple[tuple, tuple, tuple]:
    as_tuple = lambda a: (a,) if isinstance(a, int) else tuple(a)
    reduction = tuple(ax % x.ndim for ax in as_tuple(dims.reduction_axis))
    output = tuple(ax % x.ndim for ax in as_tuple(dims.output_axis))
    if set(reduction) & set(output):
        raise ValueError(f"Muon reduction and output axes overlap: {dims} for shape {x.shape}")
    batch = tuple(ax for ax in range(x.ndim) if ax not in reduction + output)
    return batch, reduction, output


def orthogonalize_weight(x: jax.Array, dims: MuonDimensionNumbers, **kwargs) -> jax.Array:
    """`orthogonalize` on a weight viewed as [batch..., reduction, output] matrices (optax's view)."""
    batch, reduction, output = _axes(x, dims)
    order = batch + reduction + output
    size = lambda axes: math.prod(x.shape[ax] for ax in axes)
    flat = x.transpose(order).reshape(size(batch), size(reduction), size(output))
    flat = jax.vmap(lambda w: orthogonalize(w, **kwargs))(flat)
    inverse = tuple(sorted(range(x.ndim), key=lambda i: order[i]))
    return flat.reshape(tuple(x.shape[ax] for ax in order)).transpose(inverse)


def rms_scale(x: jax.Array, dims: MuonDimensionNumbers, consistent_rms: float | None) -> float:
    """optax's update scaling: sqrt(max(fan_in, fan_out)) * consistent_rms (Liu et al. 2025),
    which gives an orthogonal update AdamW's RMS; without it, sqrt(max(1, fan_out / fan_in))."""
    _, reduction, output = _axes(x, dims)
    fan_in, fan_out = (math.prod(x.shape[ax] for ax in axes) for axes in (reduction, output))
    if consistent_rms is None:
        return math.sqrt(max(1.0, fan_out / fan_in))
    return math.sqrt(max(fan_in, fan_out)) * consistent_rms


class ScaleByMuonState(NamedTuple):
    count: jax.Array  # int32 scalar
    mu: Any  # the momentum, like the parameters


_is_dims = lambda x: isinstance(x, MuonDimensionNumbers)


def scale_by_muon(weight_dimension_numbers: Callable[[Any], Any], beta: float = 0.95, steps: int = 5,
                  eps: float = 1e-8, consistent_rms: float | None = 0.2, form: str = "auto",
                  gram_restarts: tuple = ()) -> optax.GradientTransformation:
    """Nesterov momentum, orthogonalised per matrix and scaled to AdamW's RMS (optax's
    scale_by_muon followed by its scale_by_shape, with `orthogonalize` for the iteration)."""

    def init_fn(params):
        return ScaleByMuonState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        count = optax.safe_increment(state.count)
        nesterov = jax.tree.map(
            lambda m, g: beta * m + (1 - beta) * g,
            optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
            optax.tree.bias_correction(updates, beta, count))

        def one(x, dims):
            x = orthogonalize_weight(x, dims, steps=steps, eps=eps, form=form, gram_restarts=gram_restarts)
            return rms_scale(x, dims, consistent_rms) * x

        updates = jax.tree.map(one, nesterov, weight_dimension_numbers(updates), is_leaf=_is_dims)
        return updates, ScaleByMuonState(count=count, mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


def muon(learning_rate, weight_dimension_numbers: Callable[[Any], Any], *, beta: float = 0.95,
         eps: float = 1e-8, weight_decay: float = 0.0, weight_decay_mask=None, adam_b1: float = 0.9,
         adam_b2: float = 0.999, consistent_rms: float | None = 0.2, steps: int = 5, form: str = "auto",
         gram_restarts: tuple = ()) -> optax.GradientTransformation:
    """Muon on the parameters that `weight_dimension_numbers(params)` gives MuonDimensionNumbers
    (a prefix tree; None elsewhere), optax's Nesterov AdamW on the rest, as optax.contrib.muon."""
    is_leaf = lambda x: x is None or _is_dims(x) or isinstance(x, optax.MaskedNode)

    def labels(params):
        return jax.tree.map(lambda d, sub: jax.tree.map(lambda _: "muon" if d is not None else "adam", sub),
                            weight_dimension_numbers(params), params, is_leaf=is_leaf)

    def muon_side_dims(updates):
        # optax.partition hands the Muon chain the updates with MaskedNodes where AdamW's
        # parameters are; the dimension numbers must have the same structure.
        on = jax.tree.map(lambda label: label == "muon", labels(updates))
        return jax.tree.map(lambda d, sub: jax.tree.map(lambda keep: d if keep else optax.MaskedNode(), sub),
                            weight_dimension_numbers(updates), on, is_leaf=is_leaf)

    return optax.partition(
        transforms={
            "muon": optax.chain(
                scale_by_muon(muon_side_dims, beta=beta, steps=steps, eps=eps, consistent_rms=consistent_rms,
                              form=form, gram_restarts=gram_restarts),
                optax.add_decayed_weights(weight_decay, weight_decay_mask),
                optax.scale_by_learning_rate(learning_rate),
            ),
            "adam": optax.adamw(learning_rate, b1=adam_b1, b2=adam_b2, eps=eps, weight_decay=0.0, nesterov=True),
        },
        param_labels=labels,
    )
