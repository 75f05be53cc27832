"""Rectified flow: time shift, loss weighting, fixed-noise eval, and a known-answer flow."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sora_jax.diffusion import rectified_flow as rf
from sora_jax.diffusion import samplers

import flow_doubles


def test_time_shift_identity_monotone_and_range():
    t = jnp.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(rf.time_shift(t, 1.0), t, atol=1e-7)
    for a in (0.5, 2.0, 3.0 * np.sqrt(5)):
        s = np.asarray(rf.time_shift(t, a))
        assert s[0] == 0.0 and abs(s[-1] - 1.0) < 1e-6
        assert (np.diff(s) > 0).all() and (s >= 0).all() and (s <= 1).all()
        np.testing.assert_allclose(rf.inverse_time_shift(s, a), t, atol=1e-5)
    # a > 1 moves every interior time towards noise.
    assert (np.asarray(rf.time_shift(t[1:-1], 3.0)) > np.asarray(t[1:-1])).all()


def test_resolution_shift_follows_open_sora_rule():
    np.testing.assert_allclose(rf.resolution_shift_alpha(256, 1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(rf.resolution_shift_alpha(4096, 1), 3.0, rtol=1e-6)
    np.testing.assert_allclose(rf.resolution_shift_alpha(2176, 4), 2.0 * 2.0, rtol=1e-6)
    cfg = rf.default_diffusion_config()
    slot_shape = jnp.array([[[4, 16, 16], [1, 64, 64], [0, 0, 0]]])  # patch units
    a = np.asarray(rf.shift_alpha(slot_shape, cfg))
    np.testing.assert_allclose(a[0], [1.0 * 2.0, 3.0, 1.0], rtol=1e-6)
    cfg.shift = "constant"
    cfg.shift_value = 3.0
    np.testing.assert_allclose(rf.shift_alpha(slot_shape, cfg), 3.0)
    cfg.shift = "bogus"
    with pytest.raises(ValueError, match="config.diffusion.shift"):
        rf.shift_alpha(slot_shape, cfg)


def test_logit_normal_times_have_the_right_law():
    cfg = rf.default_diffusion_config()
    cfg.logit_mean, cfg.logit_std = 0.5, 0.8
    t = np.asarray(rf.sample_times(jax.random.key(0), (20000,), cfg))
    logit = np.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03


def _row(seg_lengths, length, dim, rng):
    seg = np.zeros((length,), np.int32)
    start = 0
    for k, n in enumerate(seg_lengths):
        seg[start : start + n] = k + 1
        start += n
    return seg


def test_per_example_loss_ignores_row_mates_and_padding():
    rng = np.random.default_rng(0)
    dim, length, k = 4, 12, 3
    # Example A (3 tokens) is packed with a 7-token example B, then alone with padding.
    err_a = rng.normal(size=(3, dim))
    err_b = rng.normal(size=(7, dim)) * 5
    packed = np.zeros((1, length, dim)); packed[0, :3] = err_a; packed[0, 3:10] = err_b
    alone = np.zeros((1, length, dim)); alone[0, :3] = err_a; alone[0, 3:] = 100.0  # padding junk
    seg_packed = _row([3, 7], length, dim, rng)[None]
    seg_alone = _row([3], length, dim, rng)[None]
    mask = jnp.ones((1, length), bool)
    zeros = jnp.zeros((1, length, dim))
    _, per_slot_p, valid_p = rf.masked_loss(jnp.asarray(packed), zeros, mask, seg_packed, k)
    _, per_slot_a, valid_a = rf.masked_loss(jnp.asarray(alone), zeros, mask, seg_alone, k)
    np.testing.assert_allclose(per_slot_p[0, 0], per_slot_a[0, 0], rtol=1e-6)
    np.testing.assert_allclose(per_slot_a[0, 0], np.mean(err_a**2), rtol=1e-6)
    assert valid_p.tolist() == [[True, True, False]] and valid_a.tolist() == [[True, False, False]]
    # per_example: mean of the two examples; per_token: B's 7 tokens dominate.
    le, _, _ = rf.masked_loss(jnp.asarray(packed), zeros, mask, seg_packed, k, "per_example")
    lt, _, _ = rf.masked_loss(jnp.asarray(packed), zeros, mask, seg_packed, k, "per_token")
    np.testing.assert_allclose(le, (np.mean(err_a**2) + np.mean(err_b**2)) / 2, rtol=1e-5)
    np.testing.assert_allclose(lt, (np.sum(err_a**2) + np.sum(err_b**2)) / (10 * dim), rtol=1e-5)
    # Conditioning tokens are left out of the loss.
    cond_free = jnp.asarray(np.arange(length) != 0)[None]
    _, per_slot_c, _ = rf.masked_loss(jnp.asarray(packed), zeros, cond_free, seg_packed, k)
    np.testing.assert_allclose(per_slot_c[0, 0], np.mean(err_a[1:] ** 2), rtol=1e-6)
    # What the eval weights this batch by: the examples, or the loss tokens, masked_loss averaged over.
    assert float(rf.loss_units(mask, seg_packed, k, "per_example")) == 2.0
    assert float(rf.loss_units(mask, seg_packed, k, "per_token")) == 10.0
    only_b = jnp.asarray(np.arange(length) >= 3)[None]  # A is all conditioning: it has no loss
    assert float(rf.loss_units(only_b, seg_packed, k, "per_example")) == 1.0
    assert float(rf.loss_units(only_b, seg_packed, k, "per_token")) == 7.0


def test_token_noise_does_not_depend_on_packing():
    pos = np.zeros((1, 6, 3), np.int32); pos[0, :, 2] = [0, 1, 2, 0, 1, 2]
    packed = rf.token_noise(7, jnp.array([[11, 12]]), jnp.array([[1, 1, 1, 2, 2, 2]]), jnp.asarray(pos), 5)
    alone = rf.token_noise(7, jnp.array([[12, -1]]), jnp.array([[1, 1, 1, 0, 0, 0]]), jnp.asarray(pos), 5)
    np.testing.assert_array_equal(packed[0, 3:], alone[0, :3])
    assert not np.allclose(packed[0, :3], packed[0, 3:])


def test_x0_prediction_velocity_lands_on_the_prediction():
    x_t = jnp.array([[[1.0, -2.0]]]); x0_hat = jnp.array([[[0.3, 0.1]]]); t = jnp.array([[0.4]])
    v = rf.to_velocity(x0_hat, x_t, t, "x0")
    np.testing.assert_allclose(x_t - 0.4 * v, x0_hat, atol=1e-6)
    np.testing.assert_allclose(rf.velocity_target(x0_hat, x_t), x_t - x0_hat)
    np.testing.assert_array_equal(rf.to_velocity(x_t, x_t, t, "velocity"), x_t)
    with pytest.raises(ValueError, match="prediction"):
        rf.to_velocity(x_t, x_t, t, "eps")


# --- a known answer: a 2-D Gaussian mixture --------------------------------------

MEANS = np.array([[-2.0, 0.0], [2.0, 1.0]], np.float32)
WEIGHTS = np.array([0.3, 0.7], np.float32)
STD = 0.25


def _mixture(key, n):
    kc, kn = jax.random.split(key)
    comp = jax.random.bernoulli(kc, WEIGHTS[1], (n,)).astype(jnp.int32)
    return jnp.asarray(MEANS)[comp] + STD * jax.random.normal(kn, (n, 2))


@pytest.mark.parametrize("prediction,sampler", [("velocity", "euler"), ("x0", "heun")])
def test_trained_flow_reproduces_gaussian_mixture(prediction, sampler):
    cfg = rf.default_diffusion_config()
    cfg.prediction = prediction
    cfg.shift = "none"
    params = flow_doubles.init_mlp(jax.random.key(0), 2)
    opt = optax.adam(optax.cosine_decay_schedule(3e-3, 600, 0.05))
    opt_state = opt.init(params)
    seg = jnp.ones((512, 1), jnp.int32)

    def loss_fn(p, key):
        kd, kn, kt = jax.random.split(key, 3)
        x0 = _mixture(kd, 512)[:, None]  # [B, L=1, 2]
        noise = jax.random.normal(kn, x0.shape)
        t = rf.sample_times(kt, (512, 1), cfg)
        x_t, t_in = rf.flow_inputs(x0, noise, t, jnp.zeros_like(seg, bool))
        out = flow_doubles.mlp_apply(p, x_t, t_in)
        v = rf.to_velocity(out, x_t, t_in, prediction, cfg.x0_min_t)
        return rf.masked_loss(v, rf.velocity_target(x0, noise), seg > 0, seg, 1)[0]

    @jax.jit
    def step(p, s, key):
        loss, g = jax.value_and_grad(loss_fn)(p, key)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    for i in range(600):
        params, opt_state, loss = step(params, opt_state, jax.random.key(i + 1))
    assert np.isfinite(loss)

    model_fn = lambda x, t, pos, seg, **kw: flow_doubles.mlp_apply(params, x, t)
    draw = jax.jit(jax.vmap(lambda s: samplers.sample(
        model_fn, shape=(1, 1, 1, 2), patch=(1, 1, 1), steps=24, sampler=sampler, shift=None, seed=s,
        prediction=prediction)))
    xs = np.asarray(draw(jnp.arange(3000))).reshape(-1, 2)
    comp = (xs[:, 0] > 0).astype(int)  # the components are separated along x
    frac = comp.mean()
    # Binomial std at n=3000 is 0.008; allow a few of it plus model error.
    assert abs(frac - WEIGHTS[1]) < 0.05, frac
    for c in (0, 1):
        mean = xs[comp == c].mean(0)
        assert np.abs(mean - MEANS[c]).max() < 0.15, (c, mean)
        std = xs[comp == c].std(0)
        assert (std > 0.5 * STD).all() and (std < 2.0 * STD).all(), (c, std)
