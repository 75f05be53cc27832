"""The loop's guards and bookkeeping: NaN stop, preflight refusal, schedules, registry, peaks, CLI."""

import subprocess

import jax.numpy as jnp
import pytest

import helpers_stage
from sora_jax.train import loop, metrics, optim, preflight, stages


def test_nan_stops_cleanly_without_a_poisoned_checkpoint(tmp_path):
    config = helpers_stage.get_config("steps=6,nan_at=3,quiet")
    with pytest.raises(loop.NonFiniteError) as err:
        loop.train(config, str(tmp_path))
    message = str(err.value)
    assert "stage 'regression'" in message and "at step 3" in message and "train/loss" in message
    assert "Last good checkpoint: step 2" in message
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == ["2"]


def test_preflight_refuses_a_run_that_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "device_memory", lambda: (1024, "a pretend 1 KiB device", 1))
    with pytest.raises(preflight.PreflightError) as err:
        loop.train(helpers_stage.get_config("steps=2,quiet"), str(tmp_path))
    message = str(err.value)
    assert "will not fit" in message and "microbatches" in message and "fsdp" in message and "remat" in message
    assert "parameters: 312" in message


def test_batch_split_errors_are_clear():
    with pytest.raises(preflight.PreflightError, match="not divisible by config.optim.microbatches=3"):
        preflight.check_batch_split(16, 3, 4)
    with pytest.raises(preflight.PreflightError, match="4 batch shards"):
        preflight.check_batch_split(16, 8, 4)


def test_decay_mask_skips_norms_biases_embeddings():
    params = {"up": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "norm": {"scale": jnp.ones(3)},
              "tok_embed": {"embedding": jnp.ones((5, 3))}, "attn": {"qkv": {"kernel": jnp.ones((3, 9))}}}
    mask = optim.default_decay_mask(params)
    assert mask["up"]["kernel"] and mask["attn"]["qkv"]["kernel"]
    assert not mask["up"]["bias"] and not mask["norm"]["scale"] and not mask["tok_embed"]["embedding"]


def test_schedules():
    config = helpers_stage.get_config("")
    config.optim.update(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    cosine = optim.learning_rate_schedule(config.optim, 110)
    assert float(cosine(0)) == 0.0 and abs(float(cosine(10)) - 1.0) < 1e-6 and abs(float(cosine(110)) - 0.1) < 1e-6
    config.optim.schedule = "constant"
    constant = optim.learning_rate_schedule(config.optim, 110)
    assert abs(float(constant(5)) - 0.5) < 1e-6 and float(constant(100)) == 1.0
    config.optim.schedule = "linear"
    with pytest.raises(ValueError, match="schedule"):
        optim.learning_rate_schedule(config.optim, 10)


def test_registry():
    assert stages.get_stage_class("tests.helpers_stage:RegressionStage").name == "regression"
    with pytest.raises(ValueError, match="unknown config.stage 'nope'"):
        stages.get_stage_class("nope")
    with pytest.raises(ValueError, match="not a Stage subclass"):
        stages.get_stage_class("tests.helpers_stage:MLP")


def test_peak_table():
    class Fake:
        def __init__(self, kind, platform="tpu"):
            self.device_kind, self.platform = kind, platform

    assert metrics.peak_flops_per_device(Fake("TPU v5 lite"))[0] == 197e12
    assert metrics.peak_flops_per_device(Fake("TPU v5p"))[0] == 459e12
    assert metrics.peak_flops_per_device(Fake("TPU v4"))[0] == 275e12
    assert metrics.peak_flops_per_device(Fake("TPU v6 lite"))[0] == 918e12
    assert metrics.peak_flops_per_device(Fake("NVIDIA H100 80GB HBM3", "gpu"))[0] == 989e12
    assert metrics.peak_flops_per_device(Fake("NVIDIA H200", "gpu"))[0] == 989e12
    assert metrics.peak_flops_per_device(Fake("NVIDIA A100-SXM4-80GB", "gpu"))[0] == 312e12
    perf = metrics.throughput(10, 2.0, 100, 1e12, 4, 1e12)
    assert perf["perf/steps_per_s"] == 5 and perf["perf/tokens_per_s"] == 500
    assert perf["perf/tflops_per_device"] == 1.25 and perf["perf/mfu"] == 1.25


def test_cli_rejects_a_misspelt_override(tmp_path):
    out = subprocess.run(helpers_stage.cli_command(str(tmp_path), "", ("--config.optim.lrr=1",)),
                         cwd=helpers_stage.REPO, env=helpers_stage.cli_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "lrr" in out.stderr
    assert not (tmp_path / "config.json").exists()
