"""DiT model tests: RoPE, packing invariance, masks, adaLN-Zero, bf16, scan == unrolled, sharding."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax import sharding
from sora_jax.models import attention, dit
from sora_jax.models.patches import grid_positions


def tiny_config(**overrides):
    cfg = dit.dit_config("micro")
    cfg.latent_channels = 4
    cfg.text.update(max_len=6, width=32, depth=1, heads=2, mlp_dim=64, vocab_size=64)
    cfg.update(overrides)
    return cfg


def randomize(model, seed=1, scale=0.2):
    """Replace the zero-initialised adaLN/final weights so outputs are non-trivial.

    The noise is drawn with numpy: a jitted jax.random version compiled for ~6 s per call."""
    leaves, tree = jax.tree.flatten(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(seed)
    leaves = [l + jnp.asarray(scale * rng.standard_normal(l.shape), l.dtype) for l in leaves]
    nnx.update(model, jax.tree.unflatten(tree, leaves))
    return model


def example(grid, seed, cfg, caption_len=4):
    rng = np.random.default_rng(seed)
    n = int(np.prod(grid))
    p = int(np.prod(cfg.patch)) * cfg.latent_channels
    ids = np.zeros((cfg.text.max_len,), np.int32)
    ids[:caption_len] = rng.integers(2, cfg.text.vocab_size, caption_len)
    return dict(x=rng.normal(size=(n, p)).astype(np.float32), t=rng.uniform(size=(n,)).astype(np.float32),
                pos=grid_positions(grid), ids=ids)


def pack(examples, length, slots):
    """Packs examples into one row of `length` tokens (rest padding), as the data pipeline does."""
    p = examples[0]["x"].shape[1]
    x, t = np.zeros((1, length, p), np.float32), np.zeros((1, length), np.float32)
    pos, seg = np.zeros((1, length, 3), np.int32), np.zeros((1, length), np.int32)
    ids = np.zeros((1, slots, examples[0]["ids"].shape[0]), np.int32)
    start = 0
    for k, e in enumerate(examples):
        n = e["x"].shape[0]
        x[0, start:start + n], t[0, start:start + n], pos[0, start:start + n] = e["x"], e["t"], e["pos"]
        seg[0, start:start + n] = k + 1
        ids[0, k] = e["ids"]
        start += n
    return x, t, pos, seg, ids


def test_rope_relative_position():
    head_dim = 24
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, head_dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, head_dim)), jnp.float32)

    def score(pq, pk):
        cq, sq = attention.rope_angles(jnp.array([[pq]]), head_dim, 100.0)
        ck, sk = attention.rope_angles(jnp.array([[pk]]), head_dim, 100.0)
        return float(jnp.sum(attention.apply_rope(q, cq, sq, head_dim) * attention.apply_rope(k, ck, sk, head_dim)))

    base = score((3, 1, 4), (1, 5, 2))
    assert abs(score((10, 7, 9), (8, 11, 7)) - base) < 1e-4  # same (2, -4, 2) difference
    assert abs(score((3, 1, 4), (1, 5, 3)) - base) > 1e-3  # a different difference changes it
    assert attention.rope_split(64) == (24, 20, 20) and attention.rope_split(72) == (24, 24, 24)


def test_rope_pairs_channel_i_with_i_plus_half_and_each_axis_turns_its_own_columns():
    """The layout apply_rope documents: pair (i, i + head_dim/2) turns by table column i, columns
    [0, 12) follow t, [12, 22) h and [22, 32) w for head_dim 64; it is a rotation (norms kept)."""
    head_dim, half = 64, 32
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1, 1, head_dim)), jnp.float32)
    rot = lambda pos: attention.apply_rope(x, *attention.rope_angles(jnp.array([[pos]]), head_dim, 100.0), head_dim)
    np.testing.assert_allclose(rot((0, 0, 0)), x, atol=1e-7)
    np.testing.assert_allclose(jnp.linalg.norm(rot((3, 5, 7))), jnp.linalg.norm(x), rtol=1e-6)
    for axis, cols in enumerate([range(0, 12), range(12, 22), range(22, 32)]):
        pos = [0, 0, 0]
        pos[axis] = 3
        moved = np.flatnonzero(np.abs(np.asarray(rot(tuple(pos)) - x))[0, 0, 0] > 1e-6)
        expected = [*cols, *(c + half for c in cols)]
        assert set(moved) <= set(expected) and len(moved) > len(expected) // 2, (axis, moved)
        a, b = x[0, 0, 0, cols.start], x[0, 0, 0, cols.start + half]  # column 0 of the block: frequency 1
        np.testing.assert_allclose(rot(tuple(pos))[0, 0, 0, [cols.start, cols.start + half]],
                                   [a * np.cos(3) - b * np.sin(3), a * np.sin(3) + b * np.cos(3)], rtol=1e-5)


def test_adaln_zero_output_is_zero_at_init():
    cfg = tiny_config()
    model = dit.create_dit(cfg)
    ex = example((2, 2, 2), 0, cfg)
    fwd = nnx.jit(lambda m, x, t, p, s, i: m(x, t, p, s, text_ids=i))
    out = fwd(model, ex["x"][None], ex["t"][None], ex["pos"][None], np.ones((1, 8), np.int32), ex["ids"][None, None])
    assert out.shape == (1, 8, 16)
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_packing_invariance_and_mask():
    cfg = tiny_config()
    model = randomize(dit.create_dit(cfg))
    exs = [example((2, 2, 3), 0, cfg, 4), example((1, 3, 2), 1, cfg, 0)]  # second: empty (dropped) caption
    fwd = nnx.jit(lambda m, x, t, p, s, i: m(x, t, p, s, text_ids=i))
    packed = np.asarray(fwd(model, *pack(exs, 20, 3)))
    start = 0
    for e in exs:
        n = e["x"].shape[0]
        alone = np.asarray(fwd(model, *pack([e], n, 1)))
        np.testing.assert_allclose(packed[0, start:start + n], alone[0], atol=2e-5, rtol=1e-4)
        assert np.all(np.isfinite(alone))
        start += n
    # Changing example 2's tokens and caption leaves example 1's outputs unchanged.
    exs2 = [exs[0], dict(exs[1], x=exs[1]["x"] + 3.0, ids=exs[0]["ids"])]
    packed2 = np.asarray(fwd(model, *pack(exs2, 20, 3)))
    np.testing.assert_allclose(packed2[0, :12], packed[0, :12], atol=1e-5)
    assert not np.allclose(packed2[0, 12:18], packed[0, 12:18], atol=1e-3)
    # The bucketed shortcut (segment_ids=None, text [B, S]) gives the same answer as slot 1.
    x, t, p, s, i = pack([exs[0]], 12, 1)
    short = nnx.jit(lambda m, x, t, p, i: m(x, t, p, None, text_ids=i))(model, x, t, p, i[:, 0])
    np.testing.assert_allclose(np.asarray(short), packed[:, :12], atol=2e-5, rtol=1e-4)


def test_precomputed_text_and_per_example_time():
    cfg = tiny_config()
    cfg.text.encoder = "precomputed"
    cfg.text.emb_dim = 12
    model = randomize(dit.create_dit(cfg))
    ex = example((1, 2, 2), 0, cfg)
    emb = np.random.default_rng(0).normal(size=(1, 1, 6, 12)).astype(np.float32)
    mask = np.array([[[1, 1, 1, 0, 0, 0]]], bool)
    seg = np.ones((1, 4), np.int32)
    t_tok = np.full((1, 4), 0.3, np.float32)
    a = model(ex["x"][None], t_tok, ex["pos"][None], seg, text_emb=emb, text_mask=mask)
    b = model(ex["x"][None], np.array([0.3], np.float32), ex["pos"][None], seg, text_emb=emb, text_mask=mask)
    # Outputs reach ~13 here, so allow float rounding relative to them (measured 2.3e-5 relative at LLVM level 0).
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    emb2 = emb.copy()
    emb2[..., 3:, :] = 100.0  # masked text positions do not matter
    c = model(ex["x"][None], t_tok, ex["pos"][None], seg, text_emb=emb2, text_mask=mask)
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5)
    empty = model(ex["x"][None], t_tok, ex["pos"][None], seg, text_emb=emb, text_mask=np.zeros_like(mask))
    assert np.all(np.isfinite(np.asarray(empty)))


def test_class_conditional_and_bf16():
    cfg = tiny_config(num_classes=10, cross_attention=False, compute_dtype="bfloat16")
    model = randomize(dit.create_dit(cfg))
    ex = example((1, 2, 2), 0, cfg)
    out = model(ex["x"][None], np.array([0.5], np.float32), ex["pos"][None], None, class_labels=np.array([3]))
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))
    assert nnx.state(model, nnx.Param)["patch_embed"]["kernel"][...].dtype == jnp.float32
    out_null = model(ex["x"][None], np.array([0.5], np.float32), ex["pos"][None], None, class_labels=np.array([10]))
    assert not np.allclose(np.asarray(out, np.float32), np.asarray(out_null, np.float32))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_recompute_attention_matches_reference_with_grads(dtype, tol):
    """The custom-VJP attention (no [Lq, Lk] residuals) equals jax.nn.dot_product_attention in
    value and in all three gradients: no mask, a packed-row segment mask (padding segment 0
    included), a cross-attention mask with Lq != Lk, and a fully masked row."""
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (2, 12, 3, 8))
    kv_len = {"none": 12, "segments": 12, "cross": 7, "empty_row": 7}
    seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])
    for case, lk in kv_len.items():
        k, v = jax.random.normal(ks[1], (2, lk, 3, 8)), jax.random.normal(ks[2], (2, lk, 3, 8))
        mask = {"none": None, "segments": attention.segment_mask(seg, seg),
                "cross": jax.random.uniform(ks[3], (2, 1, 12, lk)) > 0.4,
                "empty_row": (jax.random.uniform(ks[3], (2, 1, 12, lk)) > 0.4).at[:, :, 2].set(False)}[case]
        w = jax.random.normal(ks[4], (2, 12, 3, 8))

        def loss(fn, q, k, v):
            return jnp.sum(fn(q, k, v, mask).astype(jnp.float32) * w)

        ref = lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, implementation="xla")
        args = [a.astype(dtype) for a in (q, k, v)]
        ref_args = [a.astype(jnp.float32) for a in args]
        out = attention.recompute_attention(*args, mask)
        assert out.dtype == dtype
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref(*ref_args, mask)), atol=tol, err_msg=case)
        grads = jax.grad(lambda *a: loss(attention.recompute_attention, *a), argnums=(0, 1, 2))(*args)
        ref_grads = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(*ref_args)
        for name, g, r in zip("qkv", grads, ref_grads):
            assert g.dtype == dtype
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), atol=tol * 4, err_msg=f"{case} d{name}")


def _all_eqns(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (custom VJPs, scans, ...) included."""
    from jax.extend.core import jaxprs_in_params

    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)


