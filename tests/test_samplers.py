"""Samplers: conditioning frames held, SDEdit endpoints, determinism, guidance batching."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion import samplers

import flow_doubles

SHAPE = (4, 4, 6, 3)  # T, H, W, C latent
PATCH = (1, 2, 2)


@pytest.fixture(scope="module")
def model_fn():
    params = flow_doubles.init_mlp(jax.random.key(0), 12, width=32, depth=2)
    return lambda x, t, pos, seg, **kw: flow_doubles.mlp_apply(params, x, t) + 0.1 * pos[..., :1]


def _latent(seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32))


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_conditioning_frames_are_kept_exactly(model_fn, sampler):
    given = _latent()
    mask = np.array([True, False, False, True])
    out = samplers.sample(model_fn, shape=SHAPE, patch=PATCH, cond_latent=given, cond_frames_mask=mask,
                          sampler=sampler, steps=5, seed=3)
    np.testing.assert_array_equal(np.asarray(out)[mask], np.asarray(given)[mask])
    assert not np.allclose(np.asarray(out)[~mask], np.asarray(given)[~mask])


def test_sdedit_strength_zero_returns_input_and_one_ignores_it(model_fn):
    x = _latent()
    out0 = samplers.sample(model_fn, shape=SHAPE, patch=PATCH, steps=6, seed=0, sdedit_strength=0.0, init_latent=x)
    np.testing.assert_array_equal(np.asarray(out0), np.asarray(x))
    out1 = samplers.sample(model_fn, shape=SHAPE, patch=PATCH, steps=6, seed=0, sdedit_strength=1.0, init_latent=x)
    free = samplers.sample(model_fn, shape=SHAPE, patch=PATCH, steps=6, seed=0)
    np.testing.assert_allclose(np.asarray(out1), np.asarray(free), atol=1e-5)
    half = samplers.sample(model_fn, shape=SHAPE, patch=PATCH, steps=6, seed=0, sdedit_strength=0.5, init_latent=x)
    d_half = np.abs(np.asarray(half) - np.asarray(x)).mean()
    assert 0 < d_half < np.abs(np.asarray(free) - np.asarray(x)).mean()


def test_same_seed_same_output_and_jits(model_fn):
    kw = dict(shape=SHAPE, patch=PATCH, steps=4, sampler="heun")
    a = samplers.sample(model_fn, seed=7, **kw)
    b = jax.jit(lambda s: samplers.sample(model_fn, seed=s, **kw))(7)
    c = samplers.sample(model_fn, seed=8, **kw)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(samplers.sample(model_fn, seed=7, **kw)))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert a.shape == SHAPE


def test_time_grid_runs_from_start_to_zero_monotonically():
    g = np.asarray(samplers.time_grid(10, 3.0))
    assert g[0] == pytest.approx(1.0) and g[-1] == 0.0 and (np.diff(g) < 0).all()
    g = np.asarray(samplers.time_grid(10, 3.0, start=0.4))
    assert g[0] == pytest.approx(0.4, abs=1e-6) and g[-1] == 0.0


def test_guidance_batches_cond_and_uncond_in_one_call():
    calls = []

    def fn(x, t, pos, seg, text_ids):
        calls.append(x.shape[0])
        # Velocity that depends on whether the text is present: cond -> +1, uncond -> 0.
        return jnp.broadcast_to((text_ids[:, :, :1] > 0).astype(x.dtype), x.shape)

    ids = jnp.array([5, 6, 1, 0])
    # dx/dt = v_u + g (v_c - v_u) = g; integrating from t=1 to 0 moves x by -g.
    out_g = samplers.sample(fn, shape=(1, 2, 2, 1), patch=(1, 1, 1), text_ids=ids, guidance=3.0, steps=4, seed=0, shift=None)
    out_1 = samplers.sample(fn, shape=(1, 2, 2, 1), patch=(1, 1, 1), text_ids=ids, guidance=1.0, steps=4, seed=0, shift=None)
    noise = samplers.sample(lambda x, *a, **k: jnp.zeros_like(x), shape=(1, 2, 2, 1), patch=(1, 1, 1), steps=4, seed=0)
    np.testing.assert_allclose(np.asarray(out_g), np.asarray(noise) - 3.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out_1), np.asarray(noise) - 1.0, atol=1e-5)
    assert set(calls) == {1, 2}  # traced once per mode: 2 rows with guidance, 1 without


def test_bad_arguments_are_rejected(model_fn):
    with pytest.raises(ValueError, match="splits a temporal patch"):
        samplers.sample(model_fn, shape=SHAPE, patch=(2, 2, 2), cond_latent=_latent(),
                        cond_frames_mask=[True, False, False, False], steps=2)
    with pytest.raises(ValueError, match="needs init_latent"):
        samplers.sample(model_fn, shape=SHAPE, patch=PATCH, sdedit_strength=0.5, steps=2)
    with pytest.raises(ValueError, match="sampler"):
        samplers.sample(model_fn, shape=SHAPE, patch=PATCH, sampler="ddim", steps=2)
