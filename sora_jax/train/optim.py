"""Optimizer: AdamW with warmup + cosine/constant schedule, clipping and a decay mask.

Everything is read from `config.optim` (see config_lib.base_config). The
learning rate is per stage simply because every stage has its own config.
Weight decay skips norms, biases and embeddings by default (the usual
transformer recipe); a stage may override `Stage.weight_decay_mask`.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

# Parameter-path fragments that never get weight decay by default.
NO_DECAY_FRAGMENTS = ("norm", "bias", "embed", "scale", "pos_emb", "ln")


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine decay to lr*min_lr_ratio, or constant."""
    lr, warmup = float(optim.lr), int(optim.warmup_steps)
    if optim.schedule == "constant":
        if warmup <= 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=lr,
            warmup_steps=max(warmup, 0),
            decay_steps=max(int(total_steps), warmup + 1),
            end_value=lr * float(optim.min_lr_ratio),
        )
    raise ValueError(f"config.optim.schedule must be 'cosine' or 'constant', got {optim.schedule!r}")


def path_name(path) -> str:
    """'blocks/0/attn/qkv/kernel' from a jax key path (ignores the nnx '.value' leaf key)."""
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        if name == "value":
            continue
        parts.append(str(name))
    return "/".join(parts)


def default_decay_mask(params: Any) -> Any:
    """True for matrices/kernels; False for 1-D params and anything named like a norm, bias or embedding."""

    def decays(path, leaf):
        name = path_name(path).lower()
        if getattr(leaf, "ndim", 0) <= 1:
            return False
        return not any(frag in part for part in name.split("/") for frag in NO_DECAY_FRAGMENTS)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, decay_mask=default_decay_mask) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the schedule.

    `decay_mask(params) -> pytree of bools`: decay only where True.
    """
    parts = []
    if optim.grad_clip and float(optim.grad_clip) > 0:
        parts.append(optax.clip_by_global_norm(float(optim.grad_clip)))
    parts.append(
        optax.adamw(
            learning_rate_schedule(optim, total_steps),
            b1=float(optim.b1),
            b2=float(optim.b2),
            eps=float(optim.eps),
            weight_decay=float(optim.weight_decay),
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)
