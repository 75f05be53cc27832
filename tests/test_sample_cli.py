"""The sampling CLI (python -m sora_jax.sample) and the documented errors for bad input.

Every bad input is refused before the model loads: these tests check the error and
that no output was written. The CLI's happy path runs a batch jsonl of text-to-image
jobs (one compiled shape) on the tiny checkpoint.
"""

import json
import os
import shutil

import numpy as np
import pytest

from sora_jax import generate as G
from sora_jax import sample
from sora_jax.data.video_io import VideoReadError
pytest.register_assert_rewrite("tests.sampling_fixtures")  # imported here before its plugin registration
from tests.sampling_fixtures import toy_clip  # noqa: E402

# One plugin registration: the session fixtures (tiny_workdirs, generator) are then shared by every file.
pytest_plugins = ("tests.sampling_fixtures",)

# One xdist worker runs every test that uses the shared tiny checkpoint, so it is trained once.
pytestmark = pytest.mark.xdist_group("tiny_checkpoint")



def _cli(tiny_workdirs, tmp_path, *args):
    return sample.main([f"--workdir={tiny_workdirs['dit']}", f"--out={tmp_path / 'out'}", "--steps=2", *args])


def test_cli_batch_from_jsonl_writes_outputs_with_expanded_prompts(tiny_workdirs, tmp_path, capsys):
    jobs = tmp_path / "prompts.jsonl"
    jobs.write_text(json.dumps({"prompt": "red circle", "mode": "t2i", "expand": "toy", "seed": 1}) + "\n"
                    + json.dumps({"prompt": "a blue square", "mode": "t2i", "name": "blue", "size": "30x34"}) + "\n")
    assert _cli(tiny_workdirs, tmp_path, f"--prompts={jobs}") == 0
    out = capsys.readouterr().out
    assert "expanded:" in out and "rounded to 32x32" in out
    written = sorted(os.listdir(tmp_path / "out"))
    assert written == ["000_t2i.json", "000_t2i.png", "000_t2i_latents.npy", "blue.json", "blue.png", "blue_latents.npy"]
    sidecar = json.load(open(tmp_path / "out" / "000_t2i.json"))
    assert sidecar["prompt"] == "red circle" and sidecar["expanded_prompt"] != "red circle"
    assert sidecar["seed"] == 1 and sidecar["checkpoint_step"] == 2
    blue = json.load(open(tmp_path / "out" / "blue.json"))
    assert blue["adjustments"] == ["size 30x34 rounded to 32x32 (multiples of 16)"]


@pytest.mark.parametrize("args, message", [
    (["--mode=i2v", "--prompt=x"], "mode i2v needs --image"),
    (["--mode=connect", "--prompt=x", "--video=V"], "mode connect needs --video_b"),
    (["--mode=t2v", "--prompt=x", "--frames=0"], "frames=0 is out of range"),
    (["--mode=t2v", "--prompt=x", "--frames=100"], "frames=100 is out of range"),
    (["--mode=loop", "--prompt=x", "--frames=5"], "frames=5 is out of range: this mode takes 9.."),
    (["--mode=t2i", "--prompt=x", "--frames=9"], "--frames does not apply to mode t2i"),
    (["--mode=t2v", "--prompt=x", "--size=32by32"], "--size must be HxW"),
    (["--mode=t2v", "--prompt=x", "--size=1024x1024"], "more than 16x the training pixel budget"),
    (["--mode=edit", "--prompt=x", "--video=V", "--strength=1.5"], "--strength must be in [0, 1]"),
    (["--mode=extend", "--prompt=x", "--video=V", "--frames=200"], "frames=200 is out of range"),
])
def test_bad_arguments_are_refused_before_loading(tiny_workdirs, tmp_path, capsys, args, message):
    video = tmp_path / "in.gif"
    from sora_jax.data import video_io

    video_io.write_video(str(video), toy_clip(5))
    args = [a.replace("=V", f"={video}") for a in args]
    assert _cli(tiny_workdirs, tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_unreadable_inputs_name_the_file(tiny_workdirs, tmp_path, capsys, generator):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    assert _cli(tiny_workdirs, tmp_path, "--mode=edit", "--prompt=x", f"--video={broken}") == 2
    assert str(broken) in capsys.readouterr().err
    missing = tmp_path / "nope.png"
    assert _cli(tiny_workdirs, tmp_path, "--mode=i2v", "--prompt=x", f"--image={missing}") == 2
    err = capsys.readouterr().err
    assert "nope.png" in err and "no such file" in err
    # The API raises the same error before encoding anything.
    with pytest.raises(VideoReadError, match="broken.mp4"):
        generator.edit(str(broken), "x", strength=0.5)
    with pytest.raises(G.GenerationError, match="strength must be in"):
        generator.edit(toy_clip(5), "x", strength=-0.1)
    with pytest.raises(G.GenerationError, match="direction must be"):
        generator.extend(toy_clip(5), "x", direction="sideways")
    with pytest.raises(G.GenerationError, match="frames=1 is out of range"):
        generator.image_to_video(toy_clip(1)[0], "x", frames=1)


def test_sizes_round_to_the_nearest_valid_size_and_say_so(generator):
    notes = []
    assert generator.geometry.round_size((40, 90), notes) == (48, 96)
    assert generator.geometry.round_size((7, 16), notes) == (16, 16)
    assert notes == ["size 40x90 rounded to 48x96 (multiples of 16)", "size 7x16 rounded to 16x16 (multiples of 16)"]
    notes = []
    assert generator.geometry.round_frames(8, notes) == 9 and generator.geometry.round_frames(6, notes) == 5
    assert generator.geometry.round_new_frames(6, notes, given_latent=2) == 8
    assert len(notes) == 3


def test_missing_or_incomplete_checkpoints_are_named(tiny_workdirs, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(G.CheckpointError, match="nowhere does not exist"):
        G.Generator.from_workdir(str(missing))
    assert sample.main([f"--workdir={missing}"]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err

    # A copy of the DiT workdir whose only checkpoint lost its state metadata (an interrupted save).
    broken = tmp_path / "dit"
    shutil.copytree(tiny_workdirs["dit"], broken)
    os.remove(broken / "checkpoints" / "2" / "state" / "_METADATA")
    with pytest.raises(G.CheckpointError, match=r"dit has no complete checkpoint: checkpoint\(s\) \[2\] are incomplete"):
        G.Generator.from_workdir(str(broken))
    with pytest.raises(G.CheckpointError, match="has no checkpoint 7; it has \\[2\\]"):
        G.Generator.from_workdir(tiny_workdirs["dit"], step=7)

    # A DiT whose VAE workdir is gone.
    orphan = tmp_path / "orphan"
    shutil.copytree(tiny_workdirs["dit"], orphan)
    config = json.load(open(orphan / "config.json"))
    config["vae_workdir"] = str(tmp_path / "no_vae")
    json.dump(config, open(orphan / "config.json", "w"))
    assert sample.main([f"--workdir={orphan}", "--prompt=x"]) == 2
    assert "VAE workdir" in capsys.readouterr().err


def test_load_frames_rejects_arrays_of_the_wrong_kind():
    with pytest.raises(G.GenerationError, match="uint8"):
        G.load_frames(np.zeros((4, 8, 8, 3), np.float32), "video")
