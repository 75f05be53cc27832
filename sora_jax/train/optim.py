"""Optimizer: AdamW or Muon, with warmup + cosine/constant schedule, clipping and a decay mask.

Everything is read from `config.optim` (see config_lib.base_config). The
learning rate is per stage simply because every stage has its own config.
Weight decay skips norms, biases and embeddings by default (the usual
transformer recipe); a stage may override `Stage.weight_decay_mask`.

`optim.name="muon"` (sora_jax/train/muon.py: optax.contrib.muon's recipe with the
Newton-Schulz iteration in Gram space) orthogonalises the momentum of the weight
matrices that `Stage.muon_dimension_numbers` names (5 steps) and
trains every other parameter with AdamW, both on the one schedule. The update's RMS
is scaled to AdamW's (`muon_consistent_rms=0.2`, Liu et al. 2025), so a config's
AdamW learning rate carries over. Measured on the quick VAE: docs/vae.md, sprint 13.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax
from flax import nnx
from optax.contrib import MuonDimensionNumbers

from sora_jax.train import muon as muon_lib

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


def _logical_names(variable) -> tuple:
    names = variable.get_metadata().get("out_sharding") if hasattr(variable, "get_metadata") else None
    return tuple(names) if names else (None,) * variable.ndim


def muon_view(names: tuple) -> MuonDimensionNumbers | None:
    """Muon's matrix view of a weight from its logical axis names.

    "layers" (a scanned stack) is a batch axis: each layer is its own matrix. Of the other
    axes, the leading "kernel_*" window axes and the next axis are contracted, the rest are
    the output: a dense [embed, mlp] or [mlp, embed] kernel is itself, a fused qkv
    [embed, 3, heads, kv] one [embed, 3*heads*kv] matrix, a conv kernel [kernel_t, kernel_h,
    kernel_w, conv_in, conv_out] one [kt*kh*kw*cin, cout] matrix. Without names the last axis
    is the output. None when no axis is left for the output.
    """
    axes = [i for i, n in enumerate(names) if n != "layers"]
    if all(n is None for n in names):
        reduction = axes[:-1]
    else:
        window = 0
        while window < len(axes) and str(names[axes[window]]).startswith("kernel_"):
            window += 1
        reduction = axes[:window + 1]
    output = [i for i in axes if i not in reduction]
    if not reduction or not output:
        return None
    return MuonDimensionNumbers(tuple(reduction), tuple(output))


def default_muon_dimension_numbers(params: Any, decay_mask=default_decay_mask) -> Any:
    """For `optim.name="muon"`: Muon on every decayed kernel (`decay_mask`: not norms, biases or
    embeddings; and named "...kernel", so no position table), viewed as a matrix by `muon_view`;
    None (AdamW) for the rest. A prefix tree of `params` (one entry per nnx Variable)."""
    is_var = lambda x: isinstance(x, nnx.Variable)
    decays = decay_mask(params)

    def view(path, variable, decay):
        # Kernels only: a decayed table (a position embedding) is not a linear map.
        if not path_name(path).endswith("kernel") or not any(jax.tree.leaves(decay)) or variable.ndim < 2:
            return None
        return muon_view(_logical_names(variable))

    return jax.tree_util.tree_map_with_path(view, params, decays, is_leaf=is_var)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, decay_mask=default_decay_mask,
                   muon_dimension_numbers=None) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (or Muon, `optim.name`) with the schedule.

    `decay_mask(params) -> pytree of bools`: decay only where True.
    `muon_dimension_numbers(params) -> pytree of MuonDimensionNumbers | None`: Muon's
    matrices (default: `default_muon_dimension_numbers` under `decay_mask`).
    """
    parts = []
    if optim.grad_clip and float(optim.grad_clip) > 0:
        parts.append(optax.clip_by_global_norm(float(optim.grad_clip)))
    schedule = learning_rate_schedule(optim, total_steps)
    name = optim.get("name", "adamw")
    if name == "adamw":
        parts.append(optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                                 weight_decay=float(optim.weight_decay), mask=decay_mask))
    elif name == "muon":
        dims = muon_dimension_numbers or (lambda params: default_muon_dimension_numbers(params, decay_mask))
        parts.append(muon_lib.muon(
            schedule,
            dims,
            beta=float(optim.muon_beta),
            eps=float(optim.eps),
            # Decoupled decay on the Muon matrices (a subset of the decayed set by default); the
            # AdamW side (norms, biases, embeddings, a stage's excluded layers) never decays. That
            # side is optax's Nesterov AdamW, as in optax.contrib.muon.
            weight_decay=float(optim.weight_decay),
            weight_decay_mask=decay_mask,
            adam_b1=float(optim.b1),
            adam_b2=float(optim.b2),
            consistent_rms=None if optim.muon_consistent_rms is None else float(optim.muon_consistent_rms),
            form=str(optim.get("muon_ns_form", "auto")),
            gram_restarts=tuple(int(k) for k in optim.get("muon_gram_restarts", ())),
        ))
    else:
        raise ValueError(f"config.optim.name must be 'adamw' or 'muon', got {name!r}")
    return optax.chain(*parts)
