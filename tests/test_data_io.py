"""Importer, TFDS builder/reader and ArrayRecord sources, with the bad inputs named in their errors."""

import json
import os

import numpy as np
import pytest

from sora_jax.data import config as data_config_lib, importer, pipeline, sources, video_io


def moving_square(t, h, w, seed):
    rng = np.random.default_rng(seed)
    frames = np.zeros((t, h, w, 3), np.uint8)
    frames[:] = rng.integers(0, 255, 3, dtype=np.uint8)
    for i in range(t):
        frames[i, h // 4 : h // 2, (i * 3) % (w // 2) : (i * 3) % (w // 2) + w // 4] = 255
    return frames


@pytest.fixture
def video_folder(tmp_path):
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    written = {
        "wide.mp4": moving_square(12, 48, 96, 0),
        "sub/tall.mp4": moving_square(9, 64, 32, 1),
        "anim.gif": moving_square(5, 40, 40, 2),
    }
    for name, frames in written.items():
        video_io.write_video(str(videos / name), frames, fps=24.0 if name.endswith(".mp4") else 10.0)
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(300))  # corrupt
    (videos / "nocaption.gif").write_bytes((videos / "anim.gif").read_bytes())
    captions = tmp_path / "captions.jsonl"
    with open(captions, "w") as f:
        for name in ["wide.mp4", "sub/tall.mp4", "anim.gif", "broken.mp4", "ghost.mp4"]:
            f.write(json.dumps({"file": name, "caption": f"a white square moving in {name}"}) + "\n")
    return videos, captions, written


def test_importer_round_trip_with_corrupt_file(video_folder, tmp_path):
    videos, captions, written = video_folder
    out = tmp_path / "out"
    code = importer.main([f"--videos={videos}", f"--captions={captions}", f"--out={out}", "--on_error=skip",
                          "--shard_size=2"])
    assert code == 0
    report = json.load(open(out / "import_report.json"))
    assert report["imported"] == 3
    assert set(report["skipped"]) == {"broken.mp4", "nocaption.gif"}
    assert "broken.mp4" in report["skipped"]["broken.mp4"] and "no caption" in report["skipped"]["nocaption.gif"]
    assert report["captions_without_video"] == ["ghost.mp4"] and len(report["shards"]) == 2
    src = sources.ArrayRecordSource(str(out))
    assert len(src) == 3
    by_file = {src[i]["source_file"]: src[i] for i in range(len(src))}
    for name, frames in written.items():
        rec = by_file[name]
        assert rec["video"].shape == frames.shape  # native size and every frame kept
        assert rec["caption"] == f"a white square moving in {name}"
        tol = 40 if name.endswith(".mp4") else 8  # H.264 / GIF palette are lossy
        assert np.abs(rec["video"].astype(int) - frames.astype(int)).mean() < tol / 4
    assert by_file["wide.mp4"]["fps"] == pytest.approx(24.0)

    # The imported shards feed the training pipeline directly.
    c = data_config_lib.default_data_config()
    c.source, c.arrayrecord, c.num_train, c.num_eval, c.pixels, c.frames = "arrayrecord", str(out), 0, 1, 32 * 32, 5
    batch = next(pipeline.pixel_batches(c, "train", seed=0))
    assert batch["video"].shape[2] % 16 == 0


def test_importer_raises_naming_the_file(video_folder, tmp_path):
    videos, captions, _ = video_folder
    with pytest.raises(sources.DataError, match="broken.mp4"):
        importer.import_videos(str(videos), str(captions), str(tmp_path / "o"), on_error="raise", progress=False)


def test_importer_fps_resampling_and_max_frames(video_folder, tmp_path):
    videos, captions, written = video_folder
    (videos / "broken.mp4").unlink()
    (videos / "nocaption.gif").unlink()
    importer.import_videos(str(videos), str(captions), str(tmp_path / "o"), fps=8.0, max_frames=3, progress=False)
    src = sources.ArrayRecordSource(str(tmp_path / "o"))
    rec = next(src[i] for i in range(len(src)) if src[i]["source_file"] == "wide.mp4")
    assert rec["fps"] == 8.0 and rec["video"].shape[0] == 3  # 24 -> 8 fps keeps frames 0, 3, 6


