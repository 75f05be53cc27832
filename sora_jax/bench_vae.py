"""VAE benchmark at "vae-small": `python -m sora_jax.bench vae [--runs=N] [--peer [--rounds=R]] [--impl=taps|xla]`.

Times encode (posterior mean) and decode of one 17x64x64 clip (batch 1) with the
bench architecture (configs/vae.py:small, the same 10.1M parameters as the peer),
after compiling. With --peer, runs diffusers' Wan 2.1 VAE at the same configuration
(../shared/bench/run_peer.sh vae) in a subprocess right after, and adds the ratios.
With --rounds=R, ours and the peer alternate R times and the ratios are the medians of
the per-round ratios: on a shared 2-core VM the peer's own encode throughput has moved
by two thirds (39 -> 65 frames/s) between runs minutes apart, so one back-to-back pair can say 0.9x or 1.6x.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

from sora_jax import bench


def _median_time(fn, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m sora_jax.bench vae")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--peer", action="store_true")
    p.add_argument("--rounds", type=int, default=1, help="with --peer: alternate ours and the peer this many times")
    p.add_argument("--impl", default="taps", choices=["taps", "xla"])
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=64)
    opts = p.parse_args(args)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from sora_jax.models import vae as vae_lib

    cfg = vae_lib.vae_config(dict(base_width=32, channel_mult=(1, 2, 4, 4), num_res_blocks=1, decoder_res_blocks=2,
                                  latent_channels=16, temporal_compression=4, mid_attention=True, conv_impl=opts.impl,
                                  patch_shortcut=False))  # the peer's architecture (the shortcut adds 0.4% params)
    with nnx.use_eager_sharding(False):
        model = vae_lib.CausalVAE(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda s, v: nnx.merge(graphdef, s).encode(v)[0])
    decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
    t, hw = opts.frames, opts.size
    video = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, t, hw, hw, 3)), jnp.float32)
    t0 = time.perf_counter()
    z = jax.block_until_ready(encode(state, video))
    jax.block_until_ready(decode(state, z))
    compile_s = time.perf_counter() - t0
    rounds = []  # (encode s, decode s, peer result or None) per round
    for _ in range(max(1, opts.rounds) if opts.peer else 1):
        enc_s = _median_time(lambda: jax.block_until_ready(encode(state, video)), opts.runs)
        dec_s = _median_time(lambda: jax.block_until_ready(decode(state, z)), opts.runs)
        rounds.append((enc_s, dec_s, bench.run_peer("vae", opts.runs) if opts.peer else None))
    enc_s = statistics.median(r[0] for r in rounds)
    dec_s = statistics.median(r[1] for r in rounds)
    flops = vae_lib.vae_forward_flops(cfg, t, hw, hw)
    out = {
        "config": "vae-small", "conv_impl": opts.impl, "input_shape": [1, t, hw, hw, 3], "latent_shape": list(z.shape),
        "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        "encode_frames_per_s": t / enc_s, "decode_frames_per_s": t / dec_s,
        "encode_gflops_per_s": flops["encode"] / enc_s / 1e9, "decode_gflops_per_s": flops["decode"] / dec_s / 1e9,
        "compile_s": compile_s, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "runs": opts.runs, "load_avg_1m": os.getloadavg()[0],
    }
    if opts.peer:
        peers = [r[2] for r in rounds]
        out["peer"] = peers[-1]
        for kind, i in (("encode", 0), ("decode", 1)):
            ratios = [t / r[i] / p[f"{kind}_frames_per_s"] for r, p in zip(rounds, peers)]
            out[f"{kind}_ratio_vs_peer"] = statistics.median(ratios)
            if len(rounds) > 1:
                out[f"{kind}_ratio_rounds"] = ratios
                out[f"{kind}_frames_per_s_rounds"] = [t / r[i] for r in rounds]
                out[f"peer_{kind}_frames_per_s_rounds"] = [p[f"{kind}_frames_per_s"] for p in peers]
        out["rounds"] = len(rounds)
        out["load_avg_1m_after_peer"] = os.getloadavg()[0]
    return out
