"""Every prompting mode on the tiny trained checkpoint: conditioning kept exactly, outputs written.

Shapes are few on purpose (compiling dominates): latent videos of 1, 2 and 3 frames
at 32x32 pixels, one sampler setting. Latent-space checks are exact equalities: the
given frames are conditioning tokens held at their clean values.
"""

import json
import os

import numpy as np
import pytest

from sora_jax.data import video_io
pytest.register_assert_rewrite("tests.sampling_fixtures")  # imported here before its plugin registration
from tests.sampling_fixtures import toy_clip  # noqa: E402

# One plugin registration: the session fixtures (tiny_workdirs, generator) are then shared by every file.
pytest_plugins = ("tests.sampling_fixtures",)

# One xdist worker runs every test that uses the shared tiny checkpoint, so it is trained once.
pytestmark = pytest.mark.xdist_group("tiny_checkpoint")


STEPS = 2


def test_text_to_video_writes_every_output_and_same_seed_same_video(generator, tmp_path):
    a = generator.text_to_video("a red circle bouncing", seed=3, steps=STEPS)
    b = generator.text_to_video("a red circle bouncing", seed=3, steps=STEPS)
    c = generator.text_to_video("a red circle bouncing", seed=4, steps=STEPS)
    assert a.video.shape == (5, 32, 32, 3) and a.video.dtype == np.uint8
    assert a.latents.shape == (2, 4, 4, 16)
    np.testing.assert_array_equal(a.latents, b.latents)
    np.testing.assert_array_equal(a.video, b.video)
    assert not np.array_equal(a.latents, c.latents)

    paths = generator_save(a, tmp_path, "t2v")
    assert set(paths) == {"mp4", "gif", "contact_sheet", "latents", "json"}
    frames, _ = video_io.read_video(paths["mp4"])
    assert frames.shape == (5, 32, 32, 3)
    assert video_io.read_video(paths["gif"])[0].shape == (5, 32, 32, 3)
    sidecar = json.load(open(paths["json"]))
    for key in ("prompt", "expanded_prompt", "mode", "seed", "steps", "guidance", "shift", "sampler",
                "checkpoint_step", "size", "frames", "timings"):
        assert key in sidecar, key
    assert sidecar["checkpoint_step"] == 2 and sidecar["seed"] == 3 and sidecar["size"] == [32, 32]
    assert sidecar["timings"]["sample_s"] > 0


def generator_save(result, tmp_path, name):
    from sora_jax.generate import save

    return save(result, str(tmp_path), name)


def test_text_to_image_is_one_frame_written_as_png(generator, tmp_path):
    out = generator.text_to_image("a picture of a blue square", seed=0, steps=STEPS)
    assert out.video.shape == (1, 32, 32, 3) and out.latents.shape[0] == 1
    paths = generator_save(out, tmp_path, "t2i")
    assert set(paths) == {"png", "latents", "json"}
    assert video_io.read_video(paths["png"])[0].shape == (1, 32, 32, 3)


def test_image_to_video_keeps_the_given_frame(generator):
    image = toy_clip(1, seed=5)[0]
    out = generator.image_to_video(image, "the square moves right", seed=0, steps=STEPS)
    assert out.latents.shape == (2, 4, 4, 16)
    np.testing.assert_array_equal(out.latents[0], generator.encode(image[None])[0])
    assert out.metadata["given_latent_frames"] == [0]


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_extension_keeps_the_given_frames_and_adds_the_requested_number(generator, direction):
    clip = toy_clip(5, seed=1)
    given = generator.encode(clip)  # 2 latent frames
    out = generator.extend(clip, "the square keeps moving", frames=4, direction=direction, seed=0, steps=STEPS)
    assert out.video.shape[0] == 5 + 4 and out.latents.shape[0] == 3
    kept = out.latents[:2] if direction == "forward" else out.latents[1:]
    np.testing.assert_array_equal(kept, given)
    assert out.metadata["new_frames"] == 4 and out.metadata["direction"] == direction


