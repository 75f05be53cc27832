"""Encode a data set once with a trained VAE, so the DiT trains on latents (never pixels).

  python -m sora_jax.cache_latents --vae_workdir=W/vae --out=W/latents [--config=configs/X.py:ARG]
      [--num_train=N] [--num_eval=N] [--batch_size=N]

By default the pixels come from the VAE run's own `config.data` (same source,
resolution policy and frame count it was trained on); `--config` takes the data
section of another config instead, e.g. to cache a user's imported videos with
a VAE trained on the toy world. Latents are normalised with the VAE's
latent_stats.json. Examples of one (T, H, W) are encoded `--batch_size` at a time,
so each shape compiles once (sora_jax/data/latent_cache.py: batching, output layout
and record format). The default batch size is 4 on CPU, where the encoder's cost
grows with every row, so the repeats that fill partial buckets are not free
(measured: 4 beat 8 by ~9% on 2 cores), and 8 on accelerators.
"""

from __future__ import annotations

import json
import os

from absl import app, flags


def cache(vae_workdir: str, out_dir: str, data_config=None, *, num_train: int = 0, num_eval: int = 0,
          batch_size: int = 0, progress: bool = True) -> dict:
    """Caches the train and eval splits; returns {split: meta}. Skips splits already cached.

    `batch_size` 0 = 4 on CPU, 8 on an accelerator (module doc).
    """
    import jax

    from sora_jax import jsonio
    from sora_jax.data import latent_cache
    from sora_jax.models.vae_api import VAEHandle
    from sora_jax.train.checkpoint import read_config

    if data_config is None:
        data_config = read_config(vae_workdir).data
    vae = VAEHandle.from_workdir(vae_workdir)
    batch_size = batch_size or (4 if jax.default_backend() == "cpu" else 8)
    done = {}
    for split, n in (("train", num_train), ("eval", num_eval)):
        meta_path = os.path.join(out_dir, split, "meta.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            if meta.get("vae_workdir") == os.path.abspath(vae_workdir) and meta.get("requested") == n:
                done[split] = meta  # already cached with this VAE: resuming a pipeline never re-encodes
                continue
        meta = latent_cache.cache_latents(data_config, vae.encode, out_dir, split=split, num_examples=n,
                                          batch_size=batch_size, progress=progress)
        meta.update(vae_workdir=os.path.abspath(vae_workdir), requested=n)
        jsonio.write_json(meta_path, meta)  # atomic: resume trusts this file
        done[split] = meta
    return done


_VAE = flags.DEFINE_string("vae_workdir", None, "Workdir of a trained VAE (stage 'vae').")
_OUT = flags.DEFINE_string("out", None, "Output directory for the latent shards.")
_CONFIG = flags.DEFINE_string("config", None, "Optional config file[:arg] whose config.data gives the pixels.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 0, "Train examples to cache (0 = all of the split).")
_NUM_EVAL = flags.DEFINE_integer("num_eval", 0, "Eval examples to cache (0 = all of the split).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Clips of one shape per encoder call (one compile per shape); "
                                   "0 = 4 on CPU, 8 on an accelerator.")


def main(argv):
    del argv
    data_config = None
    if _CONFIG.value:
        from sora_jax import config_lib

        data_config = config_lib.load_config(_CONFIG.value).data
    metas = cache(_VAE.value, _OUT.value, data_config, num_train=_NUM_TRAIN.value, num_eval=_NUM_EVAL.value,
                  batch_size=_BATCH_SIZE.value)
    for split, meta in metas.items():
        print(f"[sora_jax] {split}: {meta['num_examples']} latents in {os.path.join(_OUT.value, split)}; "
              f"shapes {meta['latent_shapes']}; skipped {sum(meta['skipped'].values())}; "
              f"{meta.get('encode_calls', '?')} encoder calls")


if __name__ == "__main__":
    from sora_jax import hugepages

    hugepages.reexec_with_hugepages()  # before JAX starts: see sora_jax/hugepages.py
    flags.mark_flags_as_required(["vae_workdir", "out"])
    app.run(main)
