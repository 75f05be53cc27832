"""The README's first command, at micro size: VAE -> latent cache -> DiT -> samples, via the CLI."""

import json
import os
import subprocess
import sys

import helpers_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir):
    # One CPU device, as on a laptop; conftest's LLVM level (compile time only).
    env = dict(os.environ, XLA_FLAGS=helpers_stage.backend_level_flag(), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "sora_jax.quickstart", "--micro", f"--workdir={workdir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def test_quickstart_micro_end_to_end_and_resume(tmp_path):
    workdir = str(tmp_path / "qs")
    proc = _run(workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.load(open(os.path.join(workdir, "quickstart.json")))
    names = {os.path.basename(p) for p in summary["samples"]}
    assert {"t2v_0.mp4", "t2v_0.gif", "t2v_0.json"} <= names
    sidecar = json.load(open(os.path.join(workdir, "samples", "t2v_0.json")))
    assert sidecar["prompt"] == "a red circle bouncing" and len(sidecar["expanded_prompt"]) > len(sidecar["prompt"])
    for stage in ("vae", "dit"):
        assert os.path.exists(os.path.join(workdir, stage, "config.json"))
    assert os.path.exists(os.path.join(workdir, "vae", "latent_stats.json"))
    # Re-running resumes: both trained stages and the cache are skipped.
    again = _run(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "VAE: already trained" in again.stdout and "DiT: already trained" in again.stdout