def write_gray_mkv(path, frames, fps):
    """A lossless FFV1 .mkv stored as FFmpeg 'gray' (H.264 decoders report monochrome as yuv420p)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("ffv1", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "gray"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="gray")))
        container.mux(stream.encode())


def test_importer_reports_converted_videos(tmp_path):
    """Resampled, cut, grayscale and alpha sources are listed under "converted"; a plain RGB video is not."""
    from PIL import Image

    videos = tmp_path / "videos"
    videos.mkdir()
    video_io.write_video(str(videos / "fast.mp4"), moving_square(12, 32, 48, 0), fps=24.0)  # 24 -> 8 fps
    video_io.write_video(str(videos / "plain.mp4"), moving_square(5, 32, 48, 1), fps=8.0)  # unchanged
    video_io.write_video(str(videos / "long.mp4"), moving_square(9, 32, 32, 2), fps=8.0)  # cut to 6 frames
    write_gray_mkv(videos / "gray.mkv", moving_square(5, 32, 32, 3)[..., 0], fps=8)
    grays = [Image.fromarray(np.full((24, 24), 40 * i, np.uint8)) for i in range(4)]
    grays[0].save(videos / "gray.gif", save_all=True, append_images=grays[1:], duration=125, loop=0)
    clear = [Image.fromarray(np.dstack([np.full((24, 24, 3), 60 * i, np.uint8), np.full((24, 24, 1), 0, np.uint8)]),
                             "RGBA") for i in range(3)]
    clear[0].save(videos / "alpha.gif", save_all=True, append_images=clear[1:], duration=125, loop=0)
    captions = tmp_path / "captions.jsonl"
    names = ["fast.mp4", "plain.mp4", "long.mp4", "gray.mkv", "gray.gif", "alpha.gif"]
    captions.write_text("".join(json.dumps({"file": n, "caption": f"clip {n}"}) + "\n" for n in names))
    report = importer.import_videos(str(videos), str(captions), str(tmp_path / "out"), fps=8.0, max_frames=6,
                                    progress=False)
    assert report["imported"] == 6
    converted = report["converted"]
    assert set(converted) == {"fast.mp4", "long.mp4", "gray.mkv", "gray.gif", "alpha.gif"}
    assert "24 fps -> 8 fps" in converted["fast.mp4"]
    assert "kept the first 6 of 9 frames" in converted["long.mp4"]
    assert "grayscale -> RGB" in converted["gray.mkv"] and "grayscale -> RGB" in converted["gray.gif"]
    assert "alpha dropped" in converted["alpha.gif"]
    assert json.load(open(tmp_path / "out" / "import_report.json"))["converted"] == converted
    src = sources.ArrayRecordSource(str(tmp_path / "out"))
    gray = next(src[i]["video"] for i in range(len(src)) if src[i]["source_file"] == "gray.mkv")
    assert gray.shape == (5, 32, 32, 3) and np.array_equal(gray[..., 0], gray[..., 2])


def test_captions_file_errors(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"file": "a.mp4", "caption": "ok"}\n{"file": "b.mp4"}\n')
    with pytest.raises(sources.DataError, match=r"c.jsonl line 2"):
        importer.read_captions(str(bad))
    csv_file = tmp_path / "c.csv"
    csv_file.write_text("file,caption,short_caption\na.mp4,a red ball,red ball\n")
    assert importer.read_captions(str(csv_file))["a.mp4"]["short_caption"] == "red ball"


def test_corrupt_shard_and_record_errors_name_the_file(tmp_path):
    garbage = tmp_path / "bad-00000.array_record"
    garbage.write_bytes(b"not an array record" * 100)
    with pytest.raises(sources.DataError, match="bad-00000.array_record"):
        sources.ArrayRecordSource(str(garbage))
    # A valid shard holding a non-record entry.
    from array_record.python import array_record_module

    path = str(tmp_path / "odd-00000.array_record")
    w = array_record_module.ArrayRecordWriter(path, "group_size:1")
    w.write(sources.encode_record({"video": np.zeros((1, 8, 8, 3), np.uint8), "caption": "x", "index": 0}))
    w.write(b"\xc1garbage")
    w.write(sources.encode_record({"video": np.zeros((0, 8, 8, 3), np.uint8), "caption": "x", "index": 2}))
    w.close()
    src = sources.ArrayRecordSource(path)
    assert src[0]["caption"] == "x"
    with pytest.raises(sources.DataError, match=r"odd-00000.array_record record 1"):
        src[1]
    with pytest.raises(sources.DataError, match=r"odd-00000.array_record record 2: video has zero frames"):
        src[2]
    with pytest.raises(sources.DataError, match="no ArrayRecord files"):
        sources.ArrayRecordSource(str(tmp_path / "missing"))


def test_skip_mode_counts_bad_records(tmp_path):
    path = str(tmp_path / "mix-00000.array_record")
    writer = sources.ShardWriter(str(tmp_path), 100, "mix")
    rng = np.random.default_rng(0)
    for i in range(12):
        video = rng.integers(0, 255, (5, 32, 48, 3), dtype=np.uint8) if i % 4 else np.zeros((0, 32, 48, 3), np.uint8)
        writer.write({"video": video, "caption": f"clip {i}", "short_caption": "", "fps": 8.0, "index": i})
    writer.close()
    c = data_config_lib.default_data_config()
    c.source, c.arrayrecord, c.num_train, c.num_eval, c.pixels, c.frames = "arrayrecord", path, 0, 2, 32 * 32, 5
    assert len(list(pipeline.pixel_batches(c, "eval"))) == 1  # eval = records 10, 11: both good
    with pytest.raises(sources.DataError, match=r"mix-00000.array_record record [048]: video has zero frames"):
        next(pipeline.pixel_batches(c, "train", seed=0))
    c.on_error, c.prefetch = "skip", 0
    it = iter(pipeline.pixel_dataset(c, "train", seed=0))
    seen = {int(i) for _ in range(4) for i in next(it)["index"] if i >= 0}
    assert seen and not seen & {0, 4, 8} and it.get_state()["skipped"] > 0


# --- TFDS ------------------------------------------------------------------------------


def test_tfds_toy_world_build_and_read_round_trip(tmp_path):
    from sora_jax.data import tfds_builder, toy_world

    data_dir = str(tmp_path / "tfds")
    tfds_builder.build(data_dir, num_train=6, num_eval=2)
    src = sources.TfdsSource("sora_toy_world", "train", data_dir)
    assert len(src) == 6
    world = toy_world.ToyWorld(toy_world.default_toy_config(), seed=0, num_examples=8)
    for i in range(len(src)):
        rec = src[i]
        want = world[rec["index"]]
        np.testing.assert_array_equal(rec["video"], want["video"])
        assert rec["caption"] == want["caption"] and rec["ground_truth"] == want["ground_truth"]
    assert sorted(sources.TfdsSource("sora_toy_world", "test", data_dir)[i]["index"] for i in range(2)) == [6, 7]
    c = data_config_lib.default_data_config()
    c.source, c.tfds_name, c.tfds_dir, c.tfds_eval_split = "tfds", "sora_toy_world", data_dir, "test"
    c.pixels, c.frames, c.num_eval = 32 * 32, 5, 2
    batches = list(pipeline.pixel_batches(c, "eval"))
    assert sorted(int(i) for b in batches for i in b["index"] if i >= 0) == [6, 7]


def test_tfds_dataset_by_name_with_label_captions(tmp_path):
    """A 'real' TFDS video set (UCF101-like layout), prepared locally by a builder made here."""
    import tensorflow_datasets as tfds

    class TinyActions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(shape=(None, None, None, 1), dtype=np.uint8, encoding="zlib"),
                "label": tfds.features.ClassLabel(names=["ApplyEyeMakeup", "Biking"]),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(4)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"video": np.full((3, 16, 24, 1), 40 * i, np.uint8), "label": i % 2}

    data_dir = str(tmp_path / "tfds")
    TinyActions(data_dir=data_dir, file_format="array_record").download_and_prepare()
    src = sources.TfdsSource("tiny_actions", "train", data_dir)
    recs = [src[i] for i in range(len(src))]
    assert all(r["video"].shape == (3, 16, 24, 3) for r in recs)  # grayscale -> RGB
    assert {r["caption"] for r in recs} == {"a video of apply eye makeup", "a video of biking"}
    with pytest.raises(sources.DataError, match="not_prepared_set"):
        sources.TfdsSource("not_prepared_set", "train", data_dir)
