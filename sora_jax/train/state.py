"""The train state, created from its abstract shapes with the shardings it will live in.

The state is a plain pytree dict, so jit, orbax and the tests see one thing:

  step       int32 scalar
  params     nnx.State of the trainable variables (Stage.trainable_filter)
  frozen     nnx.State of every other model variable (often empty)
  opt_state  optax state (its moments carry the params' logical annotations)
  ema        nnx.State, exponential moving average of params (absent if ema_decay == 0)
  rng        uint32[2] base key; step keys are fold_in(rng, step), so resume is exact

The nnx graphdef (the model's static structure) stays outside the state; the
train step merges it back with `nnx.merge(graphdef, params, frozen)`.

Recipe (big_vision / MaxText): `jax.eval_shape(init)` under the mesh and the
logical rules gives the abstract state with its annotations, the annotations
give NamedShardings, and `jax.jit(init, out_shardings=...)` materialises every
array directly on its devices, never whole on one host.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from sora_jax import sharding, xla_options
from sora_jax.train import optim as optim_lib


@dataclasses.dataclass
class TrainSetup:
    graphdef: Any
    abstract_state: Any  # pytree of jax.ShapeDtypeStruct (with .sharding set)
    shardings: Any  # pytree of NamedSharding, same structure as the state
    optimizer: optax.GradientTransformation
    init: Callable[[], Any]  # jitted; returns the sharded initial state


def build_train_setup(stage, config: ml_collections.ConfigDict, mesh, rules) -> TrainSetup:
    """Abstract state, shardings and a jitted init. Call under jax.set_mesh + logical_axis_rules."""
    # Stages written against the first protocol have no weight_decay_mask: use the default.
    decay_mask = getattr(stage, "weight_decay_mask", None) or optim_lib.default_decay_mask
    muon_dims = getattr(stage, "muon_dimension_numbers", None)
    optimizer = optim_lib.make_optimizer(config.optim, int(config.train.steps), decay_mask, muon_dims)
    use_ema = float(config.optim.ema_decay) > 0
    captured = {}

    def init():
        key = jax.random.PRNGKey(int(config.seed))
        model_key, loop_key = jax.random.split(key)
        model = stage.create_model(nnx.Rngs(model_key))
        graphdef, params, frozen = nnx.split(model, stage.trainable_filter(), ...)
        captured["graphdef"] = graphdef
        state = dict(
            step=jnp.zeros((), jnp.int32),
            params=params,
            frozen=frozen,
            opt_state=optimizer.init(params),
            rng=loop_key,
        )
        if use_ema:
            state["ema"] = jax.tree.map(jnp.copy, params)
        return state

    abstract = jax.eval_shape(init)
    shardings = sharding.state_shardings(abstract, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return TrainSetup(
        graphdef=captured["graphdef"],
        abstract_state=abstract,
        shardings=shardings,
        optimizer=optimizer,
        init=jax.jit(init, out_shardings=shardings, compiler_options=xla_options.init_compiler_options()),
    )


def count_params(tree: Any) -> int:
    return int(sum(int(x.size) for x in jax.tree.leaves(tree)))


def cast_floating(tree: Any, dtype) -> Any:
    """Mixed precision: cast floating leaves (the fp32 master params) to the compute dtype."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# --- the update ---------------------------------------------------------------------


def _split_microbatches(x: jax.Array, microbatches: int, names) -> jax.Array:
    """(B, ...) -> (microbatches, B/microbatches, ...) without moving rows between devices.

    Each device holds a contiguous block of rows; taking every `microbatches`-th
    row (reshape to (B/m, m) then swap) gives every microbatch a share of every
    device's block, so the batch sharding carries over to each microbatch.
    """
    b = x.shape[0]
    x = x.reshape((b // microbatches, microbatches) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    names = tuple(names) + (None,) * (x.ndim - 1 - len(names))
    return sharding.constrain(x, (None,) + names[: x.ndim - 1])


def make_train_step(stage, setup: TrainSetup, config: ml_collections.ConfigDict) -> Callable:
    """The pure update: state, global batch -> new state, scalar metrics (jit it with shardings).

    Gradient accumulation (config.optim.microbatches = m) scans over m splits of
    the global batch and averages their gradients, so the optimizer sees the
    same mean gradient as one big batch of the same size. Each microbatch gets
    the key fold_in(step_key, i), so stochastic losses differ from the big
    batch only in which noise each example draws.

    A non-finite loss or gradient norm leaves the whole state unchanged
    (`ok` = False in the metrics); the host then stops the run, so a poisoned
    state can never reach a checkpoint.
    """
    graphdef, optimizer = setup.graphdef, setup.optimizer
    microbatches = int(config.optim.microbatches)
    ema_decay = float(config.optim.ema_decay)
    param_dtype = jnp.dtype(config.precision.param_dtype)
    compute_dtype = jnp.dtype(config.precision.compute_dtype)
    schedule = optim_lib.learning_rate_schedule(config.optim, int(config.train.steps))
    axes = stage.batch_axes()

    def loss_fn(params, frozen, batch, key):
        if compute_dtype != param_dtype:
            params = cast_floating(params, compute_dtype)  # grads still flow to the fp32 masters
        model = nnx.merge(graphdef, params, frozen)
        loss, metrics = stage.loss(model, batch, key)
        return loss.astype(jnp.float32), metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch):
        key = jax.random.fold_in(state["rng"], state["step"])
        params, frozen = state["params"], state["frozen"]
        if microbatches == 1:
            (loss, metrics), grads = grad_fn(params, frozen, batch, key)
        else:
            split = {
                k: _split_microbatches(v, microbatches, axes.get(k, ("activation_batch",)))
                for k, v in batch.items()
            }

            def accumulate(carry, xs):
                index, micro = xs
                (l, m), g = grad_fn(params, frozen, micro, jax.random.fold_in(key, index))
                return jax.tree.map(jnp.add, carry, (l, m, g)), None

            zero_metrics = jax.eval_shape(lambda: grad_fn(params, frozen, {k: v[0] for k, v in split.items()}, key))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zero_metrics[0][0], zero_metrics[0][1], zero_metrics[1]))
            total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), split))
            loss, metrics, grads = jax.tree.map(lambda x: x / microbatches, total)

        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = dict(state, step=state["step"] + 1, params=new_params, opt_state=opt_state)
        if "ema" in state:
            new_state["ema"] = jax.tree.map(
                lambda e, p: ema_decay * e + (1.0 - ema_decay) * p.astype(e.dtype), state["ema"], new_params
            )
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        out = {f"train/{k}": jnp.mean(v).astype(jnp.float32) for k, v in metrics.items()}
        out.update({"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": schedule(state["step"]),
                    "train/param_norm": optax.tree.norm(new_params), "ok": ok.astype(jnp.float32)})
        return new_state, out

    return train_step


def make_eval_step(stage, setup: TrainSetup, config: ml_collections.ConfigDict) -> Callable:
    """(params, frozen, batch, index) -> held-out metrics; the key depends only on the batch index."""
    graphdef = setup.graphdef
    eval_key = jax.random.PRNGKey(int(config.seed) + 1_000_003)

    def eval_step(params, frozen, batch, index):
        model = nnx.merge(graphdef, params, frozen)
        metrics = stage.eval_metrics(model, batch, jax.random.fold_in(eval_key, index))
        return {k: jnp.mean(v).astype(jnp.float32) for k, v in metrics.items()}

    return eval_step
