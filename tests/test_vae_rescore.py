"""experiments/vae_rescore.py and vae_error_breakdown.py: scoring a VAE checkpoint on held-out sets."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import vae_error_breakdown  # noqa: E402
import vae_rescore  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = f"--config={ROOT}/configs/vae.py:micro"

# One xdist worker runs this module, so the fixture's VAE is trained once (~50 s).
pytestmark = pytest.mark.xdist_group("vae_rescore")


@pytest.fixture(scope="module")
def micro_vae(tmp_path_factory):
    """(workdir, the loop's logged eval at step 2) of a 2-step micro VAE run on 16 + 8 toy examples."""
    from sora_jax import config_lib
    from sora_jax.train import loop

    config = config_lib.load_config(os.path.join(ROOT, "configs/vae.py:micro"))
    config.train.steps = config.train.eval_every = config.train.checkpoint_every = 2
    config.train.log_every = 2
    config.train.sample_every = 2  # on_eval (the loop's scores, recon/step_2.json) runs with the samples
    config.vae.stats_batches = 1
    config.data.num_train, config.data.num_eval = 16, 8
    config.data.prefetch, config.data.read_threads = 0, 1
    workdir = str(tmp_path_factory.mktemp("vae"))
    loop.train(config, workdir)
    with open(os.path.join(workdir, "recon", "step_2.json")) as f:
        return workdir, json.load(f)


def test_rescore_with_the_training_config_reproduces_the_loops_eval(micro_vae):
    workdir, logged = micro_vae
    same = vae_rescore.main([f"--workdir={workdir}", SPEC, "--num_train=16", "--num_eval=8"])
    assert same["trained_num_train"] == 16 and same["scored_num_train"] == 16
    assert abs(same["eval"]["video_psnr"] - logged["recon/video_psnr"]) < 2e-3

    # Another num_train scores other clips (the eval set follows the training indices).
    moved = vae_rescore.main([f"--workdir={workdir}", SPEC, "--num_train=64", "--num_eval=8"])
    assert moved["scored_num_train"] == 64
    assert abs(moved["eval"]["video_psnr"] - same["eval"]["video_psnr"]) > 1e-3


def test_edge_mask_marks_both_sides_of_a_step_and_nothing_else():
    video = np.zeros((1, 2, 6, 8, 3), np.float32)
    video[..., 5:, :] = 1.0  # a vertical step between columns 4 and 5
    video[:, 1, 2, 1, 0] = 0.03  # below the threshold: not an edge
    mask = vae_error_breakdown.edge_mask(video, 0.05)
    expected = np.zeros((1, 2, 6, 8), bool)
    expected[..., 4:6] = True
    np.testing.assert_array_equal(mask, expected)


def test_breakdown_covers_every_eval_example_and_agrees_with_the_stage(micro_vae):
    workdir, logged = micro_vae
    out = vae_error_breakdown.main([f"--workdir={workdir}", SPEC, "--num_train=16", "--num_eval=8"])
    assert out["num_eval"] == 8
    # micro's eval batches hold the same 8 clips each, so the stage's mean is the mean over them.
    assert abs(out["all"]["psnr"] - logged["recon/video_psnr"]) < 2e-3
    for key in ("by_kind", "by_background", "by_pan", "by_objects"):
        assert sum(g["clips"] for g in out[key].values()) == 8, key
    e = out["edges"]
    assert 0 < e["pixel_share"] < 1 and 0 < e["error_share"] < 1
    # Removing the edge pixels' error can only raise the pooled PSNR.
    assert e["pooled_psnr_if_edges_exact"] > out["all"]["pooled_psnr"]


def test_rescore_refuses_ema_for_a_run_without_it(micro_vae):
    workdir, _ = micro_vae  # micro trains with optim.ema_decay = 0
    with pytest.raises(ValueError, match="kept no EMA"):
        vae_rescore.main([f"--workdir={workdir}", SPEC, "--ema"])
