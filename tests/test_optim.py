"""The optimizer: Muon's matrix views, Muon through the train step on 1 and 8 devices, and its checkpoints."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from optax.contrib import MuonDimensionNumbers as Dims

import helpers_stage
from sora_jax import config_lib, sharding
from sora_jax.train import checkpoint as ckpt_lib
from sora_jax.train import loop, optim
from sora_jax.train import state as state_lib
from test_loop import run_steps


@pytest.mark.parametrize("names, expected", [
    (("embed", "mlp"), Dims((0,), (1,))),
    (("embed", None, "heads", "kv"), Dims((0,), (1, 2, 3))),  # fused qkv: one [embed, 3*heads*kv] matrix
    (("layers", "mlp", "embed"), Dims((1,), (2,))),  # a scanned stack: one matrix per layer
    (("kernel_t", "kernel_h", "kernel_w", "conv_in", "conv_out"), Dims((0, 1, 2, 3), (4,))),
    ((None, None, None), Dims((0, 1), (2,))),  # unnamed: the last axis is the output
    (("layers", "embed"), None),  # nothing left for the output
])
def test_muon_view_from_logical_names(names, expected):
    assert optim.muon_view(names) == expected


def _vae_params():
    from sora_jax.stages.vae import VAEStage

    stage = VAEStage(config_lib.load_config("configs/vae.py:micro"))
    with nnx.use_eager_sharding(False):
        model = stage.create_model(nnx.Rngs(0))
    return stage, nnx.split(model, stage.trainable_filter(), ...)[1]


def test_vae_muon_covers_the_inner_convs_and_keeps_rgb_and_shortcut_on_adamw():
    stage, params = _vae_params()
    dims = stage.muon_dimension_numbers(params)
    leaves = jax.tree_util.tree_leaves_with_path(dims, is_leaf=lambda x: x is None or isinstance(x, Dims))
    on = {optim.path_name(p): d for p, d in leaves if d is not None}
    off = {optim.path_name(p) for p, d in leaves if d is None}
    assert {"encoder/conv_in/kernel", "decoder/conv_out/kernel", "shortcut/enc_kernel", "shortcut/dec_kernel"} <= off
    assert not any("bias" in p or "norm" in p for p in on)
    assert "decoder/layers/0/conv1/kernel" in on
    assert set(on.values()) == {Dims((0, 1, 2, 3), (4,))}  # every conv kernel: [kt*kh*kw*cin, cout]


def test_muon_updates_are_orthogonalised_at_adamw_rms():
    """On a muon matrix the first update (zero momentum, so the gradient itself) is lr x 0.2 x
    sqrt(max(fan_in, fan_out)) x an orthogonal matrix: its singular values are all equal."""
    config = helpers_stage.get_config("")
    config.optim.update(name="muon", schedule="constant", warmup_steps=0, lr=1.0, grad_clip=0.0, weight_decay=0.0)
    params = {"kernel": nnx.Param(np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)),
              "b": nnx.Param(np.zeros(8, np.float32))}
    params = nnx.State(params)
    tx = optim.make_optimizer(config.optim, 10)
    grads = jax.tree.map(lambda x: np.random.default_rng(1).normal(size=x.shape).astype(np.float32), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    s = np.linalg.svd(np.asarray(updates["kernel"][...]), compute_uv=False)
    # Newton-Schulz (5 steps, Muon's quintic) maps singular values into roughly [0.7, 1.2], not exactly 1.
    assert s.min() > 0.6 * s.max()
    # An orthogonal 16x8 matrix has RMS 1/4; scaled by 0.2 x sqrt(16) that is AdamW's ~0.2.
    assert 0.5 < np.sqrt(np.mean(np.asarray(updates["kernel"][...]) ** 2)) / 0.2 < 1.5
    assert not np.allclose(np.asarray(updates["b"][...]), 0)  # the bias trains too, on AdamW


def test_unknown_optimizer_name_is_a_clear_error():
    config = helpers_stage.get_config("")
    config.optim.name = "lamb"
    with pytest.raises(ValueError, match="optim.name"):
        optim.make_optimizer(config.optim, 10)


def test_muon_one_and_eight_devices_agree_and_train():
    config = helpers_stage.get_config("steps=3")
    config.optim.name = "muon"
    one_losses, one = run_steps(config, jax.devices()[:1], {"data": 1}, 3)
    eight_losses, eight = run_steps(config, jax.devices(), {"data": 2, "fsdp": 2, "tensor": 2}, 3)
    np.testing.assert_allclose(eight_losses, one_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(eight["params"]), jax.tree.leaves(one["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert one_losses[-1] < one_losses[0]
    adam_losses, _ = run_steps(helpers_stage.get_config("steps=3"), jax.devices()[:1], {"data": 1}, 3)
    assert not np.allclose(adam_losses[1:], one_losses[1:])  # it is not AdamW under another name


def test_muon_state_checkpoints_and_restores(tmp_path):
    """Muon's state holds optax MaskedNodes (the parameters each side skips): the state's
    shardings keep them, and orbax saves and restores the state with them."""
    workdir = str(tmp_path / "w")
    config = helpers_stage.get_config("steps=4,quiet")
    config.optim.name = "muon"
    config.mesh.update(data=2, fsdp=2, tensor=2)
    loop.train(config, workdir)
    stage = helpers_stage.RegressionStage(config)
    rules = sharding.rules_from_config(config.sharding_rules)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices())
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        setup = state_lib.build_train_setup(stage, config, mesh, rules)
        assert any(isinstance(x, optax.MaskedNode) for x in jax.tree.leaves(
            setup.abstract_state["opt_state"], is_leaf=lambda x: isinstance(x, optax.MaskedNode)))
        ckpt = ckpt_lib.Checkpointer(workdir)
        state = ckpt.restore(4, setup.abstract_state)
        ckpt.close()
    assert int(state["step"]) == 4
    momentum = [x for x in jax.tree.leaves(state["opt_state"]) if getattr(x, "shape", ()) == (16, 8)]
    assert momentum and any(np.abs(np.asarray(m)).sum() > 0 for m in momentum)
    # Resuming continues to step 6 from the restored state.
    config.train.steps = 6
    assert loop.train(config, workdir).step == 6
