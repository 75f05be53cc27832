"""Test doubles shared by the flow/sampler tests: a tiny MLP velocity network in plain JAX.

It stands in for the DiT so the flow and the samplers are tested on their own.
It has the DiT's call signature (x, t, positions, segment_ids, **inputs).
"""
import jax
import jax.numpy as jnp


def init_mlp(key, dim, width=128, depth=3, tdim=16):
    sizes = [dim + tdim] + [width] * depth + [dim]
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (a, b)) * (1.0 / a) ** 0.5, "b": jnp.zeros((b,))}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def time_features(t, tdim=16):
    freqs = jnp.exp(jnp.linspace(0.0, 4.0, tdim // 2))
    return jnp.concatenate([jnp.sin(t[..., None] * freqs), jnp.cos(t[..., None] * freqs)], -1)


def mlp_apply(params, x, t, positions=None, segment_ids=None, **inputs):
    h = jnp.concatenate([x, time_features(t)], -1)
    for layer in params[:-1]:
        h = jax.nn.gelu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]