def test_loop_ends_where_it_starts(generator, tmp_path):
    out = generator.loop("a green diamond drifting", frames=9, seed=2, steps=STEPS)
    assert out.latents.shape[0] == 3
    np.testing.assert_array_equal(out.latents[-1], out.latents[0])
    assert out.metadata["loop_frames"] == out.video.shape[0] - 1
    # The first frame is the text-to-image sample of the same prompt and seed.
    first = generator.text_to_image("a green diamond drifting", seed=2, steps=STEPS)
    np.testing.assert_array_equal(out.latents[0], first.latents[0])
    paths = generator_save(out, tmp_path, "loop")
    assert video_io.read_video(paths["gif"])[0].shape[0] == out.video.shape[0] - 1


def test_sdedit_strength_zero_returns_the_input_and_one_ignores_it(generator):
    clip_a, clip_b = toy_clip(5, seed=1), toy_clip(5, seed=2)
    zero = generator.edit(clip_a, "a white triangle", strength=0.0, seed=0, steps=STEPS)
    np.testing.assert_array_equal(zero.latents, generator.encode(clip_a))
    one_a = generator.edit(clip_a, "a white triangle", strength=1.0, seed=0, steps=STEPS)
    one_b = generator.edit(clip_b, "a white triangle", strength=1.0, seed=0, steps=STEPS)
    np.testing.assert_array_equal(one_a.latents, one_b.latents)
    # Strength 1 is text-to-video from the same seed.
    t2v = generator.text_to_video("a white triangle", frames=5, seed=0, steps=STEPS)
    np.testing.assert_array_equal(one_a.latents, t2v.latents)
    half = generator.edit(clip_a, "a white triangle", strength=0.5, seed=0, steps=STEPS)
    assert not np.array_equal(half.latents, zero.latents) and not np.array_equal(half.latents, one_a.latents)


def test_connect_starts_at_the_end_of_a_and_ends_at_the_start_of_b(generator, tmp_path):
    clip_a, clip_b = toy_clip(5, seed=1), toy_clip(5, seed=2)
    out = generator.connect(clip_a, clip_b, "a transition", frames=4, seed=0, steps=STEPS)
    assert out.latents.shape[0] == 3 and out.video.shape[0] == 9
    np.testing.assert_array_equal(out.latents[0], generator.encode(clip_a)[-1])
    np.testing.assert_array_equal(out.latents[-1], generator.encode(clip_b)[0])
    paths = generator_save(out, tmp_path, "connect")
    assert os.path.exists(paths["mp4"]) and os.path.exists(paths["contact_sheet"])


def test_prompt_expansion_is_used_shown_and_saved(generator, tmp_path):
    out = generator.text_to_image("red circle", seed=0, steps=STEPS, expand_with="toy")
    md = out.metadata
    assert md["prompt"] == "red circle" and md["expander"] == "toy"
    assert len(md["expanded_prompt"]) > len(md["prompt"]) and "red" in md["expanded_prompt"]
    sidecar = json.load(open(generator_save(out, tmp_path, "expanded")["json"]))
    assert sidecar["expanded_prompt"] == md["expanded_prompt"]


def test_sharded_generation_matches_unsharded(tiny_workdirs, generator):
    import jax

    from sora_jax import sharding
    from sora_jax.generate import Generator

    mesh = sharding.make_mesh({"data": 4, "tensor": 2})
    sharded = Generator.from_workdir(tiny_workdirs["dit"], mesh=mesh)
    specs = {tuple(v.sharding.spec) for v in jax.tree.leaves(sharded.state)}
    assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs), specs
    a = generator.text_to_video("a red circle bouncing", seed=3, steps=STEPS)
    b = sharded.text_to_video("a red circle bouncing", seed=3, steps=STEPS)
    np.testing.assert_allclose(b.latents, a.latents, atol=1e-5)


@pytest.mark.slow
def test_other_aspect_ratio_and_upscale_keep_the_seed(generator):
    small = generator.text_to_video("a red circle", size=(32, 32), frames=5, seed=7, steps=STEPS)
    wide = generator.upscale(small, (32, 64), strength=0.5)
    assert wide.video.shape == (5, 32, 64, 3)
    assert wide.metadata["seed"] == 7 and wide.metadata["source_size"] == [32, 32]
