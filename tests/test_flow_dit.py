"""The DiT stage: loss on packed toy latents is finite, and a few steps lower the held-out loss."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sora_jax.data import sources
from model_helpers import fast_rngs

SHAPES = [(3, 8, 8), (1, 8, 12), (2, 8, 8), (3, 8, 4)]  # latent (T, H, W); patch (1, 2, 2)
COLOURS = ["red", "green", "blue", "white"]


def _write_latents(directory, split, n, seed):
    """A tiny latent cache in the latent_cache record format: each colour word sets a mean."""
    rng = np.random.default_rng(seed)
    writer = sources.ShardWriter(str(directory / split), 64, "latents")
    for i in range(n):
        k = int(rng.integers(len(COLOURS)))
        t, h, w = SHAPES[int(rng.integers(len(SHAPES)))]
        mean = np.zeros(16, np.float32); mean[k * 4:(k + 1) * 4] = 1.5
        lat = mean + 0.3 * rng.normal(size=(t, h, w, 16)).astype(np.float32)
        writer.write({"latent": lat.astype(np.float16), "caption": f"a {COLOURS[k]} thing", "short_caption": COLOURS[k],
                      "index": i, "pixel_shape": [1 + 4 * (t - 1), 8 * h, 8 * w]})
    writer.close()


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    import configs.dit as dit_config
    from sora_jax.stages.dit import DiTStage

    root = tmp_path_factory.mktemp("latents")
    (root / "train").mkdir(); (root / "eval").mkdir()
    _write_latents(root, "train", 64, 0)
    _write_latents(root, "eval", 12, 1)
    config = dit_config.get_config(f"micro,latents={root}")
    config.data.prefetch = 0
    config.data.read_threads = 1
    config.data.row_len = 128
    config.data.batch_size = 4
    config.train.num_eval_batches = 2
    config.samples.steps = 4
    config.samples.latent_shape = (2, 4, 4)
    config.diffusion.tasks = dict(t2v=0.4, i2v=0.2, extend_forward=0.1, extend_backward=0.1, loop=0.1, connect=0.1)
    return DiTStage(config)


def test_stage_loss_is_finite_and_few_steps_lower_the_fixed_time_eval_loss(stage):
    with nnx.use_eager_sharding(False):
        model = stage.create_model(fast_rngs(0))
    graphdef, params = nnx.split(model)
    eval_batches = stage.eval_batches()
    assert 1 <= len(eval_batches) <= 2

    @jax.jit
    def evaluate(params, batch):
        return stage.eval_metrics(nnx.merge(graphdef, params), batch, jax.random.key(0))

    def eval_loss(params):
        metrics = [evaluate(params, b) for b in eval_batches]
        return {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}

    opt = optax.adam(2e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch, key):
        # As the loop does, the model is merged inside jit (closing over the nnx module gave garbage losses).
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: stage.loss(nnx.merge(graphdef, p), batch, key), has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metrics

    before = eval_loss(params)
    assert set(before) == {"loss"} | {f"loss_t{t:.2f}" for t in np.arange(1, 10) / 10}
    # Same checkpoint, same numbers: the eval noise is fixed.
    assert eval_loss(params)["loss"] == before["loss"]
    batches = stage.train_batches(0, 1)
    first = next(batches)
    assert first["tokens"].shape == (4, 128, 64)
    assert stage.tokens_in_batch(first) == int((first["segment_ids"] > 0).sum())
    assert stage.train_flops_per_batch(first) > 0
    for i in range(20):
        params, opt_state, loss, metrics = step(params, opt_state, first if i == 0 else next(batches), jax.random.key(i))
        assert np.isfinite(float(loss)) and float(loss) > 0
        if i == 0:
            assert 0 < float(metrics["given_token_fraction"]) < 1 and float(metrics["examples"]) > 4
    after = eval_loss(params)
    assert after["loss"] < 0.8 * before["loss"], (before["loss"], after["loss"])


def test_samples_are_deterministic_and_have_the_latent_shape(stage):
    with nnx.use_eager_sharding(False):
        model = stage.create_model(fast_rngs(1))
    a = stage.sample_latents(model, ["a red thing"])
    b = stage.sample_latents(model, ["a red thing"])
    assert a[0].shape == tuple(stage.config.samples.latent_shape) + (16,)
    np.testing.assert_array_equal(a[0], b[0])
