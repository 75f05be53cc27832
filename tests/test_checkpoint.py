"""Checkpoints in-process: restoring onto another device count and mesh; corrupt latest falls back."""

import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import helpers_stage
from sora_jax import sharding
from sora_jax.train import checkpoint as ckpt_lib
from sora_jax.train import loop
from sora_jax.train import stages
from sora_jax.train import state as state_lib


def _params(state):
    leaves = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def test_restore_8_device_checkpoint_on_4_devices(tmp_path):
    workdir = str(tmp_path / "w")
    config = helpers_stage.get_config("steps=4,quiet")
    config.mesh.update(data=2, fsdp=2, tensor=2)
    loop.train(config, workdir)

    stage = helpers_stage.RegressionStage(config)
    rules = sharding.rules_from_config(config.sharding_rules)
    restored = {}
    for name, devices, axes in [("8", jax.devices(), dict(data=2, fsdp=2, tensor=2)),
                                ("4", jax.devices()[:4], dict(data=1, fsdp=2, tensor=2))]:
        mesh = sharding.make_mesh(axes, devices)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            setup = state_lib.build_train_setup(stage, config, mesh, rules)
            ckpt = ckpt_lib.Checkpointer(workdir)
            state = ckpt.restore(4, setup.abstract_state)
            ckpt.close()
        kernel = state["params"]["up"]["kernel"][...]
        assert kernel.sharding.mesh.devices.size == len(devices)
        assert len(kernel.addressable_shards) == len(devices)
        restored[name] = _params(state)
        assert int(state["step"]) == 4
    for key, value in restored["8"].items():
        np.testing.assert_array_equal(restored["4"][key], value)

    # restore_model rebuilds the model from the workdir alone, here on the 4-device mesh.
    config2, model = ckpt_lib.restore_model(workdir, mesh=sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2},
                                                                            jax.devices()[:4]))
    assert config2.stage == config.stage
    assert model.up.kernel[...].shape == (helpers_stage.D_IN, helpers_stage.D_HIDDEN)


def test_corrupt_latest_checkpoint_falls_back(tmp_path, capsys):
    workdir = str(tmp_path / "w")
    config = helpers_stage.get_config("steps=4,quiet")
    loop.train(config, workdir)
    state_dir = os.path.join(workdir, "checkpoints", "4", "state")
    damaged = 0
    for root, _, files in os.walk(state_dir):
        for name in files:
            if name != "_METADATA" and not name.startswith("_"):
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(3)
                damaged += 1
    assert damaged
    capsys.readouterr()

    config = helpers_stage.get_config("steps=6,quiet")
    result = loop.train(config, workdir)
    out = capsys.readouterr().out
    assert "checkpoint 4" in out and "corrupt" in out and "falling back to checkpoint 2" in out
    assert "Resumed from checkpoint 2" in out
    assert os.listdir(os.path.join(workdir, "corrupt_checkpoints"))
    assert result.step == 6 and 4 in result.checkpoint_steps  # step 4 was retrained and saved again


def test_keeps_last_k_plus_best_by_eval_loss(tmp_path):
    config = helpers_stage.get_config("")
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=1, keep_best=1)
    for step, eval_loss in [(1, 0.5), (2, 0.1), (3, 0.9), (4, 0.8), (5, None)]:
        ckpt.save(step, {"w": np.full((2,), step, np.float32)}, None, config, eval_loss)
        ckpt.wait()
    assert ckpt.all_steps() == [2, 5]
    assert ckpt.best_step() == 2
    ckpt.close()
    # The eval losses are on disk: a new manager (a restarted run) still knows the best.
    again = ckpt_lib.Checkpointer(str(tmp_path), keep=1, keep_best=1)
    assert again.best_step() == 2
    again.save(6, {"w": np.zeros((2,), np.float32)}, None, config, 0.7)
    again.wait()
    assert again.all_steps() == [2, 6]
    again.close()


def test_a_changed_model_config_is_an_error_not_a_fallback(tmp_path):
    workdir = str(tmp_path / "w")
    checkpointer = ckpt_lib.Checkpointer(workdir)
    config = helpers_stage.get_config("")
    checkpointer.save(2, {"w": np.zeros((3,), np.float32)}, None, config)
    checkpointer.wait()
    target = {"w": jax.ShapeDtypeStruct((5,), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    with pytest.raises(RuntimeError, match="did the model config change"):
        checkpointer.restore_latest(target)
    assert checkpointer.all_steps() == [2]  # nothing moved
    checkpointer.close()


def test_a_changed_model_code_names_the_arrays_that_differ(tmp_path, monkeypatch):
    """A checkpoint from before a code change (a new parameter, a new width) fails with the paths that differ."""
    workdir = str(tmp_path / "w")
    config = helpers_stage.get_config("steps=2,quiet")
    loop.train(config, workdir)
    # restore_model imports the stage as "tests.helpers_stage", another module object than this file's.
    module = sys.modules[stages.get_stage_class(config.stage).__module__]

    original_init = module.MLP.__init__

    def init_with_a_new_parameter(self, rngs):
        original_init(self, rngs)
        self.media_embed = nnx.Param(jax.numpy.zeros((2, module.D_HIDDEN)))

    monkeypatch.setattr(module.MLP, "__init__", init_with_a_new_parameter)
    with pytest.raises(RuntimeError, match="model code") as info:
        ckpt_lib.restore_model(workdir)
    message = str(info.value)
    assert "params/media_embed: in this code's state, not in checkpoint 2" in message
    assert "Retrain with a new --workdir" in message
    assert "up/kernel" not in message.split("Newest error")[0]  # only what differs is listed

    monkeypatch.setattr(module.MLP, "__init__", original_init)
    monkeypatch.setattr(module, "D_HIDDEN", 2 * module.D_HIDDEN)
    with pytest.raises(RuntimeError) as info:
        ckpt_lib.restore_model(workdir)
    message = str(info.value).split("Newest error")[0]
    assert f"params/up/kernel: shape ({helpers_stage.D_IN}, 16) in checkpoint 2, ({helpers_stage.D_IN}, 32) in this code's state" in message
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]  # nothing moved aside
