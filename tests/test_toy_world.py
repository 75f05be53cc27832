"""The toy world: determinism, native sizes, exact ground truth, captions that agree with it."""

import json
import math

import ml_collections
import numpy as np
import pytest

from sora_jax.data import captions, toy_world
from sora_jax.data.tokenizer import HashTokenizer
from sora_jax.data.toy_world import ToyWorld, ToyWorldConfig

N = 240


@pytest.fixture(scope="module")
def examples():
    world = ToyWorld(seed=0, num_examples=N)
    return [world[i] for i in range(N)]


def _phenomenon_world(**probs):
    base = dict(occlusion_prob=0.0, exit_reenter_prob=0.0, camera_pan_prob=0.0, painter_prob=0.0, image_prob=0.0)
    base.update(probs)
    return ToyWorld(ToyWorldConfig(**base), seed=1, num_examples=1000)


def test_determinism_and_range():
    a, b = ToyWorld(seed=3)[17], ToyWorld(seed=3)[17]
    np.testing.assert_array_equal(a["video"], b["video"])
    assert (a["caption"], a["short_caption"], a["ground_truth"]) == (b["caption"], b["short_caption"], b["ground_truth"])
    other = ToyWorld(seed=4)[17]
    assert other["ground_truth"] != a["ground_truth"]
    world = ToyWorld(num_examples=5)
    assert len(world) == 5
    with pytest.raises(IndexError):
        world[5]
    with pytest.raises(IndexError):
        world[-1]


def test_record_types(examples):
    r = examples[0]
    assert set(r) == {"video", "caption", "short_caption", "fps", "index", "ground_truth"}
    assert r["video"].dtype == np.uint8 and r["video"].ndim == 4 and r["video"].shape[-1] == 3
    assert isinstance(r["caption"], str) and isinstance(r["fps"], float) and r["index"] == 0
    gt = toy_world.parse_ground_truth({"ground_truth": r["ground_truth"].encode()})
    T, H, W = r["video"].shape[:3]
    assert (gt["num_frames"], gt["height"], gt["width"]) == (T, H, W)
    for o in gt["objects"]:
        assert {"shape", "color", "rgb", "size", "motion"} <= set(o)
        for key in ("center", "box", "visible", "in_frame", "behind_occluder"):
            assert len(o["frames"][key]) == T


def test_every_aspect_and_duration_within_budget(examples):
    cfg = ToyWorldConfig()
    sizes, counts = set(), set()
    for r in examples:
        gt = json.loads(r["ground_truth"])
        T, H, W, _ = r["video"].shape
        assert H * W <= cfg.pixel_budget and H % cfg.size_multiple == 0 and W % cfg.size_multiple == 0
        a, b = (float(x) for x in gt["aspect"].split(":"))
        assert abs(math.log((W / H) / (a / b))) < 0.2, (gt["aspect"], H, W)
        assert H * W >= 0.85 * cfg.pixel_budget
        sizes.add(gt["aspect"])
        counts.add(T)
    assert sizes == set(cfg.aspect_ratios)
    assert counts == set(cfg.frame_counts) == {1, 5, 9, 13, 17}


def test_config_round_trip_and_validation():
    cd = toy_world.default_toy_config()
    assert isinstance(cd, ml_collections.ConfigDict)
    assert ToyWorldConfig.from_config(cd) == ToyWorldConfig()
    cfg = ToyWorldConfig.from_config({"aspect_ratios": ["1:1"], "max_frames": 1, "pixel_budget": 32 * 32})
    world = ToyWorld(cfg, num_examples=4)
    assert all(world[i]["video"].shape == (1, 32, 32, 3) for i in range(4))
    with pytest.raises(ValueError, match="colour|colors"):
        ToyWorldConfig(colors=("red", "mauve"))
    with pytest.raises(ValueError, match="unknown toy world config"):
        ToyWorldConfig.from_config({"num_objcts": 2})
    with pytest.raises(ValueError, match="aspect"):
        ToyWorldConfig(aspect_ratios=("wide",))


def _occluded_per_gt(o):
    """Independent reading of the per-frame numbers: half hidden by an occluder, later half visible."""
    fr = o["frames"]
    for t, b in enumerate(fr["behind_occluder"]):
        if b >= 0.5:
            return any(v >= 0.5 for v in fr["visible"][t + 1:])
    return False


