"""The train step: 1 vs 8 devices agree, gradient accumulation equals the big batch, mixed precision."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import helpers_stage
from sora_jax import sharding
from sora_jax.train import state as state_lib


def run_steps(config, devices, mesh_axes, num_steps):
    """num_steps updates of the test stage on a mesh over `devices`; returns (losses, state on host)."""
    stage = helpers_stage.RegressionStage(config)
    rules = sharding.rules_from_config(config.sharding_rules)
    mesh = sharding.make_mesh(mesh_axes, devices)
    iterator = stage.train_batches(0, 1)
    losses = []
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        setup = state_lib.build_train_setup(stage, config, mesh, rules)
        step = jax.jit(state_lib.make_train_step(stage, setup, config),
                       out_shardings=(setup.shardings, NamedSharding(mesh, P())), donate_argnums=(0,))
        state = setup.init()
        for _ in range(num_steps):
            batch = sharding.global_batch(next(iterator), mesh, rules, stage.batch_axes())
            state, out = step(state, batch)
            losses.append(float(out["train/loss"]))
        kernel = state["params"]["up"]["kernel"][...]
        assert len(kernel.sharding.device_set) == len(devices)
    return np.array(losses), jax.device_get(state)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_one_device_and_eight_devices_agree():
    config = helpers_stage.get_config("steps=3")
    one_losses, one = run_steps(config, jax.devices()[:1], {"data": 1}, 3)
    eight_losses, eight = run_steps(config, jax.devices(), {"data": 2, "fsdp": 2, "tensor": 2}, 3)
    np.testing.assert_allclose(eight_losses, one_losses, rtol=1e-5)
    for a, b in zip(_leaves(eight["params"]), _leaves(one["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert one_losses[-1] < one_losses[0]  # it does train


def test_gradient_accumulation_equals_big_batch():
    config = helpers_stage.get_config("micro=1")
    big_losses, big = run_steps(config, jax.devices(), {"data": 2, "fsdp": 2, "tensor": 2}, 2)
    config = helpers_stage.get_config("micro=2")
    acc_losses, acc = run_steps(config, jax.devices(), {"data": 2, "fsdp": 2, "tensor": 2}, 2)
    np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)
    for key in ("params", "ema"):
        for a, b in zip(_leaves(acc[key]), _leaves(big[key])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mixed_precision_keeps_fp32_masters():
    config = helpers_stage.get_config("")
    config.precision.compute_dtype = "bfloat16"
    losses, state = run_steps(config, jax.devices()[:2], {"data": 2}, 2)
    ref_losses, _ = run_steps(helpers_stage.get_config(""), jax.devices()[:2], {"data": 2}, 2)
    assert all(x.dtype == np.float32 for x in _leaves(state["params"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=3e-2)
    assert not np.allclose(losses, ref_losses, rtol=1e-7)  # bf16 compute really happened


def test_eval_mean_weights_each_batch_by_its_count():
    from sora_jax.train.metrics import weighted_eval_mean

    # 3 examples at loss 1.0, then a partial batch of 1 at 5.0: the mean over examples is 2.0
    # (an unweighted mean of the batch means would say 3.0).
    out = weighted_eval_mean([{"loss": np.float32(1.0), "count": 3.0}, {"loss": 5.0, "count": 1.0}])
    assert out == {"loss": 2.0, "count": 4.0}
    assert weighted_eval_mean([{"loss": 1.0}, {"loss": 5.0}]) == {"loss": 3.0, "count": 2.0}  # no count: 1 each
    assert weighted_eval_mean([]) == {}
    with pytest.raises(ValueError, match="no real examples"):
        weighted_eval_mean([{"loss": 1.0, "count": 0.0}])
