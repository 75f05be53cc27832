"""One tiny trained checkpoint for every sampling test: a VAE and a DiT through the real loop.

`tiny_workdirs` (session scope) trains the micro VAE for 2 steps, caches a few
toy-world latents with it (sora_jax.cache_latents), and trains a depth-1 micro DiT
for 2 steps on them with the task mix on, all through `sora_jax.train.loop.train`,
so the checkpoints, configs and latent stats are the real thing. It is not a good
model; the sampling tests check conditioning, determinism and I/O, which hold for
any weights. The DiT is trained on 5-frame 32x32 clips: 2 latent frames of 4x4.

`generator` loads it once with sora_jax.generate.Generator.from_workdir.

Import both names into a test module:  from tests.sampling_fixtures import tiny_workdirs, generator
"""

from __future__ import annotations

import os

import numpy as np
import pytest

SIZE = (32, 32)  # pixels; latent 4x4, tokens 2x2 per frame with patch (1, 2, 2)


def _train(config, workdir):
    from sora_jax.train import loop

    result = loop.train(config, workdir)
    assert result.status == "done", result


def build_tiny_workdirs(root: str) -> dict:
    """Trains the tiny VAE and DiT under `root`; returns {"vae", "latents", "dit"} paths."""
    from sora_jax import cache_latents, config_lib


    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    vae_dir, lat_dir, dit_dir = (os.path.join(root, d) for d in ("vae", "latents", "dit"))

    vae = config_lib.load_config(os.path.join(here, "configs/vae.py:micro"))
    vae.train.steps = 2
    vae.train.eval_every = -1  # no eval: one compile fewer
    vae.train.checkpoint_every = 2
    vae.train.log_every = 2
    vae.train.num_eval_batches = 1
    vae.vae.stats_batches = 1
    vae.train.sample_every = -1  # no reconstruction videos
    vae.data.num_train, vae.data.num_eval = 16, 8
    vae.data.prefetch, vae.data.read_threads = 0, 1
    _train(vae, vae_dir)

    cache_latents.cache(vae_dir, lat_dir, num_train=8, num_eval=8, progress=False)

    dit = config_lib.load_config(os.path.join(here, f"configs/dit.py:micro,latents={lat_dir},vae={vae_dir}"))
    dit.model.depth = 1
    dit.data.frames, dit.data.pixels = 5, SIZE[0] * SIZE[1]  # what the cache holds: the sampler's defaults
    dit.data.row_len, dit.data.batch_size, dit.data.max_slots = 32, 8, 4
    dit.data.prefetch, dit.data.read_threads = 0, 1
    dit.train.steps = 2
    dit.train.eval_every = -1
    dit.train.checkpoint_every = 2
    dit.train.sample_every = -1
    dit.train.num_eval_batches = 1
    dit.train.progress = False
    dit.train.async_checkpoints = False
    dit.samples.steps = 2
    dit.samples.guidance = 2.0
    _train(dit, dit_dir)
    return {"vae": vae_dir, "latents": lat_dir, "dit": dit_dir}


@pytest.fixture(scope="session")
def tiny_workdirs(tmp_path_factory):
    return build_tiny_workdirs(str(tmp_path_factory.mktemp("sampling")))


@pytest.fixture(scope="session")
def generator(tiny_workdirs):
    from sora_jax.generate import Generator

    return Generator.from_workdir(tiny_workdirs["dit"])


def toy_clip(frames: int, size=SIZE, seed: int = 0) -> np.ndarray:
    """A small uint8 video: a coloured square moving over a plain background."""
    rng = np.random.default_rng(seed)
    h, w = size
    bg = rng.integers(0, 256, 3)
    fg = 255 - bg
    video = np.empty((frames, h, w, 3), np.uint8)
    video[:] = bg
    for t in range(frames):
        x = (2 * t + int(rng.integers(0, 4))) % (w - 8)
        video[t, h // 3: h // 3 + 8, x: x + 8] = fg
    return video
