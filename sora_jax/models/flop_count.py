"""Analytic FLOP counting while tracing: layers add 2 * MACs of what they compute.

    with count_flops() as box:
        jax.eval_shape(model_fn, ...)     # layers call add_flops(...) as they are traced
    box["flops"]

Used by the VAE (models/vae.py, models/vae_patching.py) for `vae_forward_flops`.
"""

from __future__ import annotations

import contextlib

_FLOPS: list[float] = []


@contextlib.contextmanager
def count_flops():
    _FLOPS.append(0.0)
    box = {"flops": 0.0}
    try:
        yield box
    finally:
        box["flops"] = _FLOPS.pop()


def add_flops(n: float) -> None:
    if _FLOPS:
        _FLOPS[-1] += float(n)
