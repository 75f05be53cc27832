"""Analytic parameters and FLOPs of the DiT, its text encoder and the VAE, per example.

Conventions (docs/dit.md has the long form):
  * `forward_flops`: one multiply-add = 2 FLOPs; every matmul of the forward pass,
    attention included (QK^T and AV of self- and cross-attention), adaLN, patch
    embedding, time embedding, final layer, text projection, text encoder. Norms,
    softmax, activations and RoPE are not counted (they are O(L*D), <1-3% here).
  * `train_flops` = 3 x forward (backward = 2 x forward), no remat recompute.
  * `dit_paper_gflops`: the DiT paper's Gflops (one multiply-add = 1, forward only),
    DiT part only, the convention of Peebles & Xie's Table 4, so our numbers can be
    checked against the published table (tests/test_flops.py).
  * Attention is counted per example: an example of N tokens attends to its own N
    tokens and its own 1 + S text tokens (learned null token + caption). A packed
    row computes the dense L_row x L_row product with a mask, so the hardware does
    more work than this "useful" count when rows are packed.
  * Time modulation is per token (a [N, 6D] adaLN projection in every block) when
    `per_token_time` is true -- the default for text-conditioned video models,
    whose conditioning frames are clean -- and per example otherwise (the DiT
    paper's class-conditional models).

CLI: python -m sora_jax.flops --config=configs/X.py:ARG [--json]
The example size comes from `config.flops.latent_thw` (latent T, H, W) for a
"dit" config, and `config.flops.video_thw` (pixel T, H, W) for a "vae" config;
`config.data.latent_thw` / `config.data.video_thw` are used as fallbacks. The
caption length is `config.flops.text_len`, else `config.model.text.max_len`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

import ml_collections


def _get(cfg, dotted: str, default=None):
    for part in dotted.split("."):
        if cfg is None or part not in cfg:
            return default
        cfg = cfg[part]
    return cfg


def text_encoder_macs(text_cfg, text_len: int) -> int:
    """Multiply-adds of the trained text encoder on one caption of `text_len` tokens."""
    w, depth = int(text_cfg.width), int(text_cfg.depth)
    mlp = int(text_cfg.get("mlp_dim", 4 * w))
    per_layer = text_len * (4 * w * w + 2 * w * mlp) + 2 * text_len * text_len * w
    return depth * per_layer


def dit_macs(cfg, latent_thw: Sequence[int], *, text_len: int | None = None,
             per_token_time: bool | None = None) -> dict:
    """Multiply-adds per example, by component, for a latent of (T, H, W)."""
    pt, ph, pw = cfg.patch
    t, h, w = latent_thw
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent (T,H,W)={tuple(latent_thw)} is not divisible by model.patch={tuple(cfg.patch)}")
    n = (t // pt) * (h // ph) * (w // pw)
    d, depth, mlp = int(cfg.width), int(cfg.depth), int(cfg.mlp_dim)
    patch_in = pt * ph * pw * int(cfg.latent_channels)
    patch_out = pt * ph * pw * int(cfg.out_channels or cfg.latent_channels)
    if per_token_time is None:
        per_token_time = not cfg.num_classes
    n_time = n if per_token_time else 1

    macs = {
        "patch_embed": n * patch_in * d,
        "time_embed": n_time * (256 * d + d * d),
        "adaln": depth * n_time * d * 6 * d + n_time * d * 2 * d,
        "qkv_out_proj": depth * n * 4 * d * d,
        "self_attention": depth * 2 * n * n * d,  # QK^T and AV
        "mlp": depth * n * 2 * d * mlp,
        "final_linear": n * d * patch_out,
    }
    if cfg.cross_attention:
        s = int(text_len if text_len is not None else cfg.text.max_len)
        ctx_in = int(cfg.text.width if cfg.text.encoder == "trained" else cfg.text.emb_dim)
        s1 = s + 1  # learned null token per slot
        macs["text_proj"] = s * ctx_in * d
        macs["cross_q_out_proj"] = depth * n * 2 * d * d
        macs["cross_kv_proj"] = depth * s1 * 2 * d * d
        macs["cross_attention"] = depth * 2 * n * s1 * d
        if cfg.text.encoder == "trained":
            macs["text_encoder"] = text_encoder_macs(cfg.text, s)
    return dict(tokens=n, per_token_time=bool(per_token_time), macs=macs)


def dit_flops(cfg, latent_thw, *, text_len=None, per_token_time=None) -> dict:
    info = dit_macs(cfg, latent_thw, text_len=text_len, per_token_time=per_token_time)
    macs = info["macs"]
    dit_only = sum(v for k, v in macs.items() if k != "text_encoder")
    total = sum(macs.values())
    return dict(
        tokens=info["tokens"],
        per_token_time=info["per_token_time"],
        forward_flops=2 * total,
        train_flops=6 * total,
        dit_forward_flops=2 * dit_only,
        text_encoder_forward_flops=2 * macs.get("text_encoder", 0),
        dit_paper_gflops=dit_only / 1e9,
        components_flops={k: 2 * v for k, v in macs.items()},
    )


def dit_params(cfg) -> dict:
    """Exact parameter counts from the model's abstract shapes (jax.eval_shape: nothing allocated)."""
    import jax
    from flax import nnx

    from sora_jax.models.dit import DiT

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    total = sum(math.prod(a.shape) for a in jax.tree.leaves(params))
    text = 0
    if "text_encoder" in params:
        text = sum(math.prod(a.shape) for a in jax.tree.leaves(params["text_encoder"]))
    return dict(params=int(total), dit_params=int(total - text), text_encoder_params=int(text))


