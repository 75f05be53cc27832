"""Generation in every prompting mode of the Sora report, from a trained DiT workdir.

    gen = Generator.from_workdir("/tmp/dit")          # its config names the VAE workdir
    out = gen.text_to_video("a red circle bouncing", size=(64, 96), frames=17, seed=0)
    out.video      uint8 (T, H, W, 3)      out.latents  normalised latents (T', H', W', C)
    out.metadata   prompt, expanded prompt, mode, seed, steps, guidance, shift, sampler,
                   checkpoint step, size, frames, adjustments, timings

Every mode is one call of the rectified-flow sampler (diffusion/samplers.py) with
the conditioning the DiT was trained with (diffusion/conditioning.py): the latent
frames we give are *conditioning tokens*, held at t = 0 with their clean values
for the whole integration, so they come out exactly as they went in.

  text_to_video / text_to_image   text only (an image is a 1-frame video)
  image_to_video                  latent frame 0 = the encoded image
  extend(direction="forward")     the given video's latents at the head, new frames after
  extend(direction="backward")    the given video's latents at the tail, new frames before
  loop                            latent frame 0 given again as the last latent frame
  edit (SDEdit)                   no conditioning: the input's latents noised to t = strength
  connect                         A's last latent frames at the head, B's first at the tail

Geometry. Pixel videos have T = 1 + 4k frames and H, W multiples of
config.data.multiple (VAE stride 8 x patch 2 = 16); the VAE maps them to 1 + k
latent frames. Requested sizes and frame counts that the strides cannot take are
rounded to the *nearest* valid value and the change is recorded (printed by the
CLI, and kept in metadata["adjustments"]); a count outside [min, max] for its mode
is an error. Input images/videos are centre-cropped to the target aspect ratio and
resized; input videos keep their first 1 + 4k frames.

Inputs, checks and outputs are in generation_io.py (re-exported here).
Errors come before any expensive work: files are read and sizes checked before
encoding or sampling, and `from_workdir` checks the workdir (config, checkpoint
step, its commit marker, the VAE workdir) before restoring any array.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax import sharding, xla_options
from sora_jax.data import transforms
from sora_jax.data.tokenizer import HashTokenizer
from sora_jax.diffusion import samplers
# Inputs, checks and outputs live in generation_io; re-exported so `generate` is the one API.
from sora_jax.generation_io import (  # noqa: F401
    MAX_LATENT_FRAMES_FACTOR, MAX_PIXELS_FACTOR, MODES, CheckpointError, GenerationError, Geometry, Result,
    VideoReadError, check_checkpoint, complete_steps, expand, fit, load_frames, prepare_video, save)
from sora_jax.models import patches

_COMPILED: dict = {}  # static sampler setting -> jitted sampler (see Generator._sampler_fn)

# --- the generator ----------------------------------------------------------------------------


class Generator:
    """A trained DiT + its VAE, with one method per prompting mode (see the module docstring)."""

    def __init__(self, config, model: nnx.Module, vae, *, step: int | None = None, workdir: str = "",
                 mesh=None, text_encode_fn: Callable | None = None):
        from sora_jax.stages.dit import diffusion_config

        self.config, self.vae, self.step, self.workdir = config, vae, step, workdir
        self.geometry = Geometry.from_config(config)
        self.diffusion = diffusion_config(config)
        self.mesh = mesh
        self.rules = sharding.rules_from_config(config.sharding_rules)
        self.graphdef, self.state = nnx.split(model)
        model_cfg = config.model
        self.text_mode = "ids"
        if model_cfg.get("cross_attention", True) and model_cfg.text.encoder == "precomputed":
            if text_encode_fn is None:
                raise GenerationError("this DiT reads precomputed text embeddings (model.text.encoder='precomputed'): "
                                      "pass text_encode_fn(list of prompts) -> (emb [B,S,D], mask [B,S])")
            self.text_mode = "emb"
        self.text_encode_fn = text_encode_fn
        self.tokenizer = HashTokenizer(int(config.data.vocab_size), int(config.data.text_len))
        samples = config.get("samples", None) or {}
        self.defaults = dict(steps=int(samples.get("steps", 32)), guidance=float(samples.get("guidance", 3.0)),
                             sampler=str(samples.get("sampler", "heun")), seed=int(samples.get("seed", 0)),
                             shift=self._config_shift(), fps=float(config.data.get("toy", {}).get("fps", 8.0) or 8.0))

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None, *, use_ema: bool = True, mesh=None,
                     vae_workdir: str | None = None, **kwargs) -> "Generator":
        """Loads the DiT (EMA weights by default) and the VAE its config names.

        Both workdirs are checked (config, a complete checkpoint) before any array is
        read. `mesh` (sharding.make_mesh) places the model: it is created under the
        mesh and the config's logical rules, and sampling runs under them too.
        """
        from sora_jax.train import checkpoint

        config_dict, step = check_checkpoint(workdir, step, "DiT")
        if config_dict.get("stage") != "dit":
            raise CheckpointError(f"{os.path.abspath(workdir)} is a {config_dict.get('stage')!r} workdir, not a DiT one")
        vae_dir = vae_workdir or config_dict.get("vae_workdir", "")
        if not vae_dir:
            raise CheckpointError(f"DiT workdir {os.path.abspath(workdir)}: its config has no vae_workdir "
                                  "(pass vae_workdir=)")
        _, vae_step = check_checkpoint(vae_dir, None, "VAE")
        from sora_jax.models.vae_api import VAEHandle

        mesh = mesh if mesh is not None else sharding.make_mesh({"data": -1})
        # Explicit steps: a damaged checkpoint is an error here, never moved aside (restore_latest's way).
        for what, path, at in (("DiT", workdir, step), ("VAE", vae_dir, vae_step)):
            try:
                if what == "DiT":
                    config, model = checkpoint.restore_model(workdir, step=step, use_ema=use_ema, mesh=mesh)
                else:
                    vae = VAEHandle.from_workdir(vae_dir, step=vae_step)
            except Exception as e:  # orbax / tensorstore raise many types for missing or damaged files
                raise CheckpointError(f"{what} workdir {os.path.abspath(path)}: checkpoint {at} could not be "
                                      f"restored ({type(e).__name__}: {str(e)[:300]})") from e
        return cls(config, model, vae, step=step, workdir=os.path.abspath(workdir), mesh=mesh, **kwargs)

    # --- settings ---------------------------------------------------------------------------

    def _config_shift(self):
        d = self.diffusion
        return "auto" if d.shift == "resolution" else (float(d.shift_value) if d.shift == "constant" else None)

    def _settings(self, seed, steps, guidance, sampler, shift) -> dict:
        d = self.defaults
        s = dict(seed=d["seed"] if seed is None else int(seed), steps=d["steps"] if steps is None else int(steps),
                 guidance=d["guidance"] if guidance is None else float(guidance),
                 sampler=d["sampler"] if sampler is None else str(sampler), shift=d["shift"] if shift is None else shift)
        if s["sampler"] not in samplers.SAMPLERS:
            raise GenerationError(f"sampler must be one of {samplers.SAMPLERS}, got {s['sampler']!r}")
        if s["steps"] < 1:
            raise GenerationError(f"steps must be >= 1, got {s['steps']}")
        if isinstance(s["shift"], str) and s["shift"] not in ("auto", "none"):
            try:
                s["shift"] = float(s["shift"])
            except ValueError:
                raise GenerationError(f"shift must be 'auto', 'none' or a number, got {s['shift']!r}") from None
        if s["shift"] == "none":
            s["shift"] = None
        return s

    def _size(self, size, notes):
        return self.geometry.default_size() if size is None else self.geometry.round_size(size, notes)

    def _frames(self, frames, notes, **kw):
        return self.geometry.train_frames if frames is None else self.geometry.round_frames(frames, notes, **kw)

    # --- VAE --------------------------------------------------------------------------------

    def encode(self, frames_uint8: np.ndarray) -> np.ndarray:
        """uint8 (T, H, W, 3) -> normalised latents (T', H', W', C)."""
        video = transforms.normalise(frames_uint8)[None]
        with self._context():
            return np.asarray(self.vae.encode(video), np.float32)[0]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Normalised latents (T', H', W', C) -> uint8 (T, H, W, 3)."""
        with self._context():
            video = np.asarray(self.vae.decode(jnp.asarray(latents, jnp.float32)[None]), np.float32)[0]
        return transforms.denormalise(video)

    def _context(self):
        import contextlib

        stack = contextlib.ExitStack()
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(nnx.logical_axis_rules(self.rules))
        return stack

    # --- the sampler --------------------------------------------------------------------------

    def _text(self, prompt: str) -> dict:
        if not self.config.model.get("cross_attention", True):
            return {}
        if self.text_mode == "emb":
            emb, mask = self.text_encode_fn([prompt])
            return dict(text_emb=jnp.asarray(emb)[0], text_mask=jnp.asarray(mask)[0])
        return dict(text_ids=jnp.asarray(self.tokenizer.encode(prompt)))

    def _sampler_fn(self, shape, settings, text_keys):
        """The jitted sampler for one static setting (latent shape, steps, sampler, guidance, shift).

        Compiling is the slow part of sampling a small video, so one compiled function
        serves every mode at a shape:
          * the given frames are a *traced* token mask, not samplers.sample's static
            cond_frames_mask (one compile per mask): `_conditioned` applies the same
            rule inside the model call (given tokens at their clean values with t = 0)
            and the given tokens are reset once more at the end, so the free tokens see
            exactly what samplers.sample's own conditioning gives them;
          * every mode runs the SDEdit path: strength 1 from a zero init is exactly the
            plain start (x = 0 * init + noise, time grid from t = 1).
        Compiled functions are shared by all Generators of the same model structure.
        """
        key = (self.graphdef, shape, self.geometry.patch, settings["steps"], settings["sampler"],
               settings["guidance"], settings["shift"], text_keys, self.diffusion.prediction,
               str(self.config.get("cpu_dot_fusion", "fused")))  # compiler options are part of the program
        if key not in _COMPILED:
            graphdef, patch, prediction = self.graphdef, self.geometry.patch, self.diffusion.prediction

            def run(state, text, given_tokens, cond_tokens, init_latent, strength, seed):
                model = nnx.merge(graphdef, state)

                def conditioned(x, t, positions, segment_ids, **inputs):
                    rows = x.shape[0]
                    x = jnp.where(given_tokens[None, :, None], jnp.tile(cond_tokens, (rows, 1, 1)), x)
                    t = jnp.where(given_tokens[None], 0.0, t)
                    return model(x, t, positions, segment_ids, **inputs)

                latent = samplers.sample(
                    conditioned, shape=shape, patch=patch, **text, sampler=settings["sampler"],
                    steps=settings["steps"], guidance=settings["guidance"], shift=settings["shift"], seed=seed,
                    sdedit_strength=strength, init_latent=init_latent, prediction=prediction)
                tokens = jnp.where(given_tokens[:, None], cond_tokens[0], patches.patchify(latent, patch))
                return patches.unpatchify(tokens, tuple(s // p for s, p in zip(shape[:3], patch)), patch, shape[3])

            _COMPILED[key] = jax.jit(run, compiler_options=xla_options.from_config(self.config))
        return _COMPILED[key]

    def _generate(self, mode: str, prompt: str, *, size, frames: int, settings: dict, notes: list, expand_with=None,
                  cond: dict | None = None, init_latent=None, strength: float = 1.0, timings: dict | None = None,
                  extra: dict | None = None) -> Result:
        """Samples latents of `frames` pixel frames at `size`; cond = {latent frame index: latent (H', W', C)}."""
        timings = dict(timings or {})
        start = time.perf_counter()
        expanded = expand(prompt, expand_with, settings["seed"])
        timings["expand_s"] = time.perf_counter() - start
        shape = self.geometry.latent_shape(frames, size)
        cond_latent = np.zeros(shape, np.float32)
        frame_mask = np.zeros(shape[0], bool)
        for i, lat in (cond or {}).items():
            frame_mask[i] = True
            cond_latent[i] = lat
        grid = tuple(s // p for s, p in zip(shape[:3], self.geometry.patch))
        given_tokens = samplers.token_cond_mask(frame_mask, grid, self.geometry.patch)
        cond_tokens = patches.patchify(cond_latent[None], self.geometry.patch)
        init = np.zeros(shape, np.float32) if init_latent is None else np.asarray(init_latent, np.float32)
        text = self._text(expanded)
        fn = self._sampler_fn(shape, settings, tuple(sorted(text)))
        start = time.perf_counter()
        with self._context():
            latents = fn(self.state, text, jnp.asarray(given_tokens), jnp.asarray(cond_tokens), jnp.asarray(init),
                         jnp.float32(strength), jnp.int32(settings["seed"]))
            latents = np.asarray(jax.block_until_ready(latents))
        timings["sample_s"] = time.perf_counter() - start
        start = time.perf_counter()
        video = self.decode(latents)
        timings["decode_s"] = time.perf_counter() - start
        timings["total_s"] = sum(v for k, v in timings.items() if k.endswith("_s") and k != "total_s")
        metadata = dict(
            mode=mode, prompt=prompt, expanded_prompt=expanded, expander=_expander_name(expand_with),
            seed=settings["seed"], steps=settings["steps"], guidance=settings["guidance"], sampler=settings["sampler"],
            shift=settings["shift"], resolved_shift=_resolved_shift(settings["shift"], shape, self.geometry.patch),
            checkpoint_step=self.step, workdir=self.workdir, size=list(size), frames=int(video.shape[0]),
            latent_shape=list(latents.shape), given_latent_frames=sorted(int(i) for i in (cond or {})),
            fps=self.defaults["fps"], adjustments=list(notes), timings={k: round(v, 4) for k, v in timings.items()},
            **(extra or {}))
        return Result(video=video, latents=latents, metadata=metadata)

    # --- the modes ------------------------------------------------------------------------------

    def text_to_video(self, prompt: str, *, size=None, frames=None, seed=None, steps=None, guidance=None,
                      sampler=None, shift=None, expand_with=None) -> Result:
        notes: list = []
        settings = self._settings(seed, steps, guidance, sampler, shift)
        size, frames = self._size(size, notes), self._frames(frames, notes)
        return self._generate("t2v", prompt, size=size, frames=frames, settings=settings, notes=notes,
                              expand_with=expand_with)

    def text_to_image(self, prompt: str, *, size=None, seed=None, steps=None, guidance=None, sampler=None,
                      shift=None, expand_with=None) -> Result:
        notes: list = []
        settings = self._settings(seed, steps, guidance, sampler, shift)
        return self._generate("t2i", prompt, size=self._size(size, notes), frames=1, settings=settings, notes=notes,
                              expand_with=expand_with)

    def image_to_video(self, image, prompt: str, *, size=None, frames=None, seed=None, steps=None, guidance=None,
                       sampler=None, shift=None, expand_with=None) -> Result:
        """Animates an image (path or uint8 (H, W, 3)): latent frame 0 is the encoded image, kept exactly."""
        notes: list = []
        settings = self._settings(seed, steps, guidance, sampler, shift)
        still, size = prepare_video(image, "image", self.geometry, size, notes, max_frames=1)
        frames = self._frames(frames, notes, min_latent=2) if frames is not None else max(
            self.geometry.train_frames, self.geometry.pixel_frames(2))
        start = time.perf_counter()
        first = self.encode(still)[0]
        timings = {"encode_s": time.perf_counter() - start}
        return self._generate("i2v", prompt, size=size, frames=frames, settings=settings, notes=notes,
                              expand_with=expand_with, cond={0: first}, timings=timings)

    def extend(self, video, prompt: str, *, frames=None, direction: str = "forward", size=None, seed=None, steps=None,
               guidance=None, sampler=None, shift=None, expand_with=None) -> Result:
        """Adds `frames` new pixel frames (a multiple of 4) after (forward) or before (backward) a video.

        The video's latents are given at the head (forward) or the tail (backward) and
        come out exactly; latents["given"] in the metadata says which latent frames.
        """
        if direction not in ("forward", "backward"):
            raise GenerationError(f"direction must be 'forward' or 'backward', got {direction!r}")
        notes: list = []
        settings = self._settings(seed, steps, guidance, sampler, shift)
        clip, size = prepare_video(video, "video", self.geometry, size, notes,
                                   max_frames=self.geometry.pixel_frames(self.geometry.max_latent_frames - 1))
        given = self.geometry.latent_frames(len(clip))
        new = self.geometry.round_new_frames(self.geometry.train_frames - 1 if frames is None else frames, notes,
                                             given_latent=given)
        new_latent = new // self.geometry.t_stride
        start = time.perf_counter()
        lat = self.encode(clip)
        timings = {"encode_s": time.perf_counter() - start}
        offset = 0 if direction == "forward" else new_latent
        cond = {offset + i: lat[i] for i in range(given)}
        return self._generate("extend", prompt, size=size, frames=self.geometry.pixel_frames(given + new_latent),
                              settings=settings, notes=notes, expand_with=expand_with, cond=cond, timings=timings,
                              extra=dict(direction=direction, new_frames=new, input_frames=len(clip)))

    def loop(self, prompt: str, *, image=None, size=None, frames=None, seed=None, steps=None, guidance=None,
             sampler=None, shift=None, expand_with=None) -> Result:
        """A seamless loop: the first latent frame is given again as the last one.

        The first frame is the encoded `image` when given, else a text-to-image sample
        from the same prompt and seed. The last latent frame then equals the first
        exactly: its 4 pixel frames T-4..T-1 are the motion back into frame 0's state, and
        frame T-1 shows the moment of frame 0 again. The cycle is frames 0..T-2
        (metadata["loop_frames"] = T-1; `save` writes that), played repeatedly.
        """
        notes: list = []
        settings = self._settings(seed, steps, guidance, sampler, shift)
        timings = {}
        if image is not None:
            still, size = prepare_video(image, "image", self.geometry, size, notes, max_frames=1)
            start = time.perf_counter()
            first = self.encode(still)[0]
            timings["encode_s"] = time.perf_counter() - start
        else:
            size = self._size(size, notes)
            first = self.text_to_image(prompt, size=size, seed=settings["seed"], steps=settings["steps"],
                                       guidance=settings["guidance"], sampler=settings["sampler"],
                                       shift=settings["shift"], expand_with=expand_with)
            timings["first_frame_s"] = first.metadata["timings"]["total_s"]
            first = first.latents[0]
        frames = self._frames(frames, notes, min_latent=3) if frames is not None else max(
            self.geometry.train_frames, self.geometry.pixel_frames(3))
        last = self.geometry.latent_frames(frames) - 1
        out = self._generate("loop", prompt, size=size, frames=frames, settings=settings, notes=notes,
                             expand_with=expand_with, cond={0: first, last: first}, timings=timings)
        out.metadata["loop_frames"] = int(out.video.shape[0]) - 1  # frames 0 .. T-2: the seamless cycle
        return out

    def edit(self, video, prompt: str, *, strength: float = 0.6, size=None, seed=None, steps=None, guidance=None,
             sampler=None, shift=None, expand_with=None) -> Result:
        """SDEdit: the video's latents noised to t = strength, then sampled to t = 0 with the new prompt.

        strength 0 returns the input's latents exactly; strength 1 ignores the input.
        """
        try:
            strength = float(strength)
        except (TypeError, ValueError):
            raise GenerationError(f"strength must be a number in [0, 1], got {strength!r}") from None
        if not 0.0 <= strength <= 1.0:
            raise GenerationError(f"strength must be in [0, 1], got {strength}")
        notes: list = []
        settings = self._settings(seed, steps, guidance, sampler, shift)
        clip, size = prepare_video(video, "video", self.geometry, size, notes)
        start = time.perf_counter()
        lat = self.encode(clip)
        timings = {"encode_s": time.perf_counter() - start}
        return self._generate("edit", prompt, size=size, frames=len(clip), settings=settings, notes=notes,
                              expand_with=expand_with, init_latent=lat, strength=strength, timings=timings,
                              extra=dict(strength=strength, input_frames=len(clip)))

    def connect(self, video_a, video_b, prompt: str, *, frames=None, context: int = 1, size=None, seed=None,
                steps=None, guidance=None, sampler=None, shift=None, expand_with=None) -> Result:
        """A transition of `frames` new pixel frames from the end of A to the start of B.

        A's last `context` latent frames are given at the head, B's first `context` at the
        tail (B is fitted to A's size). The result starts at A's end and ends at B's start.
        """
        notes: list = []
        settings = self._settings(seed, steps, guidance, sampler, shift)
        context = int(context)
        if context < 1:
            raise GenerationError(f"context must be >= 1 latent frame, got {context}")
        clip_a, size = prepare_video(video_a, "video_a", self.geometry, size, notes)
        clip_b, _ = prepare_video(video_b, "video_b", self.geometry, size, notes)
        for name, clip in (("video_a", clip_a), ("video_b", clip_b)):
            if self.geometry.latent_frames(len(clip)) < context:
                raise GenerationError(f"{name} has {len(clip)} frames: fewer than context={context} latent frames "
                                      f"({self.geometry.pixel_frames(context)} pixel frames)")
        new = self.geometry.round_new_frames(self.geometry.train_frames - 1 if frames is None else frames, notes,
                                             given_latent=2 * context)
        new_latent = new // self.geometry.t_stride
        start = time.perf_counter()
        lat_a, lat_b = self.encode(clip_a), self.encode(clip_b)
        timings = {"encode_s": time.perf_counter() - start}
        total = 2 * context + new_latent
        cond = {i: lat_a[len(lat_a) - context + i] for i in range(context)}
        cond.update({total - context + i: lat_b[i] for i in range(context)})
        return self._generate("connect", prompt, size=size, frames=self.geometry.pixel_frames(total), settings=settings,
                              notes=notes, expand_with=expand_with, cond=cond, timings=timings,
                              extra=dict(context=context, new_frames=new))

    def upscale(self, result: Result, size, *, strength: float = 0.7, seed=None, steps=None, guidance=None,
                sampler=None, shift=None) -> Result:
        """Renders a (small) result at another size keeping its composition: its latents are
        resized to the new latent grid and SDEdited at `strength` with the same prompt and seed."""
        notes: list = []
        size = self.geometry.round_size(size, notes)
        md = result.metadata
        settings = self._settings(md["seed"] if seed is None else seed, md["steps"] if steps is None else steps,
                                  md["guidance"] if guidance is None else guidance,
                                  md["sampler"] if sampler is None else sampler, md["shift"] if shift is None else shift)
        shape = self.geometry.latent_shape(int(md["frames"]), size)
        init = np.asarray(jax.image.resize(jnp.asarray(result.latents), shape, "linear"))
        out = self._generate("upscale", md["expanded_prompt"], size=size, frames=int(md["frames"]), settings=settings,
                             notes=notes, init_latent=init, strength=float(strength),
                             extra=dict(strength=float(strength), source_size=md["size"]))
        out.metadata["prompt"] = md["prompt"]
        return out


def _expander_name(expander) -> str:
    if expander is None:
        return "none"
    return expander if isinstance(expander, str) else type(expander).__name__


def _resolved_shift(shift, shape, patch) -> float:
    grid = tuple(s // p for s, p in zip(shape[:3], patch))
    return float(samplers.resolve_shift(shift, grid, patch[0]))
