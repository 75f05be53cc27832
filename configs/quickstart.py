"""The CPU quickstart: a VAE, then a DiT, on the toy world, in about 17-45 minutes on 2 cores (machine-dependent).

`python -m sora_jax.quickstart --workdir=DIR` runs the whole pipeline (VAE ->
latent cache -> DiT -> samples). Each stage is also an ordinary config:

  python -m sora_jax.main --config=configs/quickstart.py:vae --workdir=DIR/vae
  python -m sora_jax.cache_latents --vae_workdir=DIR/vae --out=DIR/latents
  python -m sora_jax.main --config=configs/quickstart.py:dit,latents=DIR/latents,vae=DIR/vae --workdir=DIR/dit

Arguments: the stage ("vae" | "dit"), then options: micro (a CI-sized smoke run
of the same pipeline), steps=N, latents=DIR, vae=DIR.
"""

from __future__ import annotations

import os

from sora_jax import config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))

# Measured (README): sprint 10, 2-core Intel AMX Xeon: VAE 7.8 min (1500 "taps" steps at 4.2 steps/s),
# latent cache 1.6 min, DiT 8.6 min, samples 13 s (18.2 min). Sprint 14, a 2-core AVX2 EPYC: 10.8, 2.2,
# 12.6 min, 24 s (26.0 min). Sprint 4 (1000 "xla" VAE steps) on a 2-core AVX2 machine: 17.5, 5.7, 20.9 min, 28 s.
QUICK_STEPS = {"vae": 1500, "dit": 1000}
MICRO_STEPS = {"vae": 4, "dit": 4}

# The world both stages see: toy-world videos of up to 17 frames in a 48x48 pixel budget.
FRAMES, PIXELS = 17, 48 * 48


def get_config(arg: str | None = None):
    stage, _, rest = (arg or "vae").partition(",")
    if stage not in ("vae", "dit"):
        raise ValueError(f"configs/quickstart.py: first argument must be 'vae' or 'dit', got {stage!r}")
    args = config_lib.parse_arg(rest, micro=False, steps=0, latents="", vae="")
    variant = "micro" if args.micro else "quick"
    if stage == "vae":
        config = config_lib.load_config(f"{_HERE}/vae.py:{variant}")
        # AdamW, not the fidelity config's Muon: Muon's VAE reconstructs better (21.8 vs 21.3 dB
        # at 1500 steps) but the DiT trained on its latents ends at a higher held-out loss (1.13 vs
        # 1.02 at 1000 steps, higher at every t; both under the old unweighted eval) and its
        # "red circle" sample lost the circle (docs/vae.md, sprint 14; one paired run on one
        # machine, not explained yet).
        config.optim.name = "adamw"
        if not args.micro:
            config.optim.lr = 2e-3  # AdamW's measured lr (the fidelity config's Muon runs 1.4e-3)
    else:
        config = config_lib.load_config(f"{_HERE}/dit.py:{variant},latents={args.latents},vae={args.vae}")
    data = config.data
    if not args.micro and stage == "dit":
        # The VAE (configs/vae.py "quick") trains on short square clips and encodes any
        # size; the DiT, where native size matters (framing), sees the full native mix.
        data.pixels = data.toy.pixel_budget = PIXELS
        data.frames = data.toy.max_frames = FRAMES
        # Clips average ~24 latent tokens (measured on the cache), so max_slots=8 caps a
        # 256-token row at ~74% real tokens (measured: 1519 of 2048 per step). Raising
        # max_slots should fill rows at about the same step cost (not measured); the README numbers were measured with 8.
        data.row_len, data.max_slots, data.batch_size = 256, 8, 8
        data.num_train = 2048  # latents cached once; ~2 min of encoding on 2 cores
    steps = args.steps or (MICRO_STEPS if args.micro else QUICK_STEPS)[stage]
    config.train.steps = steps
    config.train.eval_every = max(1, steps // 4)
    config.train.checkpoint_every = config.train.eval_every
    if args.micro:
        data.num_train, data.num_eval = 32, 8
    # EMA 0.999 lags a 1000-step run badly (measured: EMA eval loss 1.21 vs 0.48 for
    # the raw parameters at step 1000); 0.99 averages over the last ~100 steps.
    config.optim.ema_decay = 0.99 if config.optim.ema_decay else 0.0
    config.quickstart = True
    return config
