"""Task-mix sampling and the per-token conditioning mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion import conditioning as cond
from sora_jax.diffusion import rectified_flow as rf
from sora_jax.models import patches


def _packed_row(shapes, length):
    """One packed row of examples with grid shapes `shapes` (patch units), then padding."""
    seg = np.zeros((length,), np.int32)
    pos = np.zeros((length, 3), np.int32)
    start = 0
    for k, g in enumerate(shapes):
        p = patches.grid_positions(g)
        seg[start : start + len(p)] = k + 1
        pos[start : start + len(p)] = p
        start += len(p)
    return seg, pos


def _cfg(**tasks):
    c = rf.default_diffusion_config()
    c.tasks = {name: 0.0 for name in cond.TASKS} | tasks
    return c


SHAPES = [(4, 2, 2), (1, 2, 3), (6, 1, 2)]  # video, image, video


def _batch():
    seg, pos = _packed_row(SHAPES, 40)
    slot_shape = np.array([SHAPES + [(0, 0, 0)]], np.int32)
    return jnp.asarray(seg[None]), jnp.asarray(pos[None]), jnp.asarray(slot_shape)


def _given_frames(mask, seg, pos, slot):
    sel = np.asarray(seg[0]) == slot + 1
    m, t = np.asarray(mask[0])[sel], np.asarray(pos[0, :, 0])[sel]
    given = sorted(set(t[m].tolist()))
    # A frame is given or not as a whole.
    for f in set(t.tolist()):
        assert m[t == f].all() or not m[t == f].any()
    return given


def test_i2v_marks_exactly_frame_zero_and_images_get_t2v():
    seg, pos, slot_shape = _batch()
    tasks = cond.sample_tasks(jax.random.key(0), slot_shape, _cfg(i2v=1.0))
    assert tasks["task"][0].tolist()[:3] == [1, 0, 1]  # the image falls back to t2v
    mask = cond.frames_mask(tasks["head"], tasks["tail"], pos, seg, slot_shape)
    assert _given_frames(mask, seg, pos, 0) == [0]
    assert _given_frames(mask, seg, pos, 1) == []
    assert _given_frames(mask, seg, pos, 2) == [0]
    assert not np.asarray(mask[0])[np.asarray(seg[0]) == 0].any()  # padding is never conditioning


def test_loop_marks_first_and_last_frames():
    seg, pos, slot_shape = _batch()
    tasks = cond.sample_tasks(jax.random.key(1), slot_shape, _cfg(loop=1.0))
    mask = cond.frames_mask(tasks["head"], tasks["tail"], pos, seg, slot_shape)
    assert _given_frames(mask, seg, pos, 0) == [0, 3]
    assert _given_frames(mask, seg, pos, 2) == [0, 5]


@pytest.mark.parametrize("name", ["extend_forward", "extend_backward", "connect"])
def test_extension_and_connect_give_head_or_tail_blocks(name):
    seg, pos, slot_shape = _batch()
    seen = set()
    for i in range(30):
        tasks = cond.sample_tasks(jax.random.key(i), slot_shape, _cfg(**{name: 1.0}))
        mask = cond.frames_mask(tasks["head"], tasks["tail"], pos, seg, slot_shape)
        for slot, frames in ((0, 4), (2, 6)):
            given = _given_frames(mask, seg, pos, slot)
            assert 1 <= len(given) <= frames - 1  # at least one frame left to generate
            head = [f for f in given if f < frames // 2]
            tail = [f for f in given if f >= frames // 2]
            if name == "extend_forward":
                assert given == list(range(len(given))) and len(given) <= max(1, frames // 2)
            elif name == "extend_backward":
                assert given == list(range(frames - len(given), frames))
            else:
                assert head == list(range(len(head))) and head and tail
                assert tail == list(range(frames - len(tail), frames))
            seen.add((slot, len(given)))
    if name != "connect":
        assert (2, 2) in seen and (2, 3) in seen  # k varies


def test_task_mix_frequencies_follow_weights():
    slot_shape = jnp.tile(jnp.array([[[5, 2, 2]]]), (2000, 1, 1))
    tasks = cond.sample_tasks(jax.random.key(3), slot_shape, _cfg(t2v=0.5, i2v=0.25, loop=0.25))
    counts = np.bincount(np.asarray(tasks["task"]).ravel(), minlength=6) / 2000
    np.testing.assert_allclose(counts, [0.5, 0.25, 0, 0, 0.25, 0], atol=0.04)


def test_bad_task_config_is_rejected():
    with pytest.raises(ValueError, match="unknown tasks"):
        cond.task_weights(_cfg(i2x=1.0))
    with pytest.raises(ValueError, match="positive sum"):
        cond.task_weights(_cfg())


def test_caption_dropout_pads_dropped_slots():
    ids = jnp.arange(1, 1 + 64 * 3 * 5).reshape(64, 3, 5)
    dropped, out = cond.drop_captions(jax.random.key(0), 0.5, (64, 3), text_ids=ids)
    d = np.asarray(dropped)
    assert 0.3 < d.mean() < 0.7
    assert (np.asarray(out["text_ids"])[d] == 0).all()
    np.testing.assert_array_equal(np.asarray(out["text_ids"])[~d], np.asarray(ids)[~d])