def test_recompute_attention_backward_has_one_transposed_operand_matmul():
    """The backward runs on the transposed scores, so of its batched matmuls only dQ contracts a
    leading axis of its left operand (XLA:CPU runs those in Eigen at about half the rate); the
    textbook form has two (dV = P^T dO and dK = dS^T Q)."""
    q = jnp.ones((2, 12, 3, 8))
    loss = lambda q, k, v: jnp.sum(attention.recompute_attention(q, k, v, None))
    found = [(eqn.invars[0].aval.ndim, tuple(eqn.params["dimension_numbers"][0][0]))
             for eqn in _all_eqns(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q).jaxpr)
             if eqn.primitive.name == "dot_general"]
    assert len(found) == 7  # forward 2, backward 5 (scores recomputed, dV, dP, dK, dQ)
    assert sum(contract != (ndim - 1,) for ndim, contract in found) == 1


def test_layer_invariant_projections_run_before_the_layer_scan():
    """With per-example time, the adaLN modulations and the text keys/values of every layer are
    computed before the scan (no [D, 6, D] or [D, 2, heads, head_dim] kernel is used inside
    its body); per-token modulations stay inside. Both give the same loss and gradients."""
    cfg = tiny_config()
    d, h = cfg.width, cfg.heads
    exs = [example((2, 2, 2), 0, cfg), example((1, 2, 2), 1, cfg)]
    x, t, pos, seg, ids = pack(exs, 14, 2)
    model = randomize(dit.create_dit(cfg))
    graphdef, params = nnx.split(model, nnx.Param)
    t_example, t_token = np.array([0.3], np.float32), np.full(t.shape, 0.3, np.float32)

    def loss(p, t):
        return jnp.mean(nnx.merge(graphdef, p)(x, t, pos, seg, text_ids=ids) ** 2)

    def kernels_in_scan(t):
        jaxpr = jax.make_jaxpr(loss)(params, t).jaxpr
        (scan,) = [e for e in _all_eqns(jaxpr) if e.primitive.name == "scan"]
        shapes = {v.aval.shape for e in _all_eqns(scan.params["jaxpr"].jaxpr) if e.primitive.name == "dot_general"
                  for v in e.invars}
        return (d, 6, d) in shapes, (d, 2, h, d // h) in shapes

    assert kernels_in_scan(t_example) == (False, False)
    assert kernels_in_scan(t_token) == (True, False)
    (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(loss))(params, t) for t in (t_example, t_token))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype,head_dim,on_operand", [(jnp.float32, 8, True), (jnp.bfloat16, 16, True),
                                                       (jnp.bfloat16, 8, False)])
