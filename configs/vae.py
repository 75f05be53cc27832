"""Stage "vae": train the causal video VAE (sora_jax/models/vae.py).

  python -m sora_jax.main --config=configs/vae.py:quick --workdir=/tmp/vae_quick

Variants (the first argument):
  small     the "vae-small" bench architecture (base width 32, mults (1,2,4,4), one res
            block per level, 16 latent channels, 4x8x8; 10.1M parameters, the same as
            diffusers' AutoencoderKLWan(base_dim=32)) on 17-frame 64x64 toy-world clips
  quick     the CPU fidelity run (2400 Muon steps, about the time of 3000 AdamW steps: 13.8 min on
            the AMX Xeon, ~25 min on a slower 2-core EPYC; the quickstart's VAE is this config
            with AdamW at 1500 steps, configs/quickstart.py): a 2x2 pixel unshuffle,
            then widths 32/64/128, same compression (4x8x8, 16 channels), trained on 9-frame
            32x32 clips plus images
            (one video shape, one compile); the last eval also scores held-out clips of up to
            9 frames at their native sizes, every aspect ratio, in a 48x48 pixel budget
  micro     tests / runlocal: base width 8, a few steps on tiny clips
Other arguments: steps=N, runlocal (shrinks to a smoke run), gan (enables the GAN terms).
"""

from __future__ import annotations

import ml_collections

from sora_jax import config_lib
from sora_jax.data.config import default_data_config
from sora_jax.stages.vae import vae_defaults

