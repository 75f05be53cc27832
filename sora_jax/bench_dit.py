"""Benchmark: one DiT training step (forward, backward, AdamW) at "bench-small" on this machine.

bench-small: 16 latent channels, latent 5x16x16, patch (1,2,2) -> 320 tokens per video,
batch 4, width 384, 6 heads, depth 6, MLP 1536, 32 precomputed text tokens of width 512
(as the peer, diffusers' Wan transformer, takes text embeddings), fp32, per-example time.

MFU is measured against the fp32 matmul throughput this script measures itself (a large
jnp.dot, best of several runs, probed before and after every timed round; the best probe
is the denominator and every probe is printed), so it says how close the step is to what XLA:CPU
can do on this machine right now, not to a datasheet peak. Achieved FLOP/s use the
analytic count of sora_jax.flops (3 x forward, attention included).

With --peer --rounds=R, ours and the peer alternate R times and the speedup is the median
of the per-round ratios (on the shared 2-core VM the same step has
ranged 0.63-0.92 s within an hour).

    python -m sora_jax.bench dit [--steps N] [--peer [--rounds R]] [--per_token_time] [--unroll] [--remat POLICY]
                             [--cpu_dot_fusion individual|fused] [--compute_dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sora_jax import bench, flops, xla_options
from sora_jax.models import dit
from sora_jax.models.patches import grid_positions



def bench_config(scan_layers: bool = True, remat_policy: str = "minimal", compute_dtype: str = "float32"):
    cfg = dit.dit_config("bench-small")
    cfg.compute_dtype = compute_dtype
    cfg.text.encoder = "precomputed"
    cfg.text.emb_dim = 512
    cfg.text.max_len = 32
    cfg.scan_layers = scan_layers
    cfg.remat_policy = remat_policy
    return cfg


def matmul_tflops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """Best-of-N throughput of an n x n x n jnp.dot (2 n^3 FLOPs) in `dtype`, accumulating in fp32, in TFLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    dot(a, b).block_until_ready()
    best = min(_timed(lambda: dot(a, b).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best / 1e12


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _run_peer(steps: int) -> dict:
    """The peer's JSON line, or {"error": why} (the peer is optional)."""
    try:
        return bench.run_peer("dit", steps)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def make_batch(cfg, batch: int, thw=(5, 16, 16), text_len: int = 32, per_token_time: bool = False):
    rng = np.random.default_rng(0)
    grid = tuple(a // p for a, p in zip(thw, cfg.patch))
    n = int(np.prod(grid))
    p = int(np.prod(cfg.patch)) * cfg.latent_channels
    return dict(
        x=jnp.asarray(rng.normal(size=(batch, n, p)), jnp.float32),
        target=jnp.asarray(rng.normal(size=(batch, n, p)), jnp.float32),
        t=jnp.asarray(rng.uniform(size=(batch, n) if per_token_time else (batch,)), jnp.float32),
        positions=jnp.asarray(np.broadcast_to(grid_positions(grid), (batch, n, 3))),
        text_emb=jnp.asarray(rng.normal(size=(batch, 1, text_len, cfg.text.emb_dim)), jnp.float32),
        text_mask=jnp.ones((batch, 1, text_len), bool),
    )


def run(args=None) -> dict:
    if args is None or isinstance(args, (list, tuple)):
        ap = argparse.ArgumentParser(prog="python -m sora_jax.bench dit")
        ap.add_argument("--steps", type=int, default=5)
        ap.add_argument("--batch", type=int, default=4)
        ap.add_argument("--peer", action="store_true", help="also time the peer (run_peer.sh dit) in this run")
        ap.add_argument("--rounds", type=int, default=1, help="with --peer: alternate ours and the peer this many times")
        ap.add_argument("--per_token_time", action="store_true", help="t of shape [B, L] instead of [B]")
        # Scan is the default: unrolled, XLA:CPU fuses the residual stream's gradient (summed over
        # all later layers) into every weight-gradient transpose and recomputes it per use.
        ap.add_argument("--unroll", action="store_true", help="unrolled layers instead of jax.lax.scan (slower on CPU)")
        # "minimal" keeps the matmul outputs and recomputes the elementwise ops and attention in the
        # backward pass. On CPU that is faster than saving everything: the step is bound by memory
        # traffic (each layer's residuals written in the forward scan, read back in the backward).
        ap.add_argument("--remat", default="minimal", choices=dit.REMAT_POLICIES, help="remat policy of the blocks")
        # As config.cpu_dot_fusion (xla_options.py); "individual" keeps the unmasked attention
        # softmax out of YNNPACK's score matmul, which did not make the whole step faster.
        ap.add_argument("--cpu_dot_fusion", default="fused", choices=sorted(xla_options.CPU_DOT_FUSION),
                        help="XLA:CPU dot fusion of the step (see sora_jax/xla_options.py)")
        # Not the matched configuration (the bench-small is fp32): for measuring bf16
        # math (fp32 parameters); MFU is then against the bf16 matmul probe.
        ap.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"))
        args = ap.parse_args(list(args or []))
    steps = getattr(args, "steps", 5)
    batch_size = getattr(args, "batch", 4)
    per_token = getattr(args, "per_token_time", False)
    fusion = getattr(args, "cpu_dot_fusion", "fused")

    dtype = getattr(args, "compute_dtype", "float32")
    cfg = bench_config(scan_layers=not getattr(args, "unroll", False), remat_policy=getattr(args, "remat", "minimal"),
                       compute_dtype=dtype)
    model = dit.create_dit(cfg)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-4, b1=0.9, b2=0.99, weight_decay=0.0)
    opt_state = tx.init(params)
    batch = make_batch(cfg, batch_size, per_token_time=per_token)

    def loss_fn(params, batch):
        m = nnx.merge(graphdef, params)
        # Segment ids None: a bucketed batch (one video per row, no padding), as the peer runs.
        out = m(batch["x"], batch["t"], batch["positions"], None,
                text_emb=batch["text_emb"], text_mask=batch["text_mask"])
        return jnp.mean((out.astype(jnp.float32) - batch["target"]) ** 2)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1), compiler_options=xla_options.compiler_options(fusion))
    compile_s = _timed(lambda: train_step.lower(params, opt_state, batch).compile())
    for _ in range(2):  # warm-up
        params, opt_state, loss = train_step(params, opt_state, batch)
    loss.block_until_ready()

    def timed_steps():
        nonlocal params, opt_state, loss
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            params, opt_state, loss = train_step(params, opt_state, batch)
            loss.block_until_ready()
            times.append(time.perf_counter() - start)
        return times

    with_peer = getattr(args, "peer", False)
    rounds = []  # (our step times, peer result or error) per round
    # The matmul probe swings as much as the step on a shared VM (0.39-0.53 TFLOP/s across
    # runs on one 2-core EPYC, 0.16-0.19 within one run on another), so it runs next to every round and the best probe is
    # the denominator: a lull in the probe alone can only lower the MFU, never raise it.
    probes = []
    for _ in range(max(1, getattr(args, "rounds", 1)) if with_peer else 1):
        probes.append(matmul_tflops(dtype=dtype))
        times = timed_steps()
        probes.append(matmul_tflops(dtype=dtype))
        rounds.append((times, _run_peer(steps) if with_peer else None))
    step_s = statistics.median(statistics.median(r[0]) for r in rounds)
    times = [t for r in rounds for t in r[0]]

    n_tokens = batch["x"].shape[0] * batch["x"].shape[1]
    fl = flops.dit_flops(cfg, (5, 16, 16), text_len=32, per_token_time=per_token)
    train_flops = fl["train_flops"] * batch_size
    peak = max(probes)
    achieved = train_flops / step_s / 1e12
    out = dict(
        bench="dit", config="bench-small", batch=batch_size, tokens_per_step=n_tokens,
        per_token_time=per_token, scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy,
        cpu_dot_fusion=fusion, compute_dtype=dtype, devices=jax.device_count(),
        backend=jax.default_backend(), compile_s=round(compile_s, 2),
        step_s_median=step_s, times=times, tokens_per_s=n_tokens / step_s,
        train_flops_per_step=train_flops, achieved_tflops=achieved,
        mfu=achieved / peak, loss=float(loss),
        params=dit.count_params(nnx.merge(graphdef, params)),
    )
    probe_key = "matmul_fp32_tflops" if dtype == "float32" else "matmul_bf16_tflops"
    out[probe_key] = peak
    out[probe_key + "_probes"] = probes
    if with_peer:
        peers = [p for _, p in rounds if "tokens_per_s" in p]
        if not peers:
            out["peer_error"] = rounds[-1][1].get("error")
        else:
            ratios = [n_tokens / statistics.median(r) / p["tokens_per_s"] for r, p in rounds if "tokens_per_s" in p]
            out.update(peer_tokens_per_s=statistics.median(p["tokens_per_s"] for p in peers),
                       peer_step_s=statistics.median(p["step_s_median"] for p in peers),
                       peer_params=peers[-1].get("params"), speedup_vs_peer=statistics.median(ratios))
            out["rounds"] = len(rounds)
            if len(rounds) > 1:
                out.update(speedup_rounds=ratios,
                           tokens_per_s_rounds=[n_tokens / statistics.median(r) for r, _ in rounds],
                           peer_tokens_per_s_rounds=[p["tokens_per_s"] for p in peers])
    return out


if __name__ == "__main__":
    import sys

    print(json.dumps(run(sys.argv[1:])))
