"""The micro sweep end to end through the real loop (`python -m sora_jax.main`): slow (minutes).

  python -m pytest -q -m slow tests/test_scaling_e2e.py

A tiny latent cache in the latent_cache record format (each caption colour sets
the latent mean, so there is something to learn) stands in for VAE latents; the
sweep, the loop, the accounting, the fit and the plots are the real ones.
"""

import json
import os
import sys

import numpy as np
import pytest

import helpers_stage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import plot_scaling  # noqa: E402
import scaling_sweep  # noqa: E402

from sora_jax import scaling  # noqa: E402
from sora_jax.data import sources  # noqa: E402

SHAPES = [(3, 8, 8), (1, 8, 8), (3, 8, 4), (2, 8, 8)]
COLOURS = ["red", "green", "blue", "white"]


def write_latents(directory, split, n, seed):
    os.makedirs(os.path.join(directory, split), exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = sources.ShardWriter(os.path.join(directory, split), 256, "latents")
    for i in range(n):
        k = int(rng.integers(len(COLOURS)))
        t, h, w = SHAPES[int(rng.integers(len(SHAPES)))]
        mean = np.zeros(16, np.float32)
        mean[k * 4:(k + 1) * 4] = 1.5
        latent = mean + 0.3 * rng.normal(size=(t, h, w, 16)).astype(np.float32)
        writer.write({"latent": latent.astype(np.float16), "caption": f"a {COLOURS[k]} thing",
                      "short_caption": COLOURS[k], "index": i, "pixel_shape": [1 + 4 * (t - 1), 8 * h, 8 * w]})
    writer.close()


@pytest.mark.slow
def test_micro_sweep_through_the_real_loop(tmp_path, monkeypatch):
    latents = str(tmp_path / "latents")
    write_latents(latents, "train", 128, 0)
    write_latents(latents, "eval", 16, 1)
    # One CPU device per run, not the 8 fake ones of conftest; its LLVM level (compile time only).
    monkeypatch.setenv("XLA_FLAGS", helpers_stage.backend_level_flag())
    root = str(tmp_path / "sweep")
    spec = f"base|4x|16x,preset=micro,latents={latents}"
    rows = scaling_sweep.run_sweep(spec, root, xla_check=True)
    assert [r["multiple"] for r in rows] == [1.0, 4.0, 16.0]
    for row in rows:
        assert row["steps"] == row["planned_steps"] and row["num_devices"] == 1
        assert row["flops_xla_scanned"] and row["device_seconds"] > 0 and row["tokens"] > 0
        assert row["xla_over_analytic"] == pytest.approx(1.0, abs=0.1)  # XLA vs sora_jax.flops, unrolled forward
        assert np.isfinite(row["final_eval_loss"]) and "eval_loss_t0.1" in row
    flops = [r["flops"] for r in rows]
    assert flops[1] / flops[0] == pytest.approx(4.0, rel=0.25)  # the loop's first batch, vs the planned mean
    assert flops[2] / flops[0] == pytest.approx(16.0, rel=0.25)
    assert rows[2]["final_eval_loss"] < rows[0]["final_eval_loss"]

    rerun = scaling_sweep.run_sweep(spec, root)  # everything done: nothing retrained
    assert [r["final_eval_loss"] for r in rerun] == [r["final_eval_loss"] for r in rows]
    written = plot_scaling.write_all(scaling.read_results(root), os.path.join(root, "plots"), num_bootstrap=50)
    assert os.path.exists(written["loss_vs_compute"][0])
    fit = json.load(open(written["fit"][0]))
    assert fit["loss_vs_compute"]["fit"]["n_points"] == 3