def test_attention_scale_is_applied_to_an_operand_not_the_scores(dtype, head_dim, on_operand):
    """The forward multiplies no [B, N, Lq, Lk] tensor by the softmax scale (XLA:CPU ran that as a
    pass of its own over the scores) except for a bf16 operand with a non-power-of-two scale,
    whose rounding would be coarse; the power-of-two bf16 case still matches fp32 math."""
    q = jax.random.normal(jax.random.key(0), (2, 12, 3, head_dim)).astype(dtype)
    k = jax.random.normal(jax.random.key(1), (2, 10, 3, head_dim)).astype(dtype)
    jaxpr = jax.make_jaxpr(lambda q, k: attention.recompute_attention(q, k, k, None))(q, k).jaxpr
    score_muls = [e for e in _all_eqns(jaxpr) if e.primitive.name == "mul" and e.outvars[0].aval.shape == (2, 3, 12, 10)]
    assert (not score_muls) == on_operand
    ref = jax.nn.dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, k)), implementation="xla")
    out = attention.recompute_attention(q, k, k, None).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5 if dtype == jnp.float32 else 3e-2)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the bf16 projection path is XLA:CPU's")
def test_bf16_projection_matches_fp32_and_keeps_its_matmuls_in_bf16():
    """attention.project with bf16 inputs on CPU: value and gradients match fp32 math to bf16
    tolerance, the weight and bias gradients come back in fp32, and every matmul of the
    forward and backward pass takes bf16 operands (the point of its custom VJP)."""
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (2, 5, 16)).astype(jnp.bfloat16)
    w = jax.random.normal(ks[1], (16, 3, 4)) * 0.25
    b = jax.random.normal(ks[2], (3, 4))
    probe = jax.random.normal(ks[3], (2, 5, 3, 4))

    def loss(x, w, b):
        return jnp.sum(attention.project(x, w, b).astype(jnp.float32) * probe)

    def ref_loss(x, w, b):
        return jnp.sum((jnp.einsum("blc,cnh->blnh", x, w) + b) * probe)

    out = attention.project(x, w, b)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 5, 3, 4)
    ref = jnp.einsum("blc,cnh->blnh", x.astype(jnp.float32), w) + b
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=3e-2, rtol=1e-2)
    grads = jax.grad(loss, argnums=(0, 1, 2))(x, w, b)
    ref_grads = jax.grad(ref_loss, argnums=(0, 1, 2))(x.astype(jnp.float32), w, b)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32, jnp.float32]
    for name, g, r in zip(("dx", "dw", "db"), grads, ref_grads):
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), atol=2e-2 * scale, err_msg=name)
    # Operand dtypes of every dot in the compiled program (XLA:CPU upcasts the plain-autodiff
    # version's dots to fp32, which is what the custom VJP is for).
    hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, w, b).compile().as_text()
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    dots = [(types[a], types[c]) for a, c in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]
    assert dots == [("bf16", "bf16")] * 3, dots  # forward, dx, dw


