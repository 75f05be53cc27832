"""The captioner stage: model, vocabulary, training through the real loop, recaption CLI."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.data import captions, sources, toy_world
from sora_jax.data.tokenizer import EOS_ID, HashTokenizer
from sora_jax.models.captioner import captioner_config, create_captioner, pad_frames, teacher_forcing_inputs
from sora_jax.stages import captioner as cap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
    import importlib.util

    spec = importlib.util.spec_from_file_location("captioner_config", os.path.join(REPO, "configs", "captioner.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("micro")
    for key, value in overrides.items():
        target = config
        *path, last = key.split(".")
        for p in path:
            target = target[p]
        target[last] = value
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro captioner trained for a few steps through the one training loop."""
    from sora_jax.train import loop

    workdir = str(tmp_path_factory.mktemp("captioner"))
    result = loop.train(_config(), workdir)
    return workdir, result


def _losses(workdir):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            out.update({(row["step"], k): v for k, v in row.items() if k not in ("step", "time")})
    return out


# --- model ---------------------------------------------------------------------------------


def test_greedy_decoding_matches_teacher_forcing_and_handles_any_size():
    cfg = captioner_config("micro")
    cfg.vocab_size, cfg.max_len = 97, 10  # untrained and tiny: long captions that hit every cache slot
    graphdef, state = nnx.split(create_captioner(cfg, seed=3))

    @jax.jit
    def run(state, video):
        model = nnx.merge(graphdef, state)
        ids = model.decode_greedy(video)
        return ids, model(video, teacher_forcing_inputs(ids))

    for shape in [(2, 5, 16, 32, 3)]:
        video = jax.random.uniform(jax.random.key(1), shape, minval=-1, maxval=1)
        ids, logits = run(state, video)
        assert ids.shape == (2, 10)
        assert logits.shape == (2, 10, 97)
        # Up to the EOS, every token is the argmax of the teacher-forced logits (KV cache == full pass).
        expected = np.asarray(jnp.argmax(logits, -1))
        got = np.asarray(ids)
        for row in range(2):
            end = list(got[row]).index(EOS_ID) if EOS_ID in got[row] else 9
            np.testing.assert_array_equal(got[row, :end], expected[row, :end])


