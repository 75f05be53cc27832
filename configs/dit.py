"""Stage "dit": train the spacetime-patch DiT with rectified flow on cached toy-world latents.

  python -m sora_jax.main --config=configs/dit.py:quick,latents=/tmp/lat,vae=/tmp/vae --workdir=/tmp/dit

Variants (the first argument):
  micro        tests: width 64, depth 2, a 1-layer text encoder, 16-token captions
  quick        CPU quickstart: width 128, depth 4, a few hundred steps on 2 cores
  bench-small  the benchmark shape of issue 4 (width 384, depth 6, MLP 1536, 6 heads,
               32 precomputed text tokens of width 512); training it needs latents
               cached with text embeddings (docs/data.md)
Other arguments: latents=DIR (config.data.latents_dir), vae=DIR (config.vae_workdir),
steps=N, runlocal (shrinks everything to a smoke run).
"""

from __future__ import annotations

import ml_collections

from sora_jax import config_lib
from sora_jax.data.config import default_data_config
from sora_jax.diffusion.rectified_flow import default_diffusion_config
from sora_jax.models.dit import dit_config

# variant -> (model overrides, text overrides, data overrides, train steps)
VARIANTS = {
    "micro": (
        dict(width=64, depth=2, heads=2, mlp_dim=256),
        dict(vocab_size=1024, max_len=16, width=32, depth=1, heads=2, mlp_dim=64),
        dict(text_len=16, vocab_size=1024, batch_size=4, row_len=256, max_slots=4, frames=9, pixels=64 * 64),
        50,
    ),
    "quick": (
        dict(width=128, depth=4, heads=4, mlp_dim=512),
        dict(vocab_size=4096, max_len=32, width=64, depth=2, heads=2, mlp_dim=256),
        dict(text_len=32, vocab_size=4096, batch_size=8, row_len=512, max_slots=8, frames=17, pixels=64 * 64),
        2000,
    ),
    "bench-small": (
        dict(width=384, depth=6, heads=6, mlp_dim=1536),
        dict(encoder="precomputed", emb_dim=512, max_len=32),
        dict(text_len=32, batch_size=4, row_len=1280, max_slots=4, frames=17, pixels=128 * 128),
        20000,
    ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, _, rest = (arg or "quick").partition(",")
    if "=" in variant or variant == "runlocal":  # no variant given, only options
        variant, rest = "quick", arg
    if variant not in VARIANTS:
        raise ValueError(f"configs/dit.py: unknown variant {variant!r}; known: {sorted(VARIANTS)}")
    args = config_lib.parse_arg(rest, latents="", vae="", steps=0, runlocal=False)
    model_over, text_over, data_over, steps = VARIANTS[variant]

    config = config_lib.base_config()
    config.stage = "dit"
    config.variant = variant

    model = dit_config("bench-small" if variant == "bench-small" else "micro")
    model.update(model_over)
    model.text.update(text_over)
    model.latent_channels = 16  # the toy-world VAE's latent width (models/vae.py)
    config.model = model

    data = default_data_config()
    data.update(data_over)
    data.patch = tuple(model.patch)
    data.latents_dir = args.latents
    config.data = data
    config.vae_workdir = args.vae

    config.diffusion = default_diffusion_config()
    config.diffusion.tasks = dict(t2v=0.6, i2v=0.15, extend_forward=0.07, extend_backward=0.06, loop=0.06,
                                  connect=0.06)

    config.optim.lr = 3e-4 if variant != "bench-small" else 1e-4
    config.optim.warmup_steps = min(200, steps // 10)
    config.optim.ema_decay = 0.999 if variant != "micro" else 0.0
    config.train.steps = args.steps or steps
    config.train.eval_every = max(10, config.train.steps // 10)
    config.train.checkpoint_every = config.train.eval_every
    config.train.num_eval_batches = 4 if variant != "micro" else 1

    # Samples written at each eval (latents; decoded to GIFs when config.vae_workdir is set).
    config.samples = ml_collections.ConfigDict(dict(
        prompts=["a red circle bouncing on a blue background", "a green square moving left"],
        latent_shape=(3, 8, 8) if variant == "micro" else (5, 8, 8),  # latent (T, H, W)
        sampler="heun", steps=16 if variant == "micro" else 32, guidance=3.0, seed=0,
    ))

    if args.runlocal:
        config.train.steps = 10
        config.train.eval_every = config.train.checkpoint_every = 5
        config.train.num_eval_batches = 1
        config.data.batch_size = 2
        config.samples.steps = 4
        config.samples.prompts = config.samples.prompts[:1]
    return config
