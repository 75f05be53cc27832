"""Scores a trained VAE on another config's held-out sets, with the vae stage's own metrics.

  python experiments/vae_rescore.py --workdir=W [--config=configs/vae.py:quick] [--num_train=N] [--step=S]

Why: the toy world's eval examples are the indices right after the training ones
([num_train, num_train + num_eval)), so runs with different `data.num_train` score
different held-out clips. This scores the checkpoint in W (its raw parameters, or EMA
with --ema) on the eval batches and native-size eval of --config, so runs compare on
the same clips. Prints one JSON object with the stage's keys ("eval", "native").
"""

from __future__ import annotations

import argparse
import json


def load_scorer(workdir: str, config_spec: str, *, step=None, ema=False, num_train=None, num_eval=None):
    """(VAEStage of config_spec with the checkpoint's architecture, the model, the trained config).

    The data and eval settings come from config_spec (num_train / num_eval override its
    data fields), the architecture from the checkpoint in workdir. The model runs the "xla"
    convs: one compile per eval shape, as the stage's own evals."""
    from sora_jax import config_lib
    from sora_jax.models import vae as vae_lib
    from sora_jax.stages import vae as vae_stage
    from sora_jax.train.checkpoint import restore_model

    config = config_lib.load_config(config_spec)
    for field, value in (("num_train", num_train), ("num_eval", num_eval)):
        if value is not None:
            config.data[field] = value
    trained_config, model = restore_model(workdir, step=step, use_ema=ema)
    if ema and not float(trained_config.optim.get("ema_decay", 0.0)) > 0:
        # restore_model falls back to the raw parameters; a score labelled EMA must not.
        raise ValueError(f"{workdir}: --ema, but this run kept no EMA (optim.ema_decay="
                         f"{trained_config.optim.get('ema_decay', 0.0)})")
    for name, c in ((config_spec, config), (workdir, trained_config)):
        if c.stage != "vae":
            raise ValueError(f"{name}: stage is {c.stage!r}, not 'vae'")
    config.model = trained_config.model
    return vae_stage.VAEStage(config), vae_lib.with_conv_impl(model, "xla"), trained_config


def add_scoring_args(p: argparse.ArgumentParser) -> None:
    """The checkpoint and eval-set flags of the VAE scoring scripts."""
    p.add_argument("--workdir", required=True, help="a vae stage's workdir (its checkpoint is scored)")
    p.add_argument("--config", default="configs/vae.py:quick", help="whose held-out sets score it")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--ema", action="store_true", help="score the EMA parameters (if the run kept them)")
    p.add_argument("--num_train", type=int, default=None, help="override --config's data.num_train (moves the eval set)")
    p.add_argument("--num_eval", type=int, default=None, help="override --config's data.num_eval")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scoring_args(p)
    args = p.parse_args(argv)

    stage, model, trained_config = load_scorer(args.workdir, args.config, step=args.step, ema=args.ema,
                                               num_train=args.num_train, num_eval=args.num_eval)
    config = stage.config
    out = {"workdir": args.workdir, "config": args.config,
           "trained_num_train": int(trained_config.data.num_train), "scored_num_train": int(config.data.num_train),
           **stage.held_out_summaries(model)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