def test_captions_agree_with_ground_truth(examples):
    openings = set()
    for r in examples:
        gt = json.loads(r["ground_truth"])
        text = r["caption"].lower()
        assert captions.missing_facts(r["caption"], captions.caption_facts(gt)) == [], r["caption"]
        words = set(text.replace(".", " ").replace(",", " ").replace(";", " ").split())
        for o in gt["objects"]:
            assert {o["color"], o["shape"], o["size"]} <= words, (o, text)
        multi_frame = gt["num_frames"] > 1
        assert ("behind" in words) == any(_occluded_per_gt(o) for o in gt["objects"]), text
        assert ("pans" in words) == (multi_frame and gt["camera"]["pan_velocity"] != [0.0, 0.0]), text
        assert ("trail" in words or "stroke" in words) == (multi_frame and gt["painter"] is not None), text
        if any(o["motion"] == "bouncing" for o in gt["objects"]) and multi_frame:
            assert "bounces" in words or "bouncing" in words
        if not multi_frame:
            assert "image" in words or "picture" in words
        for c in gt["background"]["colors"]:
            assert c in words
        first = gt["objects"][0]
        assert f"{first['color']} {first['shape']}" in r["short_caption"]
        assert len(r["short_caption"].split()) <= 10
        openings.add(" ".join(text.split()[:2]))
    assert len(openings) >= 10  # wording varies across examples


def test_caption_facts_are_checked_not_assumed():
    gt = json.loads(ToyWorld(seed=0)[3]["ground_truth"])
    facts = captions.caption_facts(gt)
    obj = next(f for f in facts if f[0] == "object")
    assert captions.missing_facts("A video of nothing.", facts)  # an unrelated caption fails
    assert obj in captions.missing_facts("A video of nothing.", facts)


def test_vocabulary_covers_captions_without_hash_collisions(examples):
    vocab = captions.caption_vocabulary()
    tok = HashTokenizer(vocab_size=8192)
    assert tok.collisions(vocab) == {}
    for r in examples:
        assert set(tok.pieces(r["caption"])) <= vocab, set(tok.pieces(r["caption"])) - vocab
        assert set(tok.pieces(r["short_caption"])) <= vocab


def _gt(objects, occluders=(), height=64, width=64):
    return dict(num_frames=1, height=height, width=width, camera={"pan_velocity": [0.0, 0.0], "offsets": [[0, 0]]},
                background={"kind": "solid", "colors": ["black"], "rgb": [[15, 15, 15]], "orientation": "vertical",
                            "period": 8},
                occluders=[dict(kind="bar", color="gray", rgb=[140, 140, 140], box_world=b) for b in occluders],
                painter=None, objects=[dict(id=i, shape=s, rgb=rgb, radius=r, world_centers=[c],
                                            extents=list(toy_world._half_extents(s, r)))
                                       for i, (s, r, c, rgb) in enumerate(objects)])


def test_visible_fraction_exact_in_constructed_cases():
    # A square whose centre sits on the left edge: exactly half of its pixels are in the frame.
    gt = _gt([("square", 8 / 0.886, (0.0, 32.0), [230, 40, 40])])
    video = toy_world.render(gt)
    fr = gt["objects"][0]["frames"]
    assert fr["in_frame"] == [0.5] and fr["visible"] == [0.5] and fr["behind_occluder"] == [0.0]
    assert (video[0] == [230, 40, 40]).all(-1).sum() == 16 * 8
    # A circle centred on a pixel corner with an occluder over its right half.
    gt = _gt([("circle", 10.0, (32.0, 32.0), [50, 100, 240])], occluders=[[32.0, 0.0, 64.0, 64.0]])
    video = toy_world.render(gt)
    fr = gt["objects"][0]["frames"]
    assert fr["in_frame"] == [1.0] and fr["behind_occluder"] == [0.5] and fr["visible"] == [0.5]
    visible_px = (video[0] == [50, 100, 240]).all(-1).sum()
    total = len(toy_world._raster("circle", 10.0, 32.0, 32.0)[0])
    assert visible_px == total // 2
    # An object in front of another hides it: the one behind loses exactly the overlap.
    gt = _gt([("square", 8 / 0.886, (20.0, 20.0), [230, 40, 40]), ("square", 8 / 0.886, (28.0, 20.0), [40, 190, 70])])
    toy_world.render(gt)
    assert gt["objects"][0]["frames"]["visible"] == [0.5] and gt["objects"][1]["frames"]["visible"] == [1.0]


