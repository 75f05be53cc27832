"""Stage "vae": train the causal video VAE (sora_jax/models/vae.py) on pixel batches.

  loss     L2 (config.vae.recon = "l2", default) or L1 reconstruction of a posterior sample,
           + config.vae.beta * KL(q(z|x) || N(0, I)) (mean per latent element),
           + optional hinge GAN terms (config.vae.gan_weight > 0, off by default).
  eval     inside jit: loss, PSNR and SSIM of the posterior-mean reconstruction;
           on_eval (host): PSNR / SSIM for images (T = 1) and videos separately on the
           held-out toy-world batches at their native sizes, and side-by-side
           [input | reconstruction] videos in workdir/recon/step_N_*.mp4.
  finish   per-channel mean / std of the posterior means over training batches ->
           workdir/latent_stats.json (vae_api.VAEHandle normalises latents with it).

GAN with one optimizer. The loop has one optimizer, so the discriminator lives in
the model (`model.discriminator`) and both players share one scalar loss: the
generator term sees the discriminator through stop_gradient on its parameters and
the discriminator terms see stop_gradient of the videos. The gradient of the sum
w.r.t. the VAE is the generator's, w.r.t. the discriminator the discriminator's.
There is no delayed GAN start (the loss does not see the step).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sora_jax import jsonio
from sora_jax.models import vae as vae_lib
from sora_jax.train.stage import Stage

STATS_FILE = "latent_stats.json"


# --- metrics ------------------------------------------------------------------------------
def psnr(x, y, axis=(1, 2, 3, 4)):
    """Per-example PSNR in dB of videos in [-1, 1] (peak-to-peak 2)."""
    mse = jnp.mean(jnp.square(jnp.clip(x, -1, 1) - jnp.clip(y, -1, 1)), axis=axis)
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


def ssim(x, y, window: int = 11, sigma: float = 1.5):
    """Per-example SSIM (Wang et al. 2004) of videos [B,T,H,W,C] in [-1, 1], per frame, averaged.

    Gaussian window (11, sigma 1.5, shrunk for small frames), valid filtering, data range 1
    after mapping to [0, 1].
    """
    x = (jnp.clip(x, -1, 1) + 1) / 2
    y = (jnp.clip(y, -1, 1) + 1) / 2
    b, t, h, w, c = x.shape
    k = min(window, h, w)
    k -= 1 - k % 2
    g = np.exp(-0.5 * ((np.arange(k) - k // 2) / sigma) ** 2)
    g = jnp.asarray(g / g.sum(), x.dtype)

    def blur(a):  # separable gaussian, valid, over H and W of (N, H, W, 1)
        a = a.reshape(b * t, h, w, c).transpose(0, 3, 1, 2).reshape(b * t * c, h, w, 1)
        a = jax.lax.conv_general_dilated(a, g.reshape(k, 1, 1, 1), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.lax.conv_general_dilated(a, g.reshape(1, k, 1, 1), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return jnp.mean(s.reshape(b, -1), axis=1)


# --- optional 3D patch discriminator ---------------------------------------------------------
class PatchDiscriminator3D(nnx.Module):
    """Strided 3D convs -> a map of real/fake logits (one per spacetime patch)."""

    def __init__(self, width: int = 32, depth: int = 3, *, rngs: nnx.Rngs):
        chans = [3] + [width * 2 ** i for i in range(depth)]
        self.convs = nnx.List([vae_lib.CausalConv3d(a, b, (3, 4, 4), stride=2, impl="xla", rngs=rngs)
                               for a, b in zip(chans[:-1], chans[1:])])
        self.norms = nnx.List([vae_lib.RMSNorm(b, rngs=rngs) for b in chans[2:]])
        self.out = vae_lib.CausalConv3d(chans[-1], 1, (1, 1, 1), rngs=rngs)

    def __call__(self, video):
        x = video
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i > 0:
                x = self.norms[i - 1](x)
            x = jax.nn.leaky_relu(x, 0.2)
        return self.out(x)


def hinge_d_loss(real_logits, fake_logits):
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


def hinge_g_loss(fake_logits):
    return -jnp.mean(fake_logits)


def vae_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        # L2, not L1: on the toy world (flat backgrounds, small objects) L1's per-pixel
        # sign gradient lets the background outvote the objects, and runs sat at ~15 dB
        # (flat colour). Overfitting one batch (width 8, 300 steps): L1 19.8 dB at lr 1e-3
        # and stuck at 15.8 dB at 3e-3; L2 26.5 dB at 1e-3 and 27.6 dB at 3e-3.
        recon="l2",  # "l2" | "l1"
        beta=1e-5,  # KL weight (KL is a mean per latent element; MSE is ~4e-3 at 30 dB)
        gan_weight=0.0,  # > 0 enables the patch discriminator and hinge GAN terms
        disc_width=32,
        num_recon_videos=4,  # side-by-side reconstructions written per eval
        stats_batches=8,  # training batches read for latent_stats.json
        # Overrides of config.data (nested: toy=dict(...)) for a held-out eval at native
        # sizes, run at the last step only: the loop's periodic eval reuses the training
        # shapes (one compile), while this one compiles once per (T, H, W) bucket.
        native_eval=ml_collections.ConfigDict(),
        native_eval_batches=16,
    ))


class VAEStage(Stage):
    name = "vae"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.opts = vae_defaults()
        self.opts.update(dict(config.get("vae", {})))
        if self.opts.recon not in ("l1", "l2"):
            raise ValueError(f"config.vae.recon must be 'l1' or 'l2', got {self.opts.recon!r}")
        self.model_cfg = vae_lib.vae_config(config.model)
        self._recon_fn = None

    # --- model -----------------------------------------------------------------------------
    def create_model(self, rngs: nnx.Rngs) -> nnx.Module:
        model = vae_lib.CausalVAE(self.model_cfg, rngs=rngs)
        if self.opts.gan_weight > 0:
            model.discriminator = PatchDiscriminator3D(int(self.opts.disc_width), rngs=rngs)
        return model

    # --- data ------------------------------------------------------------------------------
    def train_batches(self, process_index: int, process_count: int) -> Any:
        from sora_jax.data import pipeline

        return self.pipeline_batches(pipeline.pixel_batches, "train", process_index, process_count)

    def eval_batches(self):
        from sora_jax.data import pipeline

        return self.fixed_eval_batches(pipeline.pixel_batches)

    # --- objective -----------------------------------------------------------------------------
    def _real_rows(self, batch):
        real = (batch["index"] >= 0).astype(jnp.float32)  # filler rows (index -1) repeat an example
        return real, jnp.maximum(jnp.sum(real), 1.0)

    def loss(self, model, batch, key):
        video = batch["video"]
        recon, mean, logvar = model(video, key)
        real, n = self._real_rows(batch)
        err = jnp.abs(recon - video) if self.opts.recon == "l1" else jnp.square(recon - video)
        rec = jnp.sum(jnp.mean(err, axis=(1, 2, 3, 4)) * real) / n
        kl = jnp.sum(jnp.mean(vae_lib.kl_divergence(mean, logvar), axis=(1, 2, 3)) / mean.shape[-1] * real) / n
        total = rec + self.opts.beta * kl
        metrics = {"recon": rec, "kl": kl, "psnr": jnp.sum(psnr(recon, video) * real) / n}
        if self.opts.gan_weight > 0:
            disc = model.discriminator
            graphdef, state = nnx.split(disc)
            frozen = nnx.merge(graphdef, jax.lax.stop_gradient(state))
            g = hinge_g_loss(frozen(recon))
            d = hinge_d_loss(disc(jax.lax.stop_gradient(video)), disc(jax.lax.stop_gradient(recon)))
            total = total + self.opts.gan_weight * g + d
            metrics.update(gan_g=g, gan_d=d)
        return total, metrics

    def eval_metrics(self, model, batch, key):
        video = batch["video"]
        recon, mean, logvar = model(video)  # posterior mean: deterministic
        real, n = self._real_rows(batch)
        err = jnp.abs(recon - video) if self.opts.recon == "l1" else jnp.square(recon - video)
        rec = jnp.sum(jnp.mean(err, axis=(1, 2, 3, 4)) * real) / n
        kl = jnp.sum(jnp.mean(vae_lib.kl_divergence(mean, logvar), axis=(1, 2, 3)) / mean.shape[-1] * real) / n
        return {"loss": rec + self.opts.beta * kl, "recon": rec, "kl": kl,
                "psnr": jnp.sum(psnr(recon, video) * real) / n, "ssim": jnp.sum(ssim(recon, video) * real) / n,
                "count": jnp.sum(real)}  # the loop weights batches by their real clips

    # --- accounting ----------------------------------------------------------------------------
    def tokens_in_batch(self, batch) -> int:
        """Frames trained on (real rows only)."""
        video = np.asarray(batch["video"])
        return int(np.sum(np.asarray(batch["index"]) >= 0)) * video.shape[1]

    def train_flops_per_batch(self, batch) -> float:
        """3 x forward (encode + decode), analytic; the discriminator is not counted."""
        b, t, h, w, _ = np.shape(batch["video"])
        f = vae_lib.vae_forward_flops(self.model_cfg, t, h, w)
        return 3.0 * b * (f["encode"] + f["decode"])

    # Parameters that stay on AdamW under optim.name="muon": the RGB-side input and output convs
    # and the linear patch shortcut (Muon's usual recipe keeps a network's first and last maps on
    # Adam; this is the set measured in docs/vae.md, sprint 13).
    MUON_EXCLUDED = ("encoder/conv_in/", "decoder/conv_out/", "shortcut/")

    def muon_dimension_numbers(self, params: Any) -> Any:
        from sora_jax.train import optim

        dims = super().muon_dimension_numbers(params)
        return jax.tree_util.tree_map_with_path(
            lambda path, d: None if any(optim.path_name(path).startswith(p) for p in self.MUON_EXCLUDED) else d,
            dims, is_leaf=lambda x: x is None or isinstance(x, optim.MuonDimensionNumbers))

    # --- side outputs ----------------------------------------------------------------------------
    def _reconstruct(self, model, video):
        if self._recon_fn is None:
            @nnx.jit
            def recon(m, v):
                r = m.decode(m.encode(v)[0])
                return r, psnr(r, v), ssim(r, v)
            self._recon_fn = recon
        return self._recon_fn(model, jnp.asarray(video))

    def on_eval(self, model, workdir: str, step: int, writer: Any) -> None:
        from sora_jax.data import video_io

        # One compile per eval shape (native sizes, images and videos): the fast-compiling convs.
        model = vae_lib.with_conv_impl(model, "xla")
        written = 0

        def write_side_by_side(video, recon, keep, kind):
            nonlocal written
            for i in np.flatnonzero(keep)[: max(0, int(self.opts.num_recon_videos) - written)]:
                side = np.concatenate([video[i], np.clip(recon[i], -1, 1)], axis=2)
                frames = np.round((side + 1) * 127.5).astype(np.uint8)
                ext = ".png" if kind == "image" else ".mp4"
                video_io.write_video(os.path.join(workdir, "recon", f"step_{step}_{written}_{kind}{ext}"), frames, fps=8.0)
                written += 1

        self._write_scores(self._scores(model, self.eval_batches(), write_side_by_side), "recon", workdir, step, writer)
        if step >= int(self.config.train.steps) and len(self.opts.native_eval):
            self._write_scores(self._native_scores(model), "native", workdir, step, writer)

    def _scores(self, model, batches, on_batch=None) -> dict:
        """PSNR / SSIM (and shapes) of posterior-mean reconstructions, images and videos apart.

        Videos also get PSNR per latent frame (`psnr_latent_frame{k}`: the pixel frames that
        latent frame k codes), which shows whether later latent frames, whose causal context
        the training clips may never contain, hold up."""
        scores = {kind: {"psnr": [], "ssim": [], "shapes": []} for kind in ("image", "video")}
        for batch in batches:
            video = np.asarray(batch["video"], np.float32)
            keep = np.asarray(batch["index"]) >= 0
            recon, p, s = (np.asarray(a) for a in self._reconstruct(model, video))
            kind = "image" if video.shape[1] == 1 else "video"
            scores[kind]["psnr"] += list(p[keep])
            scores[kind]["ssim"] += list(s[keep])
            scores[kind]["shapes"].append(video.shape[1:4])
            if kind == "video":  # per latent frame: frame 0 alone, then temporal_compression frames each
                tc = int(self.config.model.temporal_compression)
                for k in range(1 + (video.shape[1] - 1) // tc):
                    start, stop = (0, 1) if k == 0 else (1 + tc * (k - 1), 1 + tc * k)
                    p_k = np.asarray(psnr(recon[keep, start:stop], video[keep, start:stop]))
                    scores[kind].setdefault(f"psnr_latent_frame{k}", []).extend(p_k)
            if on_batch is not None:
                on_batch(video, recon, keep, kind)
        return scores

    def _write_scores(self, scores, prefix: str, workdir: str, step: int, writer: Any) -> None:
        summary = {f"{prefix}/{key}": value for key, value in score_summary(scores).items()}
        if hasattr(writer, "write") and summary:
            writer.write(step, summary)
        name = f"step_{step}.json" if prefix == "recon" else f"{prefix}_step_{step}.json"
        jsonio.write_json(os.path.join(workdir, "recon", name), {
            "step": step, **summary, "counts": {k: len(d["psnr"]) for k, d in scores.items()},
            "shapes": sorted({tuple(s) for d in scores.values() for s in d.get("shapes", [])})})

    def native_eval_config(self) -> ml_collections.ConfigDict:
        """config with config.data updated by config.vae.native_eval (toy overrides nested)."""
        config = ml_collections.ConfigDict(self.config.to_dict())
        over = self.opts.native_eval.to_dict()
        toy = over.pop("toy", {})
        for key in list(over) + list(toy):
            known = config.data if key in over else config.data.toy
            if key not in known:
                raise ValueError(f"config.vae.native_eval: unknown data field {key!r}")
        config.data.update(over)
        config.data.toy.update(toy)
        return config

    def _native_scores(self, model) -> dict:
        """PSNR / SSIM of posterior-mean reconstructions of held-out clips at their native sizes."""
        from sora_jax.data import pipeline

        config = self.native_eval_config()
        batches = pipeline.fixed_batches(
            pipeline.pixel_batches(config, "eval", seed=int(config.seed), process_index=jax.process_index(),
                                   process_count=jax.process_count(), batch_multiple=self.batch_multiple(jax.process_count())),
            int(self.opts.native_eval_batches))
        return self._scores(model, batches)

    def held_out_summaries(self, model) -> dict:
        """{"eval": ..., "native": ...}: score summaries (3 decimals) of the loop's held-out batches and,
        when configured, the native-size eval; what the experiment scripts print for a model."""
        summarise = lambda scores: {k: round(v, 3) for k, v in score_summary(scores).items()}
        out = {"eval": summarise(self._scores(model, self.eval_batches()))}
        if len(self.opts.native_eval):
            out["native"] = summarise(self._native_scores(model))
        return out

    def on_finish(self, model, workdir: str) -> None:
        model = vae_lib.with_conv_impl(model, "xla")  # one compile per training shape, as on_eval
        stats = compute_latent_stats(model, self.train_batches(jax.process_index(), jax.process_count()),
                                     int(self.opts.stats_batches))
        if jax.process_index() == 0:
            write_latent_stats(stats, workdir)


def score_summary(scores: dict) -> dict:
    """{kind: {metric: [per-clip values]}} from `VAEStage._scores` -> {"video_psnr": mean, ...}.

    Also "{kind}_psnr_sem", the standard error of the mean PSNR over the clips: the sampling
    noise of the eval set itself, which decides whether runs scored on different clips differ
    (docs/vae.md: two 8-clip sets 1.4 dB apart, two 128-clip sets ~0.5). Runs scored on the same clips differ by less."""
    out = {f"{kind}_{m}": float(np.mean(v)) for kind, d in scores.items() for m, v in d.items() if v and m != "shapes"}
    for kind, d in scores.items():
        if len(d.get("psnr", ())) > 1:
            out[f"{kind}_psnr_sem"] = float(np.std(d["psnr"], ddof=1) / np.sqrt(len(d["psnr"])))
    return out


# --- latent statistics ----------------------------------------------------------------------
def compute_latent_stats(model, batches, num_batches: int) -> dict:
    """Per-channel mean / std of posterior means over `num_batches` batches (float64 sums)."""
    encode = nnx.jit(lambda m, v: m.encode(v)[0])
    total, total_sq, count = None, None, 0
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        keep = np.asarray(batch["index"]) >= 0
        z = np.asarray(encode(model, jnp.asarray(batch["video"])), np.float64)[keep]
        z = z.reshape(-1, z.shape[-1])
        total = z.sum(0) if total is None else total + z.sum(0)
        total_sq = (z * z).sum(0) if total_sq is None else total_sq + (z * z).sum(0)
        count += z.shape[0]
    if not count:
        raise ValueError("compute_latent_stats: no training batches were read")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
    return {"mean": mean.tolist(), "std": std.tolist(), "num_latents": int(count)}


def write_latent_stats(stats: dict, workdir: str) -> str:
    return jsonio.write_json(os.path.join(workdir, STATS_FILE), stats)


def read_latent_stats(workdir: str) -> dict:
    path = os.path.join(workdir, STATS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the vae stage writes it when training finishes")
    with open(path) as f:
        stats = json.load(f)
    if not {"mean", "std"} <= set(stats) or len(stats["mean"]) != len(stats["std"]):
        raise ValueError(f"{path}: needs equal-length 'mean' and 'std' lists")
    return stats
