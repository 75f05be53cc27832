"""VAE stage: a short training run lowers the loss; metrics; latent stats; VAEHandle round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sora_jax.models.vae_api import VAEHandle
from sora_jax.stages import vae as vae_stage
from model_helpers import fast_rngs


def _config():
    import importlib.util
    spec = importlib.util.spec_from_file_location("vae_cfg", "configs/vae.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("micro")


def test_ssim_and_psnr_sanity():
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16, 3)), jnp.float32)
    np.testing.assert_allclose(vae_stage.ssim(x, x), 1.0, atol=1e-5)
    noisy = x + 0.3 * jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
    assert float(vae_stage.ssim(noisy, x).mean()) < 0.95
    assert float(vae_stage.psnr(x + 0.02, x).mean()) > 35


def test_short_training_run_lowers_loss(tmp_path):
    config = _config()
    stage = vae_stage.VAEStage(config)
    with nnx.use_eager_sharding(False):
        model = stage.create_model(fast_rngs(0))
    rng = np.random.default_rng(0)
    # Smooth moving blobs: a fixed batch the tiny model can fit in a few steps.
    t, h, w = 5, 16, 16
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    video = np.stack([[np.stack([np.tanh(3 * (0.5 - (xx - 0.2 * f + c) ** 2 - yy ** 2))] * 3, -1)
                       for f in range(t)] for c in (-0.3, 0.0, 0.3, 0.5)]).astype(np.float32)
    batch = {"video": jnp.asarray(video), "index": jnp.arange(4), "text_ids": jnp.zeros((4, 4), jnp.int32)}
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, key):
        (loss, _), grads = nnx.value_and_grad(lambda m: stage.loss(m, batch, key), has_aux=True)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt, jax.random.PRNGKey(i))) for i in range(25)]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
    metrics = nnx.jit(stage.eval_metrics)(model, batch, jax.random.PRNGKey(0))
    assert {"loss", "psnr", "ssim", "kl"} <= set(metrics)

    # Latent statistics and the API on top of them.
    stats = vae_stage.compute_latent_stats(model, [dict(batch, video=np.asarray(video))], 1)
    c = model.cfg.latent_channels
    assert len(stats["mean"]) == c and min(stats["std"]) > 0
    vae_stage.write_latent_stats(stats, str(tmp_path))
    handle = VAEHandle(model, vae_stage.read_latent_stats(str(tmp_path)), chunk_frames=3)
    frames = np.round((video[0] + 1) * 127.5).astype(np.uint8)
    z = handle.encode(frames)  # uint8 (T,H,W,3), longer than chunk_frames: the chunked path
    assert z.shape == handle.latent_shape(t, h, w)
    raw = np.asarray(nnx.jit(lambda m, v: m.encode(v)[0])(model, jnp.asarray(frames[None], jnp.float32) / 127.5 - 1))[0]
    np.testing.assert_allclose(np.asarray(z) * np.asarray(stats["std"]) + np.asarray(stats["mean"]), raw, atol=1e-3)
    out = handle.decode(z)
    assert out.shape == (t, h, w, 3) and handle.pixel_shape(*z.shape[:3]) == out.shape


def test_native_size_eval_scores_images_and_videos_at_their_own_shapes(tmp_path):
    import pytest

    config = _config()
    config.vae.native_eval = dict(pixels=32 * 32, frames=5, num_eval=8,
                                  toy=dict(aspect_ratios=["16:9", "1:1"], max_frames=5, pixel_budget=32 * 32,
                                           image_prob=0.5))
    config.vae.native_eval_batches = 8
    stage = vae_stage.VAEStage(config)
    native = stage.native_eval_config()
    assert native.data.toy.aspect_ratios == ["16:9", "1:1"] and config.data.toy.aspect_ratios == ["1:1"]
    with nnx.use_eager_sharding(False):
        model = stage.create_model(fast_rngs(0))
    scores = stage._native_scores(model)
    shapes = {tuple(s) for d in scores.values() for s in d["shapes"]}
    assert scores["image"]["psnr"] and scores["video"]["psnr"], scores
    assert len({(h, w) for _, h, w in shapes}) == 2, shapes  # both aspect ratios, not squares only
    assert all(np.isfinite(scores[k]["psnr"]).all() for k in scores)
    # 5-frame videos = 2 latent frames; a video's PSNR (its MSE is a weighted mean of the
    # per-latent-frame MSEs) lies between its two per-latent-frame PSNRs.
    video = scores["video"]
    per_frame = np.stack([video["psnr_latent_frame0"], video["psnr_latent_frame1"]], 1)
    assert "psnr_latent_frame2" not in video and len(per_frame) == len(video["psnr"])
    assert np.all(per_frame.min(1) <= np.asarray(video["psnr"]) + 1e-3)
    assert np.all(np.asarray(video["psnr"]) <= per_frame.max(1) + 1e-3)

    config.vae.native_eval = dict(toy=dict(aspect_ratio=["1:1"]))  # misspelt field
    with pytest.raises(ValueError, match="aspect_ratio"):
        vae_stage.VAEStage(config).native_eval_config()


@pytest.mark.parametrize("variant", ["quick", "small"])
def test_config_eval_scores_its_whole_eval_split(variant):
    """The loop's held-out eval of configs/vae.py covers all data.num_eval examples, once each."""
    from sora_jax import config_lib

    config = config_lib.load_config(f"configs/vae.py:{variant}")
    stage = vae_stage.VAEStage(config)
    batches = stage.eval_batches()
    assert len(batches) < config.train.num_eval_batches  # the pass ended before the cap cut it
    index = np.concatenate([np.asarray(b["index"]) for b in batches])
    index = index[index >= 0]
    assert len(index) == len(set(index.tolist())) == config.data.num_eval
    assert set(index.tolist()) == set(range(config.data.num_train, config.data.num_train + config.data.num_eval))


def test_score_summary_reports_the_standard_error_of_the_mean_psnr():
    scores = {"video": {"psnr": [20.0, 22.0, 24.0, 26.0], "ssim": [0.5] * 4, "shapes": [(9, 32, 32)]},
              "image": {"psnr": [30.0], "ssim": [0.9], "shapes": [(1, 32, 32)]}}
    summary = vae_stage.score_summary(scores)
    assert summary["video_psnr"] == 23.0
    np.testing.assert_allclose(summary["video_psnr_sem"], np.std([20, 22, 24, 26], ddof=1) / 2)
    assert "image_psnr_sem" not in summary  # one clip has no spread to estimate