@pytest.mark.parametrize("in_dim,out_shape", [(8, (3, 4, 8)), (48, (6,)), (16, None)])
def test_fp32_projection_equals_plain_autodiff(in_dim, out_shape):
    """attention.project in fp32 (its CPU custom VJP picks which operand of the weight gradient
    XLA transposes: both branches, in < out and in > out, a multi-axis output, no bias) gives
    the value and gradients of plain autodiff of x @ w + b."""
    out_shape = out_shape or (in_dim // 2,)
    ks = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(ks[0], (3, 7, in_dim))
    w = jax.random.normal(ks[1], (in_dim, *out_shape))
    b = None if len(out_shape) == 1 and out_shape[0] == in_dim // 2 else jax.random.normal(ks[2], out_shape)
    probe = jax.random.normal(ks[3], (3, 7, *out_shape))
    plain = lambda x, w, b: jnp.tensordot(x, w, 1) + (0.0 if b is None else b)
    argnums = (0, 1) if b is None else (0, 1, 2)
    grads = jax.grad(lambda *a: jnp.sum(attention.project(*a) * probe), argnums)(x, w, b)
    ref = jax.grad(lambda *a: jnp.sum(plain(*a) * probe), argnums)(x, w, b)
    np.testing.assert_allclose(attention.project(x, w, b), plain(x, w, b), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref):
        assert g.shape == r.shape and g.dtype == jnp.float32
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)


