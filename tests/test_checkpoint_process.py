"""Checkpoints across process deaths: exact resume after SIGKILL, SIGTERM saves and exits cleanly."""

import os
import signal
import subprocess
import time

import numpy as np

import helpers_stage
from sora_jax.train import loop

# Eval and samples off: these tests are about the train state and the data iterator.
QUIET = ("--config.train.eval_every=-1", "--config.train.sample_every=-1")


def _wait_for(predicate, proc, timeout=120):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


def test_sigkill_then_restart_resumes_exactly(tmp_path):
    reference = str(tmp_path / "reference")
    config = helpers_stage.get_config("steps=8,quiet")
    loop.train(config, reference)

    workdir = str(tmp_path / "killed")
    cmd = helpers_stage.cli_command(workdir, "steps=8,sleep=0.4", QUIET)
    proc = subprocess.Popen(cmd, cwd=helpers_stage.REPO, env=helpers_stage.cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ckpt4 = os.path.join(workdir, "checkpoints", "4", "commit_success.txt")
    _wait_for(lambda: os.path.exists(ckpt4), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(helpers_stage.train_losses(workdir)) < 8, "the run finished before it could be killed"

    out = subprocess.run(helpers_stage.cli_command(workdir, "steps=8", QUIET), cwd=helpers_stage.REPO,
                         env=helpers_stage.cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Resumed regression from" in out.stdout
    want, got = helpers_stage.train_losses(reference), helpers_stage.train_losses(workdir)
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)], rtol=1e-6, atol=1e-7)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path / "w")
    cmd = helpers_stage.cli_command(workdir, "steps=200,sleep=0.3", ("--config.train.checkpoint_every=1000", *QUIET))
    proc = subprocess.Popen(cmd, cwd=helpers_stage.REPO, env=helpers_stage.cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    _wait_for(lambda: os.path.exists(metrics) and len(helpers_stage.train_losses(workdir)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "SIGTERM: saved checkpoint" in output
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert len(steps) == 1 and 2 <= steps[0] < 200
    assert os.path.exists(os.path.join(workdir, "checkpoints", str(steps[0]), "commit_success.txt"))


