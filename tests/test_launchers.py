"""The launchers' dry runs print the exact commands (nothing is run or written)."""

import os
import shlex
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments"))
import launch_slurm  # noqa: E402
import launch_tpu  # noqa: E402

TPU_ARGS = ["--name=sora-dit", "--zone=us-east5-b", "--accelerator=v5litepod-16", "--version=v2-alpha-tpuv5-lite",
            "--config=configs/dit.py:B/2", "--workdir=gs://bucket/runs/dit", "--repo=https://example.org/sora_jax.git",
            "--ref=v0.1", "--overrides=--config.optim.lr=3e-4 --config.train.steps=10", "--spot", "--project=proj",
            "--dry_run"]


def test_tpu_dry_run_prints_create_setup_train_delete(capsys):
    assert launch_tpu.main(TPU_ARGS) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()]
    create, setup, train, delete = lines
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "sora-dit", "--zone=us-east5-b",
                      "--project=proj", "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"]
    assert setup[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sora-dit"] and "--worker=all" in setup
    setup_cmd = setup[-1].removeprefix("--command=")
    assert "git clone https://example.org/sora_jax.git sora_jax" in setup_cmd and "git checkout v0.1" in setup_cmd
    assert "pip install -e . 'jax[tpu]>=0.10.2,<0.11'" in setup_cmd
    assert "--worker=all" in train
    train_cmd = shlex.split(train[-1].removeprefix("--command="))
    assert train_cmd[:3] == ["cd", "sora_jax", "&&"]
    assert train_cmd[3:] == ["python3", "-m", "sora_jax.main", "--config=configs/dit.py:B/2",
                             "--workdir=gs://bucket/runs/dit", "--config.optim.lr=3e-4", "--config.train.steps=10"]
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "sora-dit", "--zone=us-east5-b",
                      "--project=proj", "--quiet"]


def test_tpu_steps_subset_and_errors(capsys):
    assert launch_tpu.main(TPU_ARGS + ["--steps=train"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and " ssh " in out[0]
    with pytest.raises(SystemExit):
        launch_tpu.main(TPU_ARGS + ["--steps=train,launch"])


def test_slurm_dry_run_prints_script_and_sbatch(capsys, tmp_path):
    workdir = str(tmp_path / "run")
    assert launch_slurm.main(["--name=dit", "--nodes=4", "--gpus_per_node=8", "--config=configs/dit.py:B/2",
                              f"--workdir={workdir}", "--partition=gpu", "--account=acct", "--time=02:00:00",
                              "--overrides=--config.optim.microbatches=2", "--dry_run"]) == 0
    out = capsys.readouterr().out
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=02:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=acct",
                 "#SBATCH --signal=TERM@120", "#SBATCH --requeue", f"#SBATCH --output={workdir}/slurm-%j.out"]:
        assert line in out.splitlines()
    srun = [line for line in out.splitlines() if line.startswith("srun ")]
    assert srun == ["srun --kill-on-bad-exit=1 --ntasks-per-node=1 python -m sora_jax.main "
                    f"--config=configs/dit.py:B/2 --workdir={workdir} --config.optim.microbatches=2"]
    assert out.strip().splitlines()[-1] == f"sbatch {workdir}/launch_dit.sbatch"
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