# "full" is slow-marked (127 s on the 2-core AVX2 machine); "minimal" (the bench default) stays in the default run.
@pytest.mark.parametrize("policy", [pytest.param("full", marks=pytest.mark.slow), "minimal"])
def test_scan_equals_unrolled_with_grads(policy):
    """Scanned blocks under a remat policy give the loss and gradients of unrolled blocks without remat."""
    exs = [example((2, 2, 2), 0, tiny_config()), example((1, 2, 2), 1, tiny_config())]
    batch = pack(exs, 14, 2)
    results = []
    for scan, policy in ((True, policy), (False, "none")):
        model = randomize(dit.create_dit(tiny_config(scan_layers=scan, remat_policy=policy)))

        def loss(m):
            return jnp.mean(m(*batch[:4], text_ids=batch[4]) ** 2)

        results.append(nnx.jit(lambda m: nnx.value_and_grad(loss)(m))(model))
    (l1, g1), (l2, g2) = results
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_minimal_remat_runs_each_attention_forward_once():
    """Remat "minimal" keeps the attention outputs and softmax statistics, so its gradient
    program has exactly the batched (attention) matmuls of no remat at all: the attention
    forward is not re-run in the backward pass to rebuild its residuals ("full" re-runs it)."""
    exs = [example((2, 2, 2), 0, tiny_config()), example((1, 2, 2), 1, tiny_config())]
    batch = pack(exs, 14, 2)

    def batched_dots(policy):
        model = randomize(dit.create_dit(tiny_config(remat_policy=policy)))
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(*batch[:4], text_ids=batch[4]) ** 2)
        hlo = jax.jit(jax.value_and_grad(loss)).lower(params).as_text()
        return sum("batching_dims" in line for line in hlo.splitlines() if "dot_general" in line)

    counts = {policy: batched_dots(policy) for policy in ("none", "minimal", "full")}
    assert counts["none"] > 0 and counts["minimal"] == counts["none"] < counts["full"], counts


def test_dense_under_fsdp_and_tensor_mesh_keeps_batch_rows():
    """The one-matmul XLA miscompile behind the old fsdp failure (see sharding.gather_for_compute).

    x [B over (data, fsdp), K over tensor] @ w [K over tensor, N over fsdp] wanted as
    [B over (data, fsdp), N over tensor]: jax 0.10.2 swaps rows 1 and 2 unless w is gathered over fsdp.
    """
    mesh, rules = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), sharding.DEFAULT_RULES
    x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    with nnx.use_eager_sharding(False):
        layer = attention.Dense(8, 8, ("mlp", "embed"), rngs=nnx.Rngs(0))
    w = np.asarray(layer.kernel[...])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        layer.kernel[...] = jax.device_put(w, sharding.logical_sharding(mesh, ("mlp", "embed"), rules))
        layer.bias[...] = jax.device_put(np.asarray(layer.bias[...]), sharding.logical_sharding(mesh, ("embed",), rules))
        gathered = sharding.gather_for_compute(layer.kernel[...], ("mlp", "embed"))
        assert gathered.sharding.is_equivalent_to(jax.NamedSharding(mesh, jax.P("tensor", None)), 2)
        xs = jax.device_put(x, sharding.logical_sharding(mesh, ("activation_batch", "activation_mlp"), rules))
        y = nnx.jit(lambda m, x: sharding.constrain(m(x), ("activation_batch", "activation_mlp")))(layer, xs)
    np.testing.assert_allclose(np.asarray(y), x @ w + np.asarray(layer.bias[...]), atol=1e-5)


