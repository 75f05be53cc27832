"""Stage "captioner": train the descriptive video captioner on toy-world videos.

  python -m sora_jax.main --config=configs/captioner.py:quick --workdir=/tmp/captioner

Variants (the first argument):
  micro   tests: width 64, one encoder and one decoder layer, 32x32 5-frame square
          clips, 48-token captions (truncated), a handful of steps
  quick   CPU quickstart (minutes on 2 cores): width 128, 2+2 layers, 1- and 5-frame
          clips of 32x32 and 16x32 (two aspect ratios), captions up to 80 tokens (the
          99th percentile of this world's captions is 71)
Other arguments: steps=N, data=GLOB (train on an ArrayRecord set from
data/importer.py instead of the toy world), model=VARIANT (micro|S|M|B of
models/captioner.py), runlocal (shrinks to a smoke run).

The toy world's clip length and pixel budget are set to the data pipeline's, so a
clip shows everything its caption says (a caption of a 17-frame world cut to 9
frames would describe events the model never sees).
"""

from __future__ import annotations

import ml_collections

from sora_jax import config_lib
from sora_jax.data.config import default_data_config
from sora_jax.models.captioner import captioner_config

# variant -> (model variant, data overrides, toy-world overrides, train steps)
VARIANTS = {
    "micro": (
        "micro",
        dict(frames=5, pixels=32 * 32, text_len=48, batch_size=8, max_batch_size=8, num_train=512, num_eval=16),
        dict(aspect_ratios=["1:1"], image_prob=0.0, max_objects=2),
        6,
    ),
    "quick": (
        "S",
        dict(frames=5, pixels=32 * 32, text_len=80, batch_size=8, max_batch_size=16, num_train=8192, num_eval=64),
        dict(aspect_ratios=["1:1", "16:9"], image_prob=0.1, max_objects=2),
        600,
    ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, _, rest = (arg or "quick").partition(",")
    if "=" in variant or variant == "runlocal":  # no variant given, only options
        variant, rest = "quick", arg
    if variant not in VARIANTS:
        raise ValueError(f"configs/captioner.py: unknown variant {variant!r}; known: {sorted(VARIANTS)}")
    args = config_lib.parse_arg(rest, steps=0, data="", model="", runlocal=False)
    model_variant, data_over, toy_over, steps = VARIANTS[variant]

    config = config_lib.base_config()
    config.stage = "captioner"
    config.variant = variant

    data = default_data_config()
    data.update(data_over)
    data.caption = "descriptive"
    data.toy.update(toy_over)
    data.toy.max_frames = data.frames
    data.toy.pixel_budget = data.pixels
    data.toy.size_multiple = data.multiple
    if args.data:
        data.source, data.arrayrecord, data.num_train = "arrayrecord", args.data, 0
    config.data = data

    model = captioner_config(args.model or model_variant)
    model.vocab_size = data.vocab_size
    model.max_len = data.text_len
    config.model = model

    # Greedy captioning of held-out videos at every eval (on_eval), scored against the truth.
    config.captioner = ml_collections.ConfigDict(dict(
        num_examples=8 if variant == "micro" else 32,  # held-out records captioned per eval (the data mix)
        # ... plus this many held-out images: quick's mix has 10% images, 4 of the 32 above, too few
        # to measure whether the captioner tells an image from a video (stages/captioner.py).
        num_images=0 if variant == "micro" else 16,
        batch_size=8,  # videos per greedy-decoding batch (rounded up to the device count)
        vocab_scan=4096,  # non-toy data: training captions read for the id -> word table
    ))

    config.optim.lr = 3e-3 if variant == "micro" else 4e-3
    if variant != "micro":
        # Muon (sora_jax/train/muon.py; embeddings, norms and biases stay on AdamW) at 4e-3: eval/loss
        # 0.614 at 600 steps against AdamW 1e-3's 0.775, and fact recall 0.322 against 0.242; over 6000
        # steps it reaches AdamW's final eval loss by step 4000 (docs/captioning.md, 2026-12-08). Micro
        # (the tests) stays on AdamW.
        config.optim.name = "muon"
    config.optim.weight_decay = 0.01
    config.optim.warmup_steps = 2 if variant == "micro" else 100
    config.optim.ema_decay = 0.0  # short runs: EMA would lag far behind the weights
    config.train.steps = args.steps or steps
    config.train.log_every = 1 if variant == "micro" else 20
    config.train.eval_every = config.train.steps if variant == "micro" else max(50, config.train.steps // 3)
    config.train.checkpoint_every = config.train.eval_every
    config.train.sample_every = config.train.eval_every  # captions of held-out videos at every eval
    # The whole held-out split, one finite pass (quick: 64 clips in 7 batches; 4 batches held 40 of
    # them until 2026-12-07); 64 only caps a larger user split.
    config.train.num_eval_batches = 1 if variant == "micro" else 64
    config.train.progress = variant != "micro"  # tqdm bar
    config.train.print_every = 100  # a log line every N steps
    config.train.async_checkpoints = variant != "micro"

    if args.runlocal:
        config.train.steps = 10
        config.train.eval_every = config.train.checkpoint_every = config.train.sample_every = 5
        config.train.num_eval_batches = 1
        config.captioner.num_examples = 4
    return config
