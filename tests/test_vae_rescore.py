"""experiments/vae_rescore.py: scoring a VAE checkpoint on another config's held-out sets."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import vae_rescore  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rescore_with_the_training_config_reproduces_the_loops_eval(tmp_path):
    from sora_jax import config_lib
    from sora_jax.train import loop

    config = config_lib.load_config(os.path.join(ROOT, "configs/vae.py:micro"))
    config.train.steps = config.train.eval_every = config.train.checkpoint_every = 2
    config.train.log_every = 2
    config.train.sample_every = 2  # on_eval (the loop's scores, recon/step_2.json) runs with the samples
    config.vae.stats_batches = 1
    config.data.num_train, config.data.num_eval = 16, 8
    config.data.prefetch, config.data.read_threads = 0, 1
    workdir = str(tmp_path / "vae")
    loop.train(config, workdir)
    with open(os.path.join(workdir, "recon", "step_2.json")) as f:
        logged = json.load(f)

    spec = f"--config={ROOT}/configs/vae.py:micro"
    same = vae_rescore.main([f"--workdir={workdir}", spec, "--num_train=16", "--num_eval=8"])
    assert same["trained_num_train"] == 16 and same["scored_num_train"] == 16
    assert abs(same["eval"]["video_psnr"] - logged["recon/video_psnr"]) < 2e-3

    # Another num_train scores other clips (the eval set follows the training indices).
    moved = vae_rescore.main([f"--workdir={workdir}", spec, "--num_train=64", "--num_eval=8"])
    assert moved["scored_num_train"] == 64
    assert abs(moved["eval"]["video_psnr"] - same["eval"]["video_psnr"]) > 1e-3