# variant -> (model overrides, data overrides, toy-world overrides, train steps, lr)
VARIANTS = {
    "small": (
        dict(base_width=32, channel_mult=(1, 2, 4, 4), num_res_blocks=1, decoder_res_blocks=2),
        dict(frames=17, pixels=64 * 64, batch_size=2, max_batch_size=16, num_train=4096, num_eval=32),
        dict(image_prob=0.15),
        20000, 3e-4,
    ),
    "quick": (
        # A 2x2 pixel unshuffle in front instead of a full-resolution level (base width 16):
        # the same 4x8x8 code, 1.6x less time per step on this CPU, and the same held-out
        # PSNR after 250 steps (18.6 vs 18.8 dB; docs/vae.md), so more steps fit in the budget.
        # The tent decoder shortcut: latent errors (a DiT's) decode without the 8x8 seams of
        # the per-cell one (grid ratio 1.5 vs 3.4 under latent noise) for -0.2 dB (docs/vae.md).
        # "taps" convs: 3.6-3.8 vs 2.6 training steps/s on the 2-core AMX Xeon (the same losses);
        # since sprint 10 (split kernels, project()'s VJP) 4.1-4.3 with AdamW, so 3000 AdamW steps
        # took 13.8 min there from launch (docs/vae.md); its evals compile with "xla" (stages/vae.py on_eval).
        # conv_impl "auto" (the model's default) is "taps" on CPU and "xla" on GPU / TPU.
        dict(base_width=32, channel_mult=(1, 2, 4), input_patch=2, num_res_blocks=1, decoder_res_blocks=2,
             shortcut_decoder="tent"),
        # 9-frame clips (three latent frames): trained on 5-frame clips (two latent frames) the
        # causal context of every later latent frame is never seen, and 9-frame videos got
        # worse with training (frames 5-8 at 16.1 dB after 4000 steps; docs/vae.md).
        dict(frames=9, pixels=32 * 32, batch_size=2, max_batch_size=16, num_train=4096, num_eval=32),
        dict(image_prob=0.15, aspect_ratios=["1:1"], frame_step=8),
        # 2400 Muon steps: 22.4 dB on clips, above AdamW's 22.0 at 3000, in about AdamW's 3000-step time.
        # lr 1.4e-3, not 2e-3: +0.17 +- 0.02 dB paired on 128 held-out clips, better on every eval set
        # (one run each, 2026-12-07; 4e-3 was worse, docs/vae.md). The quickstart's AdamW keeps 2e-3
        # (lr 3e-3 was worse with AdamW: 20.7 vs 21.1 dB at step 1200 of 1500).
        2400, 1.4e-3,
    ),
    "micro": (
        dict(base_width=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, decoder_res_blocks=1,
             mid_attention=False, conv_impl="xla"),
        dict(frames=5, pixels=32 * 32, batch_size=8, max_batch_size=8, num_train=256, num_eval=8, text_len=16),
        dict(aspect_ratios=["1:1"], image_prob=0.0, max_objects=1),
        30, 3e-3,
    ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, _, rest = (arg or "quick").partition(",")
    if "=" in variant or variant in ("runlocal", "gan"):  # only options given
        variant, rest = "quick", arg
    if variant == "runlocal":
        variant = "micro"
    if variant not in VARIANTS:
        raise ValueError(f"configs/vae.py: unknown variant {variant!r}; known: {sorted(VARIANTS)}")
    args = config_lib.parse_arg(rest, steps=0, runlocal=False, gan=False)
    model_over, data_over, toy_over, steps, lr = VARIANTS[variant]

    config = config_lib.base_config()
    config.stage = "vae"
    config.variant = variant

    data = default_data_config()
    data.update(data_over)
    data.toy.update(toy_over)
    data.toy.max_frames = data.frames
    data.toy.pixel_budget = data.pixels
    data.toy.size_multiple = data.multiple
    config.data = data

    config.model = ml_collections.ConfigDict(dict(
        base_width=32, channel_mult=(1, 2, 4, 4), num_res_blocks=1, decoder_res_blocks=2, latent_channels=16,
        temporal_compression=4, mid_attention=True, level_attention=(), conv_impl="auto", input_patch=1,
        patch_shortcut=True, shortcut_decoder="cell", compute_dtype="float32"))
    config.model.update(model_over)

    config.vae = vae_defaults()
    if variant == "quick":
        # The VAE is fully convolutional and causal, so it learns from short square clips
        # (as Wan and Open-Sora train theirs on fixed crops) and encodes any size. Training
        # on native buckets would compile the step once per (T, H, W) (~25 s each on 2
        # cores); the final eval checks that the square training transfers to native sizes.
        config.vae.native_eval = dict(
            frames=9, pixels=48 * 48, num_eval=48,
            toy=dict(aspect_ratios=["16:9", "9:16", "4:3", "3:4", "1:1", "21:9"], max_frames=9, frame_step=8,
                     pixel_budget=48 * 48, image_prob=0.3))
    if args.gan:
        config.vae.gan_weight = 0.1

    config.optim.lr = lr
    if variant == "quick":
        # Muon (sora_jax/train/muon.py, Newton-Schulz in Gram space) reaches in N steps what
        # AdamW reaches in about 2N here (21.8 vs 21.3 dB at 1500 steps, 22.7 vs 22.0 at 3000),
        # for ~1.26x AdamW's step time on a 2-core EPYC (docs/vae.md, sprints 13-14). Micro (the tests'
        # config) stays on AdamW; tests/test_optim.py runs Muon on it explicitly.
        config.optim.name = "muon"
    config.optim.warmup_steps = 2 if variant == "micro" else 100
    config.optim.ema_decay = 0.0 if variant != "small" else 0.999
    config.train.steps = args.steps or steps
    config.train.log_every = 1 if variant == "micro" else 20
    config.train.eval_every = config.train.steps if variant == "micro" else max(100, config.train.steps // 5)
    config.train.checkpoint_every = config.train.eval_every
    # The whole 32-example eval split, which is one finite pass: 15 batches for quick, 20 for small
    # (2 clips, or several images, each; tests/test_vae_stage.py checks the coverage); 64 only caps a
    # larger user split. Until 2026-12-07 it was 4 batches, i.e. 8 clips, whose mean PSNR moved by
    # ~1.4 dB from one 8-clip set to another (docs/vae.md).
    config.train.num_eval_batches = 1 if variant == "micro" else 64
    if variant == "micro":
        config.train.progress = False
        config.train.async_checkpoints = False
        config.vae.stats_batches = 2
        config.vae.num_recon_videos = 1
    if args.runlocal:
        config.train.steps = 6
        config.train.eval_every = config.train.checkpoint_every = 3
        config.train.num_eval_batches = 1
        config.vae.stats_batches = 1
    return config
