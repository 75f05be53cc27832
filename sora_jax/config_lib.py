"""Shared config pieces. Every file in configs/ builds on `base_config()`.

Configs are Python (`get_config(arg)`, as in big_vision). `arg` is a string such
as "runlocal,variant=S/2" parsed by `parse_arg`. Every stage shares this layout,
so one training loop reads every config:

  stage            "vae" | "dit" | "captioner"
  seed             global seed (model init, data order, diffusion noise)
  data.*           source, resolution policy, batching (see sora_jax/data/)
  model.*          stage-specific architecture
  optim.*          AdamW, schedule, clipping, EMA, microbatches
  train.*          steps and the every-N cadences (log, eval, checkpoint, samples)
  mesh.*           mesh axis sizes; -1 = the rest of the devices
  sharding_rules   logical-axis rules (MaxText style)
  precision.*      parameter and compute dtypes
  remat_policy     named remat policy for transformer blocks
  cpu_dot_fusion   XLA:CPU dot fusion per compiled program (sora_jax/xla_options.py)
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from sora_jax import sharding


def parse_arg(arg: str | None, **defaults):
    """Parses "a=1,b=x,flag" into a ConfigDict, with types taken from the defaults."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        if not _:
            out[key] = True
            continue
        kind = type(defaults[key])
        out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return out


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads "configs/X.py:ARG" the way --config does (file path, then get_config(ARG))."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found (from {spec!r})")
    name = "_sora_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config(arg)")
    return module.get_config(arg or None)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = ""
    c.seed = 0

    c.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",  # "adamw" | "muon" (sora_jax/train/optim.py)
            lr=1e-4,
            warmup_steps=100,
            schedule="cosine",  # "cosine" | "constant"
            min_lr_ratio=0.1,
            b1=0.9,
            b2=0.99,
            eps=1e-8,
            weight_decay=0.0,
            grad_clip=1.0,
            muon_beta=0.95,  # Muon's momentum (Nesterov); b1, b2 are its AdamW side's
            muon_consistent_rms=0.2,  # Muon updates at AdamW's RMS: the same lr works for both
            muon_ns_form="auto",  # Newton-Schulz "direct" | "gram" | "auto": fewer FLOPs per matrix
            muon_gram_restarts=(),  # Gram-form steps that first rebuild X from the product (train/muon.py)
            ema_decay=0.999,  # 0 disables EMA
            microbatches=1,  # gradient accumulation: global batch stays fixed
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            steps=1000,
            log_every=10,
            eval_every=200,
            checkpoint_every=200,
            keep_checkpoints=3,
            sample_every=0,  # 0: only at the end
            num_eval_batches=4,
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1))
    c.sharding_rules = [list(r) for r in sharding.DEFAULT_RULES]
    c.precision = ml_collections.ConfigDict(dict(param_dtype="float32", compute_dtype="float32"))
    c.remat_policy = "none"  # "none" | "minimal" | "save_qkv_proj" | "full"
    # "fused": XLA's default. "individual": each dot its own YNNPACK call (2.3-2.5x faster
    # unmasked attention forward, but no faster DiT training step; 1.5x slower VAE
    # convolutions). No effect off CPU. Measured in docs/dit.md.
    c.cpu_dot_fusion = "fused"
    return c
