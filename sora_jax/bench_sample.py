"""Sampling benchmark: time per step and per video at two sizes.

    python -m sora_jax.bench sample [--sizes=64x64,128x128] [--frames=17] [--steps=8]
        [--sampler=euler] [--guidance=3.0] [--repeats=2] [--dit=quick] [--vae=quick]

Builds a randomly initialised DiT and VAE of the quickstart sizes (configs/dit.py
and configs/vae.py variants; timing needs no trained weights) and runs text-to-video
through `sora_jax.generate.Generator`, the same path as the CLI. For each size:
compile time (first call), then the median over `repeats` warm calls of the
sampling time (all steps, with the classifier-free-guidance batch of 2 when
guidance != 1), the VAE decode time, and their sum per video; per-step time is the
warm sampling time / steps. Unsharded, on the default device.
"""

from __future__ import annotations

import os
import time

import numpy as np


def _parse(args: list[str]) -> dict:
    opts = dict(sizes="64x64,128x128", frames=17, steps=8, sampler="euler", guidance=3.0, repeats=2, dit="quick",
                vae="quick")
    for a in args:
        key, _, value = a.lstrip("-").partition("=")
        if key not in opts:
            raise SystemExit(f"bench sample: unknown argument {a!r}; known: {sorted(opts)}")
        opts[key] = type(opts[key])(value)
    return opts


def build_generator(dit_variant: str = "quick", vae_variant: str = "quick"):
    """A Generator around random quickstart-size models (no workdir)."""
    from flax import nnx

    from sora_jax import config_lib
    from sora_jax.generate import Generator
    from sora_jax.models.dit import DiT
    from sora_jax.models.vae import CausalVAE
    from sora_jax.models.vae_api import VAEHandle

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    dit_cfg = config_lib.load_config(os.path.join(root, f"dit.py:{dit_variant}"))
    vae_cfg = config_lib.load_config(os.path.join(root, f"vae.py:{vae_variant}"))
    with nnx.use_eager_sharding(False):
        dit = DiT(dit_cfg.model, rngs=nnx.Rngs(0))
        vae = CausalVAE(vae_cfg.model, rngs=nnx.Rngs(1))
    return Generator(dit_cfg, dit, VAEHandle(vae), step=0), dit_cfg


def run(args: list[str]) -> dict:
    import jax

    from sora_jax.models.dit import count_params
    from sora_jax.sample import parse_size

    opts = _parse(args)
    gen, dit_cfg = build_generator(opts["dit"], opts["vae"])
    out = dict(device=jax.devices()[0].device_kind, dit=opts["dit"], vae=opts["vae"],
               dit_params=count_params(nnx_model(gen)), steps=opts["steps"], sampler=opts["sampler"],
               guidance=opts["guidance"], frames=opts["frames"], sizes={})
    for text in opts["sizes"].split(","):
        size = parse_size(text)
        kw = dict(size=size, frames=opts["frames"], steps=opts["steps"], sampler=opts["sampler"],
                  guidance=opts["guidance"])
        start = time.perf_counter()
        first = gen.text_to_video("a red circle bouncing on a blue background", seed=0, **kw)
        first_s = time.perf_counter() - start
        runs = [gen.text_to_video("a red circle bouncing on a blue background", seed=i + 1, **kw).metadata["timings"]
                for i in range(opts["repeats"])]
        sample_s = float(np.median([r["sample_s"] for r in runs]))
        decode_s = float(np.median([r["decode_s"] for r in runs]))
        lt, lh, lw, _ = first.latents.shape
        pt, ph, pw = gen.geometry.patch
        out["sizes"][f"{first.video.shape[1]}x{first.video.shape[2]}"] = dict(
            frames=int(first.video.shape[0]), latent_shape=list(first.latents.shape),
            tokens=(lt // pt) * (lh // ph) * (lw // pw), first_call_s=round(first_s, 3),
            sample_s_per_video=round(sample_s, 4), sample_s_per_step=round(sample_s / opts["steps"], 5),
            decode_s_per_video=round(decode_s, 4), total_s_per_video=round(sample_s + decode_s, 4))
    return out


def nnx_model(gen):
    from flax import nnx

    return nnx.merge(gen.graphdef, gen.state)
