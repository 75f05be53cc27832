"""Compute-scaling sweeps: one DiT run per compute multiple, all through the one loop.

  python -m sora_jax.main --config=configs/scaling.py:16x,preset=cpu,latents=DIR --workdir=W
  python experiments/scaling_sweep.py --sweep="base|4x|16x,preset=cpu,latents=DIR" --root=R

The first argument is the compute multiple: "base" (1x), "4x", "16x", "32x" (the
report's), "64x" or any "<k>x". Options:

  preset=cpu|pod|micro  base size, steps, batch and mesh (below)
  data_frac=0.5         share of log(multiple) that goes to tokens; params get the rest
  size_shift=0          integer: params x size_step^shift, tokens / size_step^shift
                        (an isoFLOP sweep: "16x,size_shift=-1|0|1" in the runner)
  size_step=4.0
  lr_width_power=0.0    lr = lr0 * (width / width0)^power (0: one lr for all, as DiT)
  latents=DIR, vae=DIR  the cached latents and the VAE (as configs/dit.py)
  base_steps=0          override the preset's base steps (the rest follow the rule)

The rule (sora_jax/scaling.py, docstring) turns the multiple into depth, heads
(width = heads x head_dim, MLP = mlp_ratio x width) and training steps such that
the analytic training FLOPs are exactly multiple x base (up to one step). The
batch, data, eval set, eval times, text encoder and optimizer are those of
configs/dit.py's variant for the preset, identical at every point. The plan is
stored in config.scaling (and so in every workdir's config.json).

Presets:
  micro  CI: configs/dit.py "micro" data/text; base width 64 (4 heads of 16), depth 2,
         6 base steps. Seconds per point plus start-up and compile.
  cpu    this 2-core machine: configs/dit.py "quick" data/text; base width 96 (3 heads
         of 32), depth 3, batch 4 rows of 256 tokens, 400 base steps, sized so that base,
         4x and 16x together take about an hour (docs/scaling.md has the arithmetic).
  pod    TPU v5p / H100: configs/dit.py "bench-small" data (precomputed text
         embeddings, 128x128 px, 17 frames); base = DiT-S (width 384, depth 12, 6 heads
         of 64); global batch 256 rows of 1280 tokens, FSDP over all devices,
         bf16 compute, 20k base steps (64x is about DiT-B size).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os

import ml_collections

from sora_jax import config_lib, scaling

_HERE = os.path.dirname(os.path.abspath(__file__))

# preset -> configs/dit.py variant, base shape, base steps, evals per run, overrides
PRESETS = {
    "micro": dict(
        dit_variant="micro", shape=scaling.Shape(depth=2, heads=4, head_dim=16, mlp_ratio=4.0), base_steps=6,
        evals=2, ema=0.0, lr=1e-3, warmup_frac=0.0,
        data=dict(batch_size=4, row_len=128), flops_latent_thw=(3, 8, 8), mesh=dict(data=-1),
        precision="float32",
    ),
    "cpu": dict(
        dit_variant="quick", shape=scaling.Shape(depth=3, heads=3, head_dim=32, mlp_ratio=4.0), base_steps=400,
        evals=6, ema=0.0, lr=1e-3, warmup_frac=0.05,
        data=dict(batch_size=4, row_len=256), flops_latent_thw=(5, 8, 8), mesh=dict(data=-1),
        precision="float32",
    ),
    "pod": dict(
        dit_variant="bench-small", shape=scaling.Shape(depth=12, heads=6, head_dim=64, mlp_ratio=4.0),
        base_steps=20000, evals=20, ema=0.9999, lr=1e-4, warmup_frac=0.02,
        data=dict(batch_size=256, row_len=1280, prefetch=4, read_threads=8), flops_latent_thw=(5, 16, 16),
        mesh=dict(data=1, fsdp=-1), precision="bfloat16",
    ),
}


def _dit_config_module():
    spec = importlib.util.spec_from_file_location("_sora_configs_dit", os.path.join(_HERE, "dit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apply_shape(model: ml_collections.ConfigDict, shape: scaling.Shape) -> None:
    model.width = shape.width
    model.depth = shape.depth
    model.heads = shape.heads
    model.mlp_dim = int(round(shape.mlp_ratio * shape.width))


@functools.lru_cache(maxsize=None)
def _counts(model_json: str, shape: scaling.Shape, latent_thw: tuple) -> tuple[int, int, float]:
    """(DiT params, all params, training FLOPs per example) of the model with this shape."""
    from sora_jax import flops

    model = ml_collections.ConfigDict(json.loads(model_json))
    model.patch = tuple(model.patch)
    apply_shape(model, shape)
    params = flops.dit_params(model)
    return params["dit_params"], params["params"], float(flops.dit_flops(model, latent_thw)["train_flops"])


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    first, _, rest = (arg or "base").partition(",")
    if "|" in (arg or ""):
        raise ValueError(
            f"configs/scaling.py:{arg}: '|' declares a sweep of several points; run it with "
            f"experiments/scaling_sweep.py --sweep={arg!r}, or pick one value per option here"
        )
    multiple = scaling.parse_multiple(first)
    args = config_lib.parse_arg(rest, preset="cpu", data_frac=0.5, size_shift=0, size_step=4.0,
                                lr_width_power=0.0, latents="", vae="", base_steps=0)
    if args.preset not in PRESETS:
        raise ValueError(f"configs/scaling.py: unknown preset {args.preset!r}; known: {sorted(PRESETS)}")
    preset = PRESETS[args.preset]

    config = _dit_config_module().get_config(f"{preset['dit_variant']},latents={args.latents},vae={args.vae}")
    config.data.update(preset["data"])
    config.mesh.update(preset["mesh"])
    config.model.param_dtype = "float32"
    config.model.compute_dtype = preset["precision"]
    config.precision.compute_dtype = preset["precision"]
    latent_thw = tuple(preset["flops_latent_thw"])
    config.flops = ml_collections.ConfigDict(dict(latent_thw=latent_thw))

    # --- the rule -------------------------------------------------------------------------
    base_shape: scaling.Shape = preset["shape"]
    base_steps = int(args.base_steps or preset["base_steps"])
    model_json = config.model.to_json()
    plan = scaling.plan_point(
        base_shape, base_steps, multiple, float(args.data_frac),
        param_count=lambda s: _counts(model_json, s, latent_thw)[0],
        flops_per_step=lambda s: _counts(model_json, s, latent_thw)[2],
        size_shift=int(args.size_shift), size_step=float(args.size_step),
    )
    apply_shape(config.model, plan.shape)
    _, all_params, flops_per_example = _counts(model_json, plan.shape, latent_thw)

    # --- schedule: every cadence is a fraction of this run's own steps --------------------
    steps = plan.steps
    config.train.steps = steps
    config.train.eval_every = max(1, steps // int(preset["evals"]))
    config.train.checkpoint_every = config.train.eval_every
    # About 50 log lines per run, on a divisor of the eval/checkpoint cadence so that a resumed
    # run's first log window starts exactly at its checkpoint (sora_jax.scaling accounting).
    target = max(1, steps // 50)
    config.train.log_every = max(d for d in range(1, config.train.eval_every + 1)
                                 if config.train.eval_every % d == 0 and d <= target)
    config.train.sample_every = 0  # samples only at the end: the side-by-side grid uses the final model
    config.optim.warmup_steps = int(round(preset["warmup_frac"] * steps))
    config.optim.lr = preset["lr"] * (plan.shape.width / base_shape.width) ** float(args.lr_width_power)
    config.optim.ema_decay = preset["ema"]
    config.optim.schedule = "cosine"

    config.scaling = ml_collections.ConfigDict(dict(
        arg=arg or "base", preset=args.preset, multiple=plan.multiple, data_frac=plan.data_frac,
        size_shift=plan.size_shift, size_step=float(args.size_step), base_steps=base_steps,
        base_depth=base_shape.depth, base_heads=base_shape.heads, head_dim=base_shape.head_dim,
        depth=plan.shape.depth, heads=plan.shape.heads, width=plan.shape.width, mlp_dim=config.model.mlp_dim,
        steps=steps, dit_params=plan.params, params=all_params,
        param_factor_target=plan.param_factor_target, param_factor=plan.param_factor,
        flops_factor=plan.flops_factor, token_factor=plan.token_factor,
        # Planning FLOPs: one example of config.flops.latent_thw; the loop counts the real batches.
        train_flops_per_example=flops_per_example,
        train_flops_per_step=flops_per_example * _examples_per_row(config) * config.data.batch_size,
        tokens_per_step=config.data.batch_size * config.data.row_len,
        scan_layers=bool(config.model.scan_layers),
    ))
    return config


def _examples_per_row(config) -> float:
    """Planning estimate of examples per packed row: row_len / tokens of the reference example."""
    t, h, w = config.flops.latent_thw
    pt, ph, pw = config.model.patch
    return max(1.0, config.data.row_len / ((t // pt) * (h // ph) * (w // pw)))
