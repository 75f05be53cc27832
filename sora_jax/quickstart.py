"""The whole pipeline on the toy world, on CPU: the README's first command.

  python -m sora_jax.quickstart --workdir=workdirs/quickstart [--micro]

  1. stage "vae": train the causal video VAE            -> WORKDIR/vae
  2. encode the toy world once with it                    -> WORKDIR/latents
  3. stage "dit": train the diffusion transformer         -> WORKDIR/dit
  4. generate sample videos with their prompts            -> WORKDIR/samples

Every step goes through the same code a researcher uses by hand (the one
training loop, the latent cache, the sampler), so this is also an end-to-end
test. Re-running resumes: finished stages are skipped, interrupted ones continue
from their last checkpoint. `--micro` is the CI-sized smoke run of the same path.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

_HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(_HERE), "configs")

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/quickstart", "Where the three stages and the samples go.")
_MICRO = flags.DEFINE_bool("micro", False, "A tiny smoke run of the same pipeline (CI).")

# Prompts rendered at the end: toy-world scenes the model has seen the words of.
PROMPTS = (
    "a red circle bouncing",
    "a blue square moving to the right",
    "a yellow triangle falling",
    "a green circle passing behind a grey bar",
)


def _say(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


def _stage_done(workdir: str, steps: int) -> bool:
    from sora_jax.train.checkpoint import Checkpointer

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return False
    ckpt = Checkpointer(workdir)
    try:
        return (ckpt.latest_step() or 0) >= steps
    finally:
        ckpt.close()


def train_stage(name: str, arg: str, workdir: str) -> float:
    from sora_jax import config_lib
    from sora_jax.train import loop

    config = config_lib.load_config(os.path.join(CONFIGS, f"quickstart.py:{arg}"))
    if _stage_done(workdir, config.train.steps):
        _say(f"{name}: already trained in {workdir}, skipping")
        return 0.0
    _say(f"{name}: training {config.train.steps} steps -> {workdir}")
    start = time.time()
    result = loop.train(config, workdir)
    if result.status != "done":
        raise SystemExit(f"[quickstart] {name} stopped: {result.status} at step {result.step}")
    return time.time() - start


def run(workdir: str, micro: bool) -> dict:
    from sora_jax import cache_latents, config_lib

    opt = ",micro" if micro else ""
    vae_dir, lat_dir, dit_dir = (os.path.join(workdir, d) for d in ("vae", "latents", "dit"))
    timings = {}
    timings["vae_s"] = train_stage("1/4 VAE", f"vae{opt}", vae_dir)

    _say(f"2/4 caching latents -> {lat_dir}")
    start = time.time()
    # Pixels for the cache come from the DiT's data config: the full native-size mix.
    dit_data = config_lib.load_config(os.path.join(CONFIGS, f"quickstart.py:dit{opt}")).data
    metas = cache_latents.cache(vae_dir, lat_dir, dit_data, num_train=dit_data.num_train,
                                num_eval=dit_data.num_eval)
    timings["cache_s"] = time.time() - start
    _say(f"cached {metas['train']['num_examples']} train / {metas['eval']['num_examples']} eval latents")

    timings["dit_s"] = train_stage("3/4 DiT", f"dit{opt},latents={lat_dir},vae={vae_dir}", dit_dir)

    _say("4/4 sampling")
    start = time.time()
    outputs = write_samples(dit_dir, os.path.join(workdir, "samples"), micro)
    timings["sample_s"] = time.time() - start
    with open(os.path.join(workdir, "quickstart.json"), "w") as f:
        json.dump({"timings": timings, "samples": outputs}, f, indent=1)
    return {"timings": timings, "samples": outputs}


def write_samples(dit_dir: str, out_dir: str, micro: bool) -> list[str]:
    """Short prompts, expanded into the long caption style the DiT was trained on (the
    report's prompt expansion, offline backend), rendered text-to-video; then one
    image-to-video from the first sample's first frame and one seamless loop."""
    from sora_jax.generate import Generator

    gen = Generator.from_workdir(dit_dir)
    steps = 4 if micro else None  # None: the sampler defaults saved in the DiT config
    prompts = PROMPTS[:1] if micro else PROMPTS
    written = []
    first = None
    for i, prompt in enumerate(prompts):
        result = gen.text_to_video(prompt, seed=i, steps=steps, expand_with="toy")
        written += result.save(out_dir, f"t2v_{i}")
        first = first if first is not None else result
    if not micro:
        written += gen.image_to_video(first.video[0], PROMPTS[0], seed=10, steps=steps,
                                      expand_with="toy").save(out_dir, "i2v_0")
        written += gen.loop(PROMPTS[1], seed=11, steps=steps, expand_with="toy").save(out_dir, "loop_0")
    return written


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    start = time.time()
    summary = run(_WORKDIR.value, _MICRO.value)
    total = time.time() - start
    _say(f"done in {total / 60:.1f} min: " + ", ".join(f"{k}={v:.0f}s" for k, v in summary["timings"].items()))
    _say(f"samples: {os.path.join(_WORKDIR.value, 'samples')}")


if __name__ == "__main__":
    from sora_jax import hugepages

    hugepages.reexec_with_hugepages()  # before JAX starts: see sora_jax/hugepages.py
    app.run(main)