def test_painter_trail_persists():
    world = _phenomenon_world(painter_prob=1.0)
    checked = grew = 0
    for i in range(40):
        r = world[i]
        gt = json.loads(r["ground_truth"])
        if gt["painter"] is None:
            continue
        trail = np.asarray(gt["painter"]["rgb"], np.uint8)
        video = r["video"]
        painted_counts = []
        for t in range(gt["num_frames"] - 1):
            free = np.ones(video.shape[1:3], bool)  # pixels no object box touches at t or t+1
            for o in gt["objects"]:
                for tt in (t, t + 1):
                    x0, y0, x1, y1 = o["frames"]["box"][tt]
                    free[max(0, math.floor(y0) - 1): max(0, math.ceil(y1) + 1), max(0, math.floor(x0) - 1): max(0, math.ceil(x1) + 1)] = False
            painted = (video[t] == trail).all(-1) & free
            assert (video[t + 1][painted] == trail).all(), (i, t)
            painted_counts.append(int((video[t] == trail).all(-1).sum()))
        grew += painted_counts[-1] > painted_counts[0]
        checked += 1
    assert checked >= 20 and grew >= 0.8 * checked  # slow short clips may hide their trail under the painter


def test_camera_pan_shifts_the_background():
    world = _phenomenon_world(camera_pan_prob=1.0)
    checked = 0
    for i in range(30):
        r = world[i]
        gt = json.loads(r["ground_truth"])
        if gt["num_frames"] == 1:
            continue
        assert gt["camera"]["pan_velocity"] != [0.0, 0.0] and gt["background"]["kind"] != "solid"
        video, (H, W) = r["video"], r["video"].shape[1:3]
        t = gt["num_frames"] - 1
        dx, dy = gt["camera"]["offsets"][t]
        assert (dx, dy) != (0, 0)
        # frame t at (y, x) shows the world point that frame 0 showed at (y + dy, x + dx)
        ys, xs = np.mgrid[0:H, 0:W]
        ok = (ys + dy >= 0) & (ys + dy < H) & (xs + dx >= 0) & (xs + dx < W)
        for o in gt["objects"]:  # leave out pixels objects cover in either frame
            for tt, sx, sy in ((t, 0, 0), (0, dx, dy)):
                x0, y0, x1, y1 = o["frames"]["box"][tt]
                ok &= ~((xs + sx >= x0 - 1) & (xs + sx <= x1 + 1) & (ys + sy >= y0 - 1) & (ys + sy <= y1 + 1))
        assert ok.sum() > 0.2 * H * W
        shifted = video[0][np.clip(ys + dy, 0, H - 1), np.clip(xs + dx, 0, W - 1)]
        np.testing.assert_array_equal(video[t][ok], shifted[ok])
        assert (video[t][ok] != video[0][ok]).any()  # and the background really moved on screen
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("prob,fact", [("occlusion_prob", "occluded"), ("exit_reenter_prob", "returns")])
def test_phenomena_happen_when_asked(prob, fact):
    world = _phenomenon_world(**{prob: 1.0})
    hits = total = 0
    for i in range(40):
        r = world[i]
        gt = json.loads(r["ground_truth"])
        if gt["num_frames"] < 9 or (fact == "returns" and len(gt["objects"]) < 1):
            continue
        total += 1
        hits += any(f[0] == fact for f in captions.caption_facts(gt))
    assert total >= 15 and hits >= 0.85 * total, (hits, total)


def test_gallery(tmp_path):
    from sora_jax.data import toy_gallery
    from sora_jax.data.video_io import read_video

    tiles = toy_gallery.make_gallery(str(tmp_path / "g.gif"), n=3, seed=0, cols=2, scale=1)
    frames, _ = read_video(tmp_path / "g.gif")
    assert frames.shape[0] == max(int(t["shape"].split("x")[0]) for t in tiles)
    assert [t["caption"] for t in tiles] == [ToyWorld(seed=0)[i]["caption"] for i in range(3)]
    assert toy_gallery.markdown_table(tiles).count("\n") == 4