def test_captioner_tells_an_image_from_a_static_video_of_it():
    """An image's one temporal patch equals a video's first (frame 0 repeated), and RoPE is relative,
    so without the media embedding the quick captioner called every held-out image a video. Here the
    two media differ only in length: each clip is one random frame, alone or repeated 5 times, and the
    caption is one word naming the medium. After 150 Adam steps >= 90% of new clips of each medium must
    be named right (97% / 97% measured; the model without the embedding: 42% / 58%, and with it zeroed
    and frozen: 70% / 28%, both chance)."""
    import optax

    cfg = captioner_config("micro")
    cfg.vocab_size, cfg.max_len = 8, 2
    model = create_captioner(cfg, seed=0)
    image_id, video_id = 5, 6

    def batch(key, n=8):
        frames = jax.random.uniform(key, (n, 1, 16, 16, 3), minval=-1, maxval=1)
        return frames, jnp.repeat(frames, 5, axis=1)

    def loss_fn(model, images, videos):
        def xent(video, word):
            logits = model(video, jnp.full((video.shape[0], 1), EOS_ID, jnp.int32))[:, 0]
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full((video.shape[0],), word)).mean()
        return xent(images, image_id) + xent(videos, video_id)

    optimizer = nnx.Optimizer(model, optax.adam(2e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, images, videos):
        loss, grads = nnx.value_and_grad(loss_fn)(model, images, videos)
        optimizer.update(model, grads)
        return loss

    for i in range(150):
        step(model, optimizer, *batch(jax.random.key(i)))
    images, videos = batch(jax.random.key(1000), n=64)
    start = jnp.full((64, 1), EOS_ID, jnp.int32)
    image_acc = float((jnp.argmax(model(images, start)[:, 0], -1) == image_id).mean())
    video_acc = float((jnp.argmax(model(videos, start)[:, 0], -1) == video_id).mean())
    assert image_acc >= 0.9 and video_acc >= 0.9, (image_acc, video_acc)


def test_pad_frames_repeats_the_first_frame():
    video = jnp.arange(5.0).reshape(1, 5, 1, 1, 1) * jnp.ones((1, 5, 8, 8, 3))
    padded = pad_frames(video, 4)
    assert padded.shape[1] == 8
    np.testing.assert_array_equal(np.asarray(padded[0, :4, 0, 0, 0]), [0, 0, 0, 0])
    assert pad_frames(video[:, :1], 4).shape[1] == 4


# --- vocabulary ------------------------------------------------------------------------------


def test_detokenize_inverts_the_tokenizer_on_toy_captions():
    data = _config().data
    tokenizer = HashTokenizer(8192, 160)
    table = cap.id_to_word(cap.build_vocabulary(data))
    world = toy_world.ToyWorld(toy_world.ToyWorldConfig(pixel_budget=16 * 16, size_multiple=4), seed=11,
                               num_examples=60)
    for i in range(60):
        caption = world[i]["caption"]
        assert cap.detokenize(tokenizer.encode(caption), table) == caption


def test_vocabulary_adds_training_caption_words_and_reports_collisions():
    data = _config().data
    vocab = cap.build_vocabulary(data, ["A kite flies over a harbour.", "a kite"])
    words = set(vocab["words"].values())
    assert {"kite", "harbour", "flies", "red", "circle"} <= words
    assert vocab["captions_scanned"] == 2 and vocab["vocab_size"] == 8192
    small = data.copy_and_resolve_references()
    small.vocab_size = 64  # few ids: the grammar's words must collide
    clashes = cap.build_vocabulary(small)["collisions"]
    assert clashes and all(len(ws) > 1 for ws in clashes.values())


def test_stage_refuses_short_captions():
    with pytest.raises(ValueError, match="descriptive"):
        cap.CaptionerStage(_config(**{"data.caption": "short"}))


def test_caption_eval_adds_held_out_images():
    """captioner.num_images adds that many 1-frame held-out examples after the mix's first clips."""
    config = _config(**{"captioner.num_images": 3, "data.toy.image_prob": 0.0})  # the mix: videos only
    examples = cap.CaptionerStage(config)._caption_examples()
    count, num_train = int(config.captioner.num_examples), int(config.data.num_train)
    assert len(examples) == count + 3
    assert all(e["video"].shape[0] > 1 for e in examples[:count])
    assert all(e["video"].shape[0] == 1 for e in examples[count:])
    indices = [e["index"] for e in examples]
    assert len(set(indices)) == len(indices) and min(indices) >= num_train  # distinct and held out
    assert all(("media", "image") in captions.caption_facts(e["ground_truth"]) for e in examples[count:])


def test_caption_eval_says_when_the_split_has_too_few_images(capsys):
    config = _config(**{"captioner.num_images": 100})  # micro's eval split holds 16 records
    examples = cap.CaptionerStage(config)._caption_examples()
    found = len(examples) - int(config.captioner.num_examples)
    assert found == int(config.data.num_eval) - int(config.captioner.num_examples)
    assert f"only {found} images" in capsys.readouterr().out


# --- training through the loop ------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_captions(trained):
    workdir, result = trained
    assert result.status == "done" and result.step == 6
    metrics = _losses(workdir)
    first, last = metrics[(1, "train/loss")], metrics[(6, "train/loss")]
    assert last < first - 0.3, (first, last)
    assert 0.0 <= metrics[(6, "eval/token_accuracy")] <= 1.0
    assert (6, "captions/fact_recall") in metrics
    with open(os.path.join(workdir, "captions", "step_6.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 8
    assert all(r["reference"] and isinstance(r["caption"], str) and r["facts"] > 0 for r in rows)
    vocab = cap.read_vocabulary(workdir)
    assert vocab["vocab_size"] == 8192 and "circle" in vocab["words"].values()


def test_caption_eval_scores_the_extra_images_apart(trained, tmp_path, capsys):
    from sora_jax.train import checkpoint

    workdir, _ = trained
    config, model = checkpoint.restore_model(workdir)
    config.captioner.num_images = 2
    stage = cap.CaptionerStage(config)
    stage.on_eval(model, str(tmp_path), 6, writer=None)
    with open(tmp_path / "captions" / "step_6.jsonl") as f:
        rows = [json.loads(line) for line in f]
    count = int(config.captioner.num_examples)
    assert [r["set"] for r in rows] == ["mix"] * count + ["images"] * 2
    assert all(r["shape"][0] == 1 for r in rows[count:])
    out = capsys.readouterr().out
    assert "images/recall_media" in out and " fact_recall" in out


def test_greedy_captions_are_vocabulary_words(trained):
    from sora_jax.train import checkpoint

    workdir, _ = trained
    config, model = checkpoint.restore_model(workdir)
    vocab = cap.read_vocabulary(workdir)
    table = cap.id_to_word(vocab)
    source = sources.make_source(config.data, "eval")
    from sora_jax.data import transforms

    videos = [transforms.VideoTransform(config.data, train=False)(source[i])["video"] for i in range(3)]
    writer = cap.CaptionWriter(model, vocab, batch_size=8, max_len=int(config.data.text_len))
    for ids, text in zip(writer.ids(videos), writer.captions(videos)):
        ids = list(ids)
        assert ids[-1] in (EOS_ID, 0) and EOS_ID in ids
        body = ids[: ids.index(EOS_ID)]
        assert body and all(i in table for i in body)
        assert cap.UNKNOWN_WORD not in text
        assert set(HashTokenizer().pieces(text)) <= set(table.values())


# --- recaption CLI ----------------------------------------------------------------------------------


def _write_records(directory, n=5):
    """Toy records of two shapes: 32x32 videos (5 frames) and images (1 frame)."""
    os.makedirs(directory, exist_ok=True)
    world = toy_world.ToyWorld(toy_world.ToyWorldConfig(pixel_budget=32 * 32, max_frames=5, image_prob=0.4,
                                                        aspect_ratios=("1:1",)), seed=5, num_examples=n)
    writer = sources.ShardWriter(str(directory), 3, "data")
    records = []
    for i in range(n):
        record = dict(world[i], source_file=f"clip_{i}.mp4")
        if i == 1:  # re-captioned before: its first caption must survive as the original
            record["original_caption"] = "a hand-written caption"
        writer.write(record)
        records.append(record)
    writer.close()
    return records


def test_recaption_cli_round_trip(trained, tmp_path, capsys):
    from sora_jax import recaption

    workdir, _ = trained
    records = _write_records(tmp_path / "in")
    out = tmp_path / "out"
    assert recaption.main([f"--workdir={workdir}", f"--data={tmp_path / 'in'}/*.array_record", f"--out={out}",
                           "--batch_size=8"]) == 0
    assert "re-captioned 5 of 5" in capsys.readouterr().out
    result = sources.ArrayRecordSource(str(out))
    assert len(result) == len(records)
    for before, after in zip(records, (result[i] for i in range(len(result)))):
        assert after["original_caption"] == before.get("original_caption", before["caption"])
        assert after["caption"] and after["caption"] != before["caption"]
        assert after["source_file"] == before["source_file"] and after["index"] == before["index"]
        np.testing.assert_array_equal(after["video"], before["video"])
    report = json.load(open(out / "recaption_report.json"))
    assert report["written"] == 5 and report["step"] == 6 and sum(report["shapes"].values()) == 5
    assert len(report["shapes"]) >= 2  # several native shapes, batched by shape
    assert result[1]["original_caption"] == "a hand-written caption"


def test_recaption_refuses_bad_inputs(trained, tmp_path, capsys):
    from sora_jax import recaption

    workdir, _ = trained
    _write_records(tmp_path / "in", n=1)
    assert recaption.main([f"--workdir={workdir}", f"--data={tmp_path / 'in'}", f"--out={tmp_path / 'in'}"]) == 1
    assert "holds the input shards" in capsys.readouterr().err
    assert recaption.main([f"--workdir={workdir}", f"--data={tmp_path / 'missing'}", f"--out={tmp_path / 'o'}"]) == 1
    assert "no ArrayRecord files" in capsys.readouterr().err
