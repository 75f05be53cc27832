"""The sweep runner: resume (finished points skipped, interrupted ones continued), accounting, plots.

The training command is a fake: a small script that behaves like the loop on
disk (metrics.jsonl lines with the loop's keys, checkpoints/<step> directories,
resume from the newest one, a preflight line) so the runner is tested in seconds.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import plot_scaling  # noqa: E402
import scaling_sweep  # noqa: E402

from sora_jax import scaling  # noqa: E402

FAKE_TRAIN = textwrap.dedent('''
    """Fake loop: python fake_train.py WORKDIR STEPS LOSS_SCALE LOG [CRASH_AT]."""
    import json, os, sys, time
    workdir, steps, scale, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    crash_at = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    ckpt = os.path.join(workdir, "checkpoints")
    os.makedirs(ckpt, exist_ok=True)
    done = [int(d) for d in os.listdir(ckpt) if d.isdigit()]
    start = max(done) if done else 0
    with open(log, "a") as f:
        f.write(json.dumps({"workdir": os.path.basename(workdir), "start": start}) + "\\n")
    print("[preflight] stage=dit devices=2 (cpu) processes=1")
    print("[preflight] FLOPs/step: 1.000e+09 analytic, 5.100e+08 from XLA cost analysis (per device)")
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as m:
        for step in range(start + 1, steps + 1):
            if step % 2 == 0:  # log every 2 steps: 4 steps/s, 100 tokens/step, 1e9 FLOPs/step on 2 devices
                m.write(json.dumps({"step": step, "time": time.time(), "train/loss": 1.0, "perf/steps_per_s": 4.0,
                                    "perf/tokens_per_s": 400.0, "perf/tflops_per_device": 4.0 * 1e9 / 2 / 1e12}) + "\\n")
            if step % 4 == 0 or step == steps:
                loss = scale * (1.0 + 1.0 / step)
                m.write(json.dumps({"step": step, "time": time.time(), "eval/loss": loss,
                                    "eval/loss_t0.10": 2 * loss, "eval/loss_t0.90": loss / 2,
                                    "eval_ema/loss": loss * 1.1}) + "\\n")
                os.makedirs(os.path.join(ckpt, str(step)))
            m.flush()
            if crash_at and step == crash_at:
                sys.exit(7)
''')

STEPS = {1.0: 8, 4.0: 16, 16.0: 32}


def fake_plan(arg):
    multiple = scaling.parse_multiple(arg.split(",")[0])
    return dict(multiple=multiple, size_shift=0, data_frac=0.5, depth=2, width=64, heads=4,
                params=int(1e5 * multiple**0.5), dit_params=int(1e5 * multiple**0.5), steps=STEPS[multiple],
                train_flops_per_step=1e9 * multiple / (STEPS[multiple] / 8), tokens_per_step=100,
                scan_layers=multiple != 4.0)


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    log = tmp_path / "invocations.jsonl"
    crash = {}

    def command(arg, workdir):
        plan = fake_plan(arg)
        extra = [str(crash.pop(arg))] if arg in crash else []
        scale = 1.0 / plan["multiple"] ** 0.1  # loss falls with compute
        return [sys.executable, str(script), workdir, str(plan["steps"]), str(scale), str(log), *extra]

    def invocations():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return command, crash, invocations


def test_interrupted_sweep_resumes_without_redoing_finished_points(tmp_path, fake):
    command, crash, invocations = fake
    root = str(tmp_path / "sweep")
    spec = "base|4x|16x,preset=micro"
    crash["4x,preset=micro"] = 6  # the 4x point dies after step 6 (checkpoint at 4)
    with pytest.raises(scaling_sweep.SweepError, match="4x,preset=micro.*exit code 7"):
        scaling_sweep.run_sweep(spec, root, command_fn=command, plan_fn=fake_plan, log=lambda m: None)
    assert scaling.is_done(os.path.join(root, "base_presetmicro"))
    assert not scaling.is_done(os.path.join(root, "4x_presetmicro"))

    rows = scaling_sweep.run_sweep(spec, root, command_fn=command, plan_fn=fake_plan, log=lambda m: None)
    calls = [(c["workdir"], c["start"]) for c in invocations()]
    assert calls == [("base_presetmicro", 0), ("4x_presetmicro", 0), ("4x_presetmicro", 4), ("16x_presetmicro", 0)]
    assert [r["point"] for r in rows] == ["base_presetmicro", "4x_presetmicro", "16x_presetmicro"]

    # A third run redoes nothing and gives the same results.
    again = scaling_sweep.run_sweep(spec, root, command_fn=command, plan_fn=fake_plan, log=lambda m: None)
    assert len(invocations()) == 4
    assert [r["final_eval_loss"] for r in again] == [r["final_eval_loss"] for r in rows]

    results = scaling.read_results(root)
    by_name = {r["point"]: r for r in results}
    resumed = by_name["4x_presetmicro"]
    # Accounting: FLOPs from the loop's logged perf (1e9/step), steps of the final model only;
    # tokens from perf windows of the kept lines; device-seconds count the redone steps 5-6 too.
    assert resumed["steps"] == 16 and resumed["flops"] == pytest.approx(16 * 1e9)
    assert resumed["flops_xla"] == pytest.approx(16 * 5.1e8 * 2)  # layers unrolled in this (fake) point
    # With scanned layers XLA counts one layer only: the number is kept aside, not used as a check.
    assert by_name["16x_presetmicro"]["flops_xla"] is None and by_name["16x_presetmicro"]["flops_xla_scanned"] > 0
    assert resumed["num_devices"] == 2
    assert resumed["tokens"] == pytest.approx(16 * 100)
    assert resumed["device_seconds"] == pytest.approx((16 + 2) / 4.0 * 2)
    assert resumed["final_eval_loss"] == pytest.approx(4.0**-0.1 * (1 + 1 / 16))
    assert resumed["eval_loss_t0.1"] == pytest.approx(2 * resumed["final_eval_loss"])
    assert resumed["eval_ema_loss"] == pytest.approx(1.1 * resumed["final_eval_loss"])
    assert [h["step"] for h in resumed["eval_history"]] == [4, 8, 12, 16]
    assert resumed["wall_seconds"] > 0
    with open(os.path.join(root, "results.csv")) as f:
        header = f.readline().strip().split(",")
    assert {"flops", "tokens", "params", "device_seconds", "final_eval_loss", "eval_loss_t0.1"} <= set(header)

    written = plot_scaling.write_all(results, str(tmp_path / "plots"), num_bootstrap=50)
    for path in written["loss_vs_compute"] + written["loss_per_t"] + written["fit"]:
        assert os.path.getsize(path) > 1000, path
    fit = json.loads(open(written["fit"][0]).read())
    assert fit["loss_vs_compute"]["fit"]["b"] > 0  # loss falls with compute in the fake


def test_exit_zero_before_the_last_step_is_not_done(tmp_path):
    workdir = tmp_path / "w"
    script = tmp_path / "short.py"
    script.write_text("import json,sys,os\nos.makedirs(sys.argv[1],exist_ok=True)\n"
                      "open(os.path.join(sys.argv[1],'metrics.jsonl'),'a').write(json.dumps({'step':3,'eval/loss':1.0})+'\\n')\n")
    plan = fake_plan("base")
    with pytest.raises(scaling_sweep.SweepError, match="stops at step 3, not the planned 8"):
        scaling_sweep.run_point("base", str(workdir), [sys.executable, str(script), str(workdir)], plan, log=lambda m: None)
    assert not scaling.is_done(str(workdir))


def test_print_mode_lists_one_loop_command_per_pending_point(tmp_path):
    out = subprocess.run(
        [sys.executable, scaling_sweep.__file__, "--sweep=16x,preset=pod,size_shift=-1|0|1", f"--root={tmp_path}",
         "--mode=print", "--override=--config.seed=1"],
        capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()
    assert len(out) == 3
    for line, shift in zip(out, ("-1", "0", "1")):
        assert "-m sora_jax.main" in line and f"configs/scaling.py:16x,preset=pod,size_shift={shift}" in line
        assert "--config.seed=1" in line and "--workdir=" in line


def test_tpu_and_slurm_modes_go_through_the_launchers_dry_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        scaling_sweep.main(["--sweep=base|4x,preset=micro", "--root=gs://bucket/sweep", "--mode=tpu",
                            "--launcher_args=--zone=z --accelerator=v5p-8 --version=v --repo=https://x/sora_jax"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.count("tpu-vm create sora-scaling-") == 2
    assert "--config=configs/scaling.py:4x,preset=micro --workdir=gs://bucket/sweep/4x_presetmicro" in out
    with pytest.raises(SystemExit):
        scaling_sweep.main(["--sweep=16x,preset=micro", f"--root={tmp_path}", "--mode=slurm",
                            "--launcher_args=--nodes=2", "--override=--config.seed=3"])
    out = capsys.readouterr().out
    assert "srun" in out and f"--workdir={tmp_path}/16x_presetmicro --config.seed=3" in out
    assert not os.path.exists(tmp_path / "16x_presetmicro")  # a dry run writes nothing


def test_accounting_drops_superseded_lines_and_reads_preflight(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    lines = [
        {"step": 2, "perf/steps_per_s": 2.0, "perf/tokens_per_s": 20.0, "perf/tflops_per_device": 2e-3},
        {"step": 2, "eval/loss": 3.0},
        {"step": 4, "perf/steps_per_s": 2.0, "perf/tokens_per_s": 20.0, "perf/tflops_per_device": 2e-3},
        {"step": 4, "eval/loss": 2.5},  # superseded: the run died before checkpointing step 4
        {"step": 4, "perf/steps_per_s": 1.0, "perf/tokens_per_s": 10.0, "perf/tflops_per_device": 1e-3},
        {"step": 4, "eval/loss": 2.0},
    ]
    (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"step\": 5, \"trunc")
    plan = dict(fake_plan("base"), steps=4)
    row = scaling.summarize_point("base", str(workdir), plan)
    assert [h["eval_loss"] for h in row["eval_history"]] == [3.0, 2.0]
    assert row["final_eval_loss"] == 2.0 and row["steps"] == 4
    assert row["flops"] == pytest.approx(4 * 1e9)  # 1e-3 TFLOP/s / 1 step/s on 1 device
    assert row["flops_xla"] is None


def test_expand_sweep_and_names():
    assert scaling.expand_sweep("base|4x|16x,preset=cpu") == ["base,preset=cpu", "4x,preset=cpu", "16x,preset=cpu"]
    assert scaling.expand_sweep("16x,size_shift=-1|0|+1,preset=micro") == [
        "16x,size_shift=-1,preset=micro", "16x,size_shift=0,preset=micro", "16x,size_shift=+1,preset=micro"]
    names = {scaling.point_name(a) for a in scaling.expand_sweep("4x|16x,size_shift=-1|0|+1")}
    assert len(names) == 6 and all("/" not in n and "," not in n for n in names)
    assert scaling.point_name("4x,preset=cpu,latents=/data/lat,vae=/data/vae") == "4x_presetcpu"
    assert scaling.parse_multiple("base") == 1.0 and scaling.parse_multiple("32x") == 32.0
    for bad in ("x4", "0x", "huge"):
        with pytest.raises(ValueError, match="compute multiple"):
            scaling.parse_multiple(bad)
    assert np.isclose(np.prod(scaling.target_factors(16.0, 0.25)), 16.0)


def _write_samples(workdir, colour, seed=0, frames=3):
    from sora_jax.data import video_io

    out = os.path.join(workdir, "samples", "step_0000010")
    os.makedirs(out, exist_ok=True)
    meta = dict(step=10, prompts=["a", "b"], latent_shape=[3, 8, 8], sampler="heun", steps=4, guidance=3.0, seed=seed)
    json.dump(meta, open(os.path.join(out, "prompts.json"), "w"))
    for i in range(2):
        video = np.zeros((frames, 16, 24, 3), np.uint8)
        video[..., colour] = 60 + 100 * i
        video[:, :2, :2, 1] = np.arange(frames)[:, None, None] * 50  # frames differ (GIF merges equal frames)
        video_io.write_video(os.path.join(out, f"sample_{i}.gif"), video)


def test_sample_grid_tiles_points_by_compute_and_refuses_mismatched_seeds(tmp_path):
    from sora_jax.data import video_io

    rows = [dict(point="big", flops=4e9), dict(point="small", flops=1e9)]
    _write_samples(tmp_path / "small", 0, frames=3)
    _write_samples(tmp_path / "big", 2, frames=2)
    paths = plot_scaling.sample_grid(rows, str(tmp_path), str(tmp_path / "plots"))
    grid, _ = video_io.read_video(paths[1])  # the gif
    assert grid.shape[0] == 3  # the shorter video holds its last frame
    body = grid[-1, 14:, :, :]  # below the label strip
    assert body.shape[0] == 2 * (16 + 2) and grid.shape[2] == 2 * (24 + 2)
    assert body[4, 4, 0] > 40 and body[4, 4, 2] < 20 and body[4, 28, 0] < 20  # left column: the small (less compute) point, red
    assert body[4, 30, 2] > 40 and body[4, 30, 0] < 20  # right column: blue
    assert json.load(open(tmp_path / "plots" / "samples_grid.json"))["columns"] == ["small", "big"]

    _write_samples(tmp_path / "big", 2, seed=1)
    with pytest.raises(ValueError, match="same prompts and seeds"):
        plot_scaling.sample_grid(rows, str(tmp_path), str(tmp_path / "plots"))
    os.remove(tmp_path / "small" / "samples" / "step_0000010" / "sample_1.gif")
    with pytest.raises(FileNotFoundError, match="latents only"):
        plot_scaling.sample_grid(rows, str(tmp_path), str(tmp_path / "plots"))


FAKE_SAMPLE = textwrap.dedent('''
    """Fake `python -m sora_jax.sample`: writes NAME.gif and NAME.json per job of --prompts."""
    import json, os, sys
    import numpy as np
    sys.path.insert(0, os.environ["REPO"])
    from sora_jax.data import video_io
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    with open(os.environ["CALLS"], "a") as f:
        f.write(args["workdir"] + "\\n")
    for line in open(args["prompts"]):
        job = json.loads(line)
        video = np.full((2, 8, 8, 3), 40 * (1 + job["seed"]), np.uint8)
        video[1, :2, :2] = 255
        video_io.write_video(os.path.join(args["out"], job["name"] + ".gif"), video)
        json.dump(dict(job, steps=int(args.get("steps", 16)), guidance=3.0, sampler="heun"),
                  open(os.path.join(args["out"], job["name"] + ".json"), "w"))
''')


def test_rendered_grid_uses_the_sampling_cli_once_per_point(tmp_path, monkeypatch):
    from sora_jax.data import video_io

    script = tmp_path / "fake_sample.py"
    script.write_text(FAKE_SAMPLE)
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("REPO", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.setenv("CALLS", str(calls))
    rows = [dict(point="a", flops=1.0), dict(point="b", flops=2.0)]
    for row in rows:
        (tmp_path / row["point"]).mkdir()
    command = [sys.executable, str(script)]
    plot_scaling.render_samples(rows, str(tmp_path), ["x", "y"], [0, 1], ["--steps=8"], command=command)
    plot_scaling.render_samples(rows, str(tmp_path), ["x", "y"], [0, 1], ["--steps=8"], command=command)  # cached
    assert len(calls.read_text().splitlines()) == 2
    paths = plot_scaling.sample_grid(rows, str(tmp_path), str(tmp_path / "plots"), source="rendered")
    grid, _ = video_io.read_video(paths[1])
    assert grid.shape[1] == 14 + 4 * (8 + 2) and grid.shape[2] == 2 * (8 + 2)  # 4 jobs x 2 points
    # A point rendered with other settings is refused.
    plot_scaling.render_samples(rows[1:], str(tmp_path), ["x", "y"], [0, 1], ["--steps=9"], command=command,
                                out_name="other")
    os.replace(tmp_path / "b" / "other", tmp_path / "b" / "grid_samples_new")
    import shutil
    shutil.rmtree(tmp_path / "b" / "grid_samples")
    os.replace(tmp_path / "b" / "grid_samples_new", tmp_path / "b" / "grid_samples")
    with pytest.raises(ValueError, match="same prompts and seeds"):
        plot_scaling.sample_grid(rows, str(tmp_path), str(tmp_path / "plots"), source="rendered")