def _loss_and_grads(model, x, t, pos, seg, ids, target):
    """Row-weighted squared error: rows that trade places (the fsdp bug) change the loss."""
    def loss(m):
        out = m(x, t, pos, seg, text_ids=ids)
        weights = jnp.arange(1, out.shape[0] + 1, dtype=out.dtype)[:, None, None]
        return jnp.mean(weights * (out - target) ** 2), out
    return nnx.value_and_grad(loss, has_aux=True)(model)


@pytest.fixture(scope="module")
def unsharded_step():
    """A randomized micro DiT, a 4-row batch and its unsharded loss, output and gradients."""
    cfg = tiny_config()
    exs = [example((2, 2, 2), i, cfg) for i in range(4)]
    rows = [pack([exs[i]], 8, 1) for i in range(4)]
    batch = [np.concatenate([r[j] for r in rows]) for j in range(5)]
    batch.append(np.random.default_rng(9).normal(size=(4, 8, 16)).astype(np.float32))
    model = randomize(dit.create_dit(cfg))
    (loss, out), grads = nnx.jit(_loss_and_grads)(model, *batch)
    return model, batch, (float(loss), np.asarray(out), jax.tree.map(np.asarray, nnx.state(grads)))


@pytest.mark.parametrize("axes", [{"data": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_loss_and_grads_match_unsharded(unsharded_step, axes):
    """Forward, loss and every gradient on 8 devices equal the 1-device values.

    data=2, fsdp=2, tensor=2 used to swap batch rows 1 and 2 (an XLA SPMD partitioner
    bug with fsdp-sharded ("mlp", "embed") kernels; see sharding.gather_for_compute).
    """
    model, batch, (ref_loss, ref_out, ref_grads) = unsharded_step
    mesh, rules = sharding.make_mesh(axes), sharding.DEFAULT_RULES
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        # Place the reference values as the logical annotations say (as the train loop does).
        shardings = jax.tree.leaves(sharding.state_shardings(nnx.state(model), mesh))
        graphdef, state = nnx.split(model)
        leaves, tree = jax.tree.flatten(state)
        sharded = nnx.merge(graphdef, jax.tree.unflatten(tree, [jax.device_put(a, s) for a, s in zip(leaves, shardings)]))
        kernel = nnx.state(sharded)["blocks"]["fc1"]["kernel"][...]
        want = sharding.logical_sharding(mesh, ("layers", "embed", "mlp"), rules)
        assert kernel.sharding.is_equivalent_to(want, kernel.ndim) and len(kernel.sharding.device_set) == 8
        rows = sharding.logical_sharding(mesh, ("activation_batch",), rules)
        (loss, out), grads = nnx.jit(_loss_and_grads)(sharded, *[jax.device_put(a, rows) for a in batch])
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    for (path, g), ref in zip(jax.tree_util.tree_flatten_with_path(nnx.state(grads))[0], jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())), rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


def test_variants_and_errors():
    assert dit.decode_variant("XL/2") == dict(width=1152, depth=28, heads=16, mlp_dim=4608, patch=(1, 2, 2))
    assert dit.decode_variant("S/2.4")["patch"] == (2, 4, 4)
    assert dit.decode_variant("bench-small")["width"] == 384
    with pytest.raises(ValueError, match="unknown DiT variant"):
        dit.decode_variant("Q/2")
    with pytest.raises(ValueError, match="remat_policy"):
        dit.create_dit(tiny_config(remat_policy="bogus"))
