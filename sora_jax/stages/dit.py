"""Stage "dit": the spacetime-patch DiT trained with rectified flow on cached VAE latents.

What is specific to this stage (the loop owns everything else):
  model    DiT(config.model) (sora_jax/models/dit.py)
  batches  packed or bucketed token batches from config.data.latents_dir
           (sora_jax/data/pipeline.token_batches; keys in docs/architecture.md)
  loss     rectified flow (diffusion/rectified_flow.py) with the task mix of given
           frames (diffusion/conditioning.py) and caption dropout for guidance
  eval     loss at fixed times t in config.diffusion.eval_times with noise fixed per
           (example, token), no conditioning, no dropout: the low-variance number
           the scaling study plots (one metric per t, plus their mean)
  samples  a few prompts sampled with the Euler/Heun sampler, decoded with the VAE
           of config.vae_workdir when there is one, written under workdir/samples/
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sora_jax import xla_options
from sora_jax.diffusion import conditioning as cond_lib
from sora_jax.diffusion import rectified_flow as rf
from sora_jax.diffusion import samplers
from sora_jax.train.stage import Stage


def diffusion_config(config) -> ml_collections.ConfigDict:
    """config.diffusion over the defaults, so old configs keep working when fields are added."""
    out = rf.default_diffusion_config()
    given = config.get("diffusion", None) or {}
    unknown = set(given) - set(out)
    if unknown:
        raise ValueError(f"config.diffusion has unknown fields {sorted(unknown)}; known: {sorted(out)}")
    for key in given:
        if key == "tasks":  # replaced as a whole: tasks left out weigh 0, not their default
            out.tasks = ml_collections.ConfigDict({name: 0.0 for name in out.tasks} | dict(given.tasks))
        else:
            out[key] = given[key]
    return out


class DiTStage(Stage):
    name = "dit"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.diffusion = diffusion_config(config)
        if tuple(config.model.patch) != tuple(config.data.patch):
            raise ValueError(f"config.model.patch {tuple(config.model.patch)} != config.data.patch "
                             f"{tuple(config.data.patch)}: the data is patchified with the model's patch")
        self._flops_cache: dict = {}

    # --- model ------------------------------------------------------------------

    def create_model(self, rngs: nnx.Rngs) -> nnx.Module:
        from sora_jax.models.dit import DiT

        return DiT(self.config.model, rngs=rngs)

    # --- data ---------------------------------------------------------------------

    def train_batches(self, process_index: int, process_count: int) -> Any:
        from sora_jax.data import pipeline

        return self.pipeline_batches(pipeline.token_batches, "train", process_index, process_count)

    def eval_batches(self):
        from sora_jax.data import pipeline

        return self.fixed_eval_batches(pipeline.token_batches)

    def batch_axes(self):
        from sora_jax.data import pipeline

        return pipeline.token_batch_axes()

    # --- objective ------------------------------------------------------------------

    def _text_inputs(self, batch: Mapping[str, jax.Array], drop_key=None) -> dict:
        """The model's text/class inputs from the batch, with caption dropout if drop_key is given."""
        model = self.config.model
        inputs = {}
        if model.get("cross_attention", True):
            if model.text.encoder == "trained":
                inputs["text_ids"] = batch["text_ids"]
            else:
                if "text_emb" not in batch:
                    raise ValueError("config.model.text.encoder='precomputed' but the batches have no text_emb: "
                                     "cache latents with a text encoder (docs/data.md)")
                inputs["text_emb"] = batch["text_emb"]
                inputs["text_mask"] = batch.get("text_mask", jnp.ones(batch["text_emb"].shape[:-1], bool))
        if model.get("num_classes", 0):
            if "class_labels" not in batch:
                raise ValueError("config.model.num_classes > 0 but the batches have no class_labels")
            # The DiT takes one label per row: class-conditional training is bucketed (one slot per row).
            inputs["class_labels"] = batch["class_labels"].reshape(batch["class_labels"].shape[0], -1)[:, 0]
        rate = float(self.diffusion.caption_dropout)
        if drop_key is not None and rate > 0:
            k = batch["slot_shape"].shape[1]
            b = batch["slot_shape"].shape[0]
            labels = inputs.get("class_labels")
            dropped, new = cond_lib.drop_captions(
                drop_key, rate, (b, k), text_ids=inputs.get("text_ids"), text_mask=inputs.get("text_mask"),
                class_labels=None if labels is None else labels[:, None],
                null_class=model.get("num_classes", 0) or None)
            if "class_labels" in new:
                new["class_labels"] = new["class_labels"][:, 0]
            inputs.update(new)
        return inputs

    def _predict_velocity(self, model, x_t, t_in, batch, inputs):
        out = model(x_t, t_in, batch["positions"], batch["segment_ids"], **inputs, deterministic=True)
        d = self.diffusion
        return rf.to_velocity(out.astype(jnp.float32), x_t, t_in, d.prediction, float(d.x0_min_t))

    def loss(self, model, batch, key):
        d = self.diffusion
        x0 = batch["tokens"].astype(jnp.float32)
        seg, slot_shape = batch["segment_ids"], batch["slot_shape"]
        b, k = slot_shape.shape[:2]
        k_time, k_noise, k_task, k_drop = jax.random.split(key, 4)

        # One noise time per example, shifted by its own size; given frames get t = 0.
        alpha = rf.shift_alpha(slot_shape, d, patch_t=int(self.config.model.patch[0]))
        t_slot = rf.time_shift(rf.sample_times(k_time, (b, k), d), alpha)
        tasks = cond_lib.sample_tasks(k_task, slot_shape, d)
        given = cond_lib.frames_mask(tasks["head"], tasks["tail"], batch["positions"], seg, slot_shape)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        x_t, t_in = rf.flow_inputs(x0, noise, rf.per_token(t_slot, seg), given)

        v = self._predict_velocity(model, x_t, t_in, batch, self._text_inputs(batch, k_drop))
        loss, _, valid = rf.masked_loss(v, rf.velocity_target(x0, noise), ~given, seg, k, d.weighting)
        real = (seg > 0).astype(jnp.float32)
        metrics = {
            "given_token_fraction": jnp.sum(given * real) / jnp.maximum(jnp.sum(real), 1.0),
            "mean_t": jnp.sum(jnp.where(valid, t_slot, 0.0)) / jnp.maximum(jnp.sum(valid), 1),
            "examples": jnp.sum(valid).astype(jnp.float32),
        }
        return loss, metrics

    def eval_metrics(self, model, batch, key):
        """Loss at each fixed t (unshifted), t2v, no dropout, noise fixed per (example, token).

        `key` is ignored on purpose: the numbers must not move between evals of one
        checkpoint. Filler rows (slot_index -1) are left out.
        """
        d = self.diffusion
        x0 = batch["tokens"].astype(jnp.float32)
        seg, slot_index = batch["segment_ids"], batch["slot_index"]
        k = batch["slot_shape"].shape[1]
        noise = rf.token_noise(int(d.eval_seed), slot_index, seg, batch["positions"], x0.shape[-1])
        keep = rf.per_token(slot_index >= 0, seg, False)
        inputs = self._text_inputs(batch)
        target = rf.velocity_target(x0, noise)
        times = jnp.asarray(d.eval_times, jnp.float32)

        def loss_at(t):
            t_tok = jnp.where(seg > 0, t, 0.0)
            x_t = rf.interpolate(x0, noise, t_tok)
            v = self._predict_velocity(model, x_t, t_tok, batch, inputs)
            return rf.masked_loss(v, target, keep, seg, k, d.weighting)[0]

        losses = jax.lax.map(loss_at, times)
        out = {name: losses[i] for i, name in enumerate(rf.eval_time_names(d.eval_times))}
        out["loss"] = jnp.mean(losses)
        out["count"] = rf.loss_units(keep, seg, k, d.weighting)  # the loop weights batches by it
        return out

    # --- accounting ---------------------------------------------------------------------

    def tokens_in_batch(self, batch) -> int:
        return int(np.sum(np.asarray(batch["segment_ids"]) > 0))

    def train_flops_per_batch(self, batch) -> float:
        """Sum over the examples of sora_jax.flops' analytic training FLOPs (model FLOPs:
        attention within each example, not the masked-out cross-example blocks of a row)."""
        try:
            from sora_jax import flops
        except ImportError:
            return 0.0
        model = self.config.model
        pt, ph, pw = model.patch
        text_len = int(np.shape(batch["text_ids"])[-1]) if "text_ids" in batch else None
        total = 0.0
        for t, h, w in np.asarray(batch["slot_shape"]).reshape(-1, 3):
            if t <= 0:
                continue
            key = (int(t), int(h), int(w), text_len)
            if key not in self._flops_cache:
                self._flops_cache[key] = float(
                    flops.dit_flops(model, (t * pt, h * ph, w * pw), text_len=text_len)["train_flops"])
            total += self._flops_cache[key]
        return total

    # --- side outputs ----------------------------------------------------------------------

    def sample_latents(self, model, prompts=None) -> list[np.ndarray]:
        """Samples config.samples.prompts (t2v, guided) at config.samples.latent_shape."""
        from sora_jax.data.tokenizer import HashTokenizer

        s, model_cfg = self.config.samples, self.config.model
        prompts = list(prompts if prompts is not None else s.prompts)
        tokenizer = HashTokenizer(self.config.data.vocab_size, self.config.data.text_len)
        shape = tuple(int(x) for x in s.latent_shape) + (int(model_cfg.latent_channels),)
        graphdef, state = nnx.split(model)
        d = self.diffusion

        @functools.partial(jax.jit, compiler_options=xla_options.from_config(self.config))
        def draw(state, ids, seed):
            fn = nnx.merge(graphdef, state)
            return samplers.sample(fn, shape=shape, patch=tuple(model_cfg.patch), text_ids=ids,
                                   sampler=s.sampler, steps=int(s.steps), guidance=float(s.guidance),
                                   shift="auto" if d.shift == "resolution" else (
                                       float(d.shift_value) if d.shift == "constant" else None),
                                   seed=seed, prediction=d.prediction)

        return [np.asarray(draw(state, jnp.asarray(tokenizer.encode(p)), int(s.seed) + i))
                for i, p in enumerate(prompts)]

    def on_eval(self, model, workdir: str, step: int, writer: Any) -> None:
        s = self.config.get("samples", None)
        log = getattr(writer, "log", print)
        if not s or not s.get("prompts"):
            return
        out_dir = os.path.join(workdir, "samples", f"step_{step:07d}")
        os.makedirs(out_dir, exist_ok=True)
        latents = self.sample_latents(model)
        for i, lat in enumerate(latents):
            np.save(os.path.join(out_dir, f"sample_{i}_latent.npy"), lat)
        with open(os.path.join(out_dir, "prompts.json"), "w") as f:
            json.dump({"step": step, "prompts": list(s.prompts), "latent_shape": list(s.latent_shape),
                       "sampler": s.sampler, "steps": s.steps, "guidance": s.guidance, "seed": s.seed}, f, indent=1)
        vae = self._vae(log)
        if vae is None:
            return
        import imageio.v2 as imageio

        for i, lat in enumerate(latents):
            video = np.asarray(vae.decode(lat[None]))[0]  # (T, H, W, 3) in [-1, 1]
            frames = ((np.clip(video, -1, 1) + 1) * 127.5).astype(np.uint8)
            imageio.mimsave(os.path.join(out_dir, f"sample_{i}.gif"), list(frames), duration=1 / 8)
            if hasattr(writer, "add_video"):
                writer.add_video(f"samples/{i}", frames[None], step)
        log(f"dit: wrote {len(latents)} samples to {out_dir}")

    def _vae(self, log):
        """The VAE of config.vae_workdir for decoding, or None (logged) when there is none."""
        path = self.config.get("vae_workdir", "")
        if not path:
            log("dit: config.vae_workdir is empty; samples are saved as latents only")
            return None
        try:
            from sora_jax.models.vae_api import VAEHandle
        except ImportError as err:
            log(f"dit: cannot decode samples ({err}); saved latents only")
            return None
        if not hasattr(self, "_vae_handle"):
            self._vae_handle = VAEHandle.from_workdir(path)
        return self._vae_handle
