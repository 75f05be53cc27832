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
from sora_jax.train import loop, muon, optim
from sora_jax.train import state as state_lib
from test_loop import run_steps
from model_helpers import fast_rngs


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
        model = stage.create_model(fast_rngs(0))
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


def _test_matrix(shape, kind, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.normal(size=shape).astype(np.float32)
    # A gradient-like spectrum: rank 4 plus small noise, so most singular values start near 0.
    low = rng.normal(size=(shape[0], 4)) @ rng.normal(size=(4, shape[1]))
    return (low + 1e-3 * rng.normal(size=shape)).astype(np.float32)


def _newton_schulz_float64(x, steps=5):
    """The direct iteration in float64 numpy: the reference both forms are held to."""
    a, b, c = muon.NS_COEFFS
    x = np.asarray(x, np.float64)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.linalg.norm(x) + 1e-8)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(432, 24), (24, 432), (48, 48), (64, 100)])
@pytest.mark.parametrize("kind", ["gaussian", "low_rank"])
@pytest.mark.parametrize("form, restarts, tolerance", [
    ("direct", (), 1e-4), ("gram", (), 5e-4), ("gram", (2,), 1e-4), ("auto", (), 5e-4)])
def test_newton_schulz_forms_match_the_float64_iteration(shape, kind, form, restarts, tolerance):
    """The Gram-space iteration is the same function of X as the direct one; in fp32 it differs
    by rounding only. On gradient-like (near rank-deficient) matrices that rounding is ~5x the
    direct form's (measured: 1e-4 against 2.5e-5 of the largest entry), and one restart brings it
    back to the direct form's. optax's direct iteration is held to the same reference."""
    from optax.contrib import _muon as optax_muon

    x = _test_matrix(shape, kind)
    expected = _newton_schulz_float64(x)
    relative_error = lambda y: np.abs(np.asarray(y, np.float64) - expected).max() / np.abs(expected).max()
    assert relative_error(muon.orthogonalize(x, form=form, gram_restarts=restarts)) < tolerance
    assert relative_error(optax_muon.orthogonalize_via_newton_schulz(x, np.asarray(muon.NS_COEFFS), 5)) < 1e-4


def test_auto_form_picks_gram_for_tall_matrices_only():
    assert muon.newton_schulz_flops(128, 3456, 5, "gram") < muon.newton_schulz_flops(128, 3456, 5, "direct") / 3
    assert muon.newton_schulz_flops(128, 128, 5, "gram") > muon.newton_schulz_flops(128, 128, 5, "direct")
    with pytest.raises(ValueError, match="form"):
        muon.orthogonalize(np.ones((4, 8), np.float32), form="svd")


def test_muon_update_matches_optax_contrib_muon():
    """Over a few steps on the VAE's parameters (Muon and AdamW sides, decay, clipping), the
    optimizer equals optax.contrib.muon, whose iteration it replaces."""
    stage, params = _vae_params()
    config = config_lib.load_config("configs/vae.py:micro")
    config.optim.update(name="muon", warmup_steps=0, weight_decay=0.01)
    ours = optim.make_optimizer(config.optim, 10, stage.weight_decay_mask, stage.muon_dimension_numbers)
    reference = optax.chain(optax.clip_by_global_norm(float(config.optim.grad_clip)), optax.contrib.muon(
        optim.learning_rate_schedule(config.optim, 10), beta=float(config.optim.muon_beta), eps=float(config.optim.eps),
        weight_decay=0.01, weight_decay_mask=stage.weight_decay_mask, adam_b1=float(config.optim.b1),
        adam_b2=float(config.optim.b2), muon_weight_dimension_numbers=stage.muon_dimension_numbers,
        consistent_rms=float(config.optim.muon_consistent_rms)))
    ours_state, reference_state = ours.init(params), reference.init(params)
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = jax.tree.map(lambda x: (0.01 * rng.normal(size=x.shape)).astype(np.float32), params)
        got, ours_state = jax.jit(ours.update)(grads, ours_state, params)
        want, reference_state = jax.jit(reference.update)(grads, reference_state, params)
        scale = max(float(np.abs(np.asarray(w)).max()) for w in jax.tree.leaves(want))
        assert scale > 0
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5 * scale)
        params = optax.apply_updates(params, got)