def xla_dit_forward_flops(cfg, latent_thw, *, text_len=None, batch: int = 1, per_token_time=None) -> float:
    """XLA's cost_analysis() FLOPs of the compiled forward, per example (one bucketed example per row)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from sora_jax.models.dit import DiT
    from sora_jax.models.patches import grid_positions, grid_shape

    if per_token_time is None:
        per_token_time = not cfg.num_classes
    # XLA's cost analysis counts a while-loop body once, not once per trip: unroll the layers.
    cfg = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    cfg.scan_layers = False
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    grid = grid_shape(latent_thw, cfg.patch)
    n = int(np.prod(grid))
    pt, ph, pw = cfg.patch
    x = jax.ShapeDtypeStruct((batch, n, pt * ph * pw * cfg.latent_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch, n) if per_token_time else (batch,), jnp.float32)
    positions = jnp.broadcast_to(grid_positions(grid), (batch, n, 3))
    kwargs = {}
    if cfg.num_classes:
        kwargs["class_labels"] = jnp.zeros((batch,), jnp.int32)
    if cfg.cross_attention:
        s = int(text_len if text_len is not None else cfg.text.max_len)
        if cfg.text.encoder == "trained":
            kwargs["text_ids"] = jnp.ones((batch, 1, s), jnp.int32)
        else:
            kwargs["text_emb"] = jnp.zeros((batch, 1, s, cfg.text.emb_dim), jnp.float32)

    def forward(state, x, t):
        return nnx.merge(graphdef, state)(x, t, positions, None, **kwargs)

    cost = jax.jit(forward).lower(state, x, t).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / batch


def vae_flops(model_cfg, video_thw) -> dict:
    """Calls sora_jax.models.vae.vae_forward_flops if the VAE module provides it."""
    try:
        from sora_jax.models import vae
    except ImportError:
        vae = None
    fn = getattr(vae, "vae_forward_flops", None)
    if fn is None:
        return dict(available=False, note="VAE FLOPs unavailable: sora_jax.models.vae.vae_forward_flops not found")
    fwd = fn(model_cfg, *video_thw)
    if isinstance(fwd, dict):  # the VAE module may return a breakdown; its total is "forward_flops"
        fwd = fwd.get("forward_flops", fwd.get("total"))
    return dict(available=True, forward_flops=float(fwd), train_flops=3.0 * float(fwd))


# --- CLI ------------------------------------------------------------------------------------


def load_config(spec: str) -> ml_collections.ConfigDict:
    """"configs/X.py:ARG" -> get_config("ARG") (one loader for the whole project)."""
    from sora_jax import config_lib

    return config_lib.load_config(spec)


def _thw(config, key: str, path: str):
    thw = _get(config, f"flops.{key}") or _get(config, f"data.{key}")
    if thw is None:
        raise ValueError(f"{path}: set config.flops.{key} (or config.data.{key}) to the (T, H, W) of one example")
    return tuple(int(v) for v in thw)


def report(config, path: str = "config") -> dict:
    stage = config.get("stage", "")
    if stage == "dit":
        model = config.model
        thw = _thw(config, "latent_thw", path)
        text_len = _get(config, "flops.text_len")
        per_token = _get(config, "flops.per_token_time")
        out = dict(stage="dit", variant=model.get("variant", ""), latent_thw=thw)
        out.update(dit_params(model))
        out.update(dit_flops(model, thw, text_len=text_len, per_token_time=per_token))
        return out
    if stage == "vae":
        thw = _thw(config, "video_thw", path)
        out = dict(stage="vae", video_thw=thw)
        try:
            from sora_jax.models import vae
            if hasattr(vae, "vae_params"):
                out["params"] = int(vae.vae_params(config.model))
        except ImportError:
            pass
        v = vae_flops(config.model, thw)
        if v["available"]:
            out.update(forward_flops=v["forward_flops"], train_flops=v["train_flops"])
        else:
            out.update(note=v["note"], forward_flops=None, train_flops=None)
        return out
    raise ValueError(f"{path}: config.stage={stage!r}; the FLOPs counter knows 'dit' and 'vae'")


def _table(rep: dict) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4g}"
        if isinstance(x, int) and abs(x) >= 10_000:
            return f"{x:,}"
        return str(x)

    rows = [(k, v) for k, v in rep.items() if k != "components_flops"]
    for k, v in rep.get("components_flops", {}).items():
        rows.append((f"  forward_flops.{k}", v))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="configs/X.py:ARG")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    rep = report(load_config(args.config), args.config)
    if "params" not in rep:
        rep["params"] = None
    print(json.dumps(rep) if args.json else _table(rep))


if __name__ == "__main__":
    main(sys.argv[1:])
