"""The spacetime-patch diffusion transformer (DiT) over packed rows of latent tokens.

Input is the token-batch contract of docs/architecture.md: noisy patch tokens,
per-token diffusion time, (t, h, w) positions and segment ids, plus each slot's
caption. One block (DiT paper, Fig. 3, with Sora/Wan-style video additions):

    c   = TimeEmbed(t) (+ ClassEmbed(label))             per token [B,L,D] or per example [B,1,D]
    x  += gate1 * SelfAttn(modulate(LN(x), shift1, scale1))    QK-norm, 3D RoPE, segment mask
    x  += CrossAttn(LN(x), text of this token's slot)            each slot also has a learned null token
    x  += gate2 * MLP(modulate(LN(x), shift2, scale2))
    (shift, scale, gate)x2 = Linear_zero(SiLU(c))           adaLN-Zero: every block starts as identity

The final layer is also adaLN-modulated and zero-initialised, so the model's
output is exactly 0 at init. Per-token time lets conditioning frames be clean
(t = 0) while the rest is noisy; when `t` is given per example ([B]) the
modulation is computed once per example and broadcast, which is what the DiT
paper counts and saves a [B,L,6D] projection per block.

Blocks are stacked on a leading "layers" axis (nnx.vmap at init) and applied by
jax.lax.scan (cfg.scan_layers) or an unrolled Python loop over the same stacked
parameters, so both modes share checkpoints. Named remat policies wrap the block.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sora_jax import sharding
from sora_jax.models.attention import Dense, RMSNorm, apply_rope, attend, layer_norm, rope_angles, segment_mask
from sora_jax.models.text_encoder import TextEncoder

# Named sizes: (width, depth, heads, mlp_dim). S..XL as in the DiT paper; the rest for CPU work.
VARIANTS = {
    "micro": (64, 2, 2, 256),
    "Ti": (192, 6, 3, 768),
    "bench-small": (384, 6, 6, 1536),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "XL": (1152, 28, 16, 4608),
}

REMAT_POLICIES = ("none", "minimal", "save_qkv_proj", "full")


def decode_variant(variant: str) -> dict:
    """"B/2" -> width, depth, heads, mlp_dim, patch (1, 2, 2). "bench-small" alone keeps patch (1, 2, 2).

    "name/p" is a spatial patch p (image-style, pt = 1); "name/pt.p" sets both, e.g. "S/2.2".
    """
    m = re.fullmatch(r"([A-Za-z-]+)(?:/(\d+)(?:\.(\d+))?)?", variant or "")
    if not m or m.group(1) not in VARIANTS:
        raise ValueError(f"unknown DiT variant {variant!r}; known sizes {sorted(VARIANTS)}, e.g. 'B/2' or 'S/2.2'")
    width, depth, heads, mlp = VARIANTS[m.group(1)]
    if m.group(3):
        patch = (int(m.group(2)), int(m.group(3)), int(m.group(3)))
    else:
        p = int(m.group(2) or 2)
        patch = (1, p, p)
    return dict(width=width, depth=depth, heads=heads, mlp_dim=mlp, patch=patch)


def dit_config(variant: str = "B/2") -> ml_collections.ConfigDict:
    """Model config of a named size; text-conditioned video DiT with a jointly trained text encoder."""
    v = decode_variant(variant)
    return ml_collections.ConfigDict(dict(
        variant=variant,
        latent_channels=16,
        out_channels=0,  # 0: same as latent_channels (DiT paper models use 2C for the learned sigma)
        patch=v["patch"],
        width=v["width"], depth=v["depth"], heads=v["heads"], mlp_dim=v["mlp_dim"],
        qk_norm=True,
        rope_theta=10000.0,
        num_classes=0,  # 0: text-conditioned; > 0: class-conditional via adaLN, label num_classes = null
        text=ml_collections.ConfigDict(dict(
            encoder="trained",  # "trained" (TextEncoder on text_ids) | "precomputed" (text_emb, text_mask)
            vocab_size=8192, max_len=96, width=256, depth=2, heads=4, mlp_dim=1024,
            emb_dim=512,  # width of precomputed text_emb
        )),
        cross_attention=True,
        remat_policy="none",
        scan_layers=True,
        param_dtype="float32",
        compute_dtype="float32",
        prediction="velocity",  # "velocity" | "x0"; informational here, used by sora_jax/diffusion
    ))


def remat_policy(name: str):
    """jax.checkpoint policy by name (None = no remat). Tags are set with checkpoint_name in Block."""
    if name == "none":
        return None
    # "minimal": keep every projection's output and each attention's output and softmax row
    # statistics (tagged in attention._attention_fwd), recompute norms, activations and the
    # rest. Without the attention tags the backward pass ran every attention forward twice
    # (once to rebuild its residuals): bench-small step ~0.82 -> ~0.77 s on CPU.
    if name == "minimal":
        return jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            jax.checkpoint_policies.save_only_these_names("attention_out"))
    if name == "save_qkv_proj":
        return jax.checkpoint_policies.save_only_these_names("qkv_proj", "context_kv_proj")
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    raise ValueError(f"model.remat_policy={name!r}; choose one of {REMAT_POLICIES}")


def timestep_features(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features of t in [0, 1] (scaled to [0, 1000] as in DiT's discrete steps)."""
    half = dim // 2
    freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    ang = (t.astype(jnp.float32) * 1000.0)[..., None] * freqs
    return jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], -1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Block(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, h = cfg.width, cfg.heads
        self.heads, self.head_dim, self.cross = h, d // h, bool(cfg.cross_attention)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.adaln = Dense(d, (6, d), ("embed", None, "mlp"), zero_init=True, **kw)
        self.qkv = Dense(d, (3, h, self.head_dim), ("embed", None, "heads", "kv"), **kw)
        self.proj = Dense(d, d, ("mlp", "embed"), **kw)
        self.q_norm = RMSNorm(self.head_dim, param_dtype=param_dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, param_dtype=param_dtype) if cfg.qk_norm else None
        if self.cross:
            self.cross_q = Dense(d, (h, self.head_dim), ("embed", "heads", "kv"), **kw)
            self.cross_kv = Dense(d, (2, h, self.head_dim), ("embed", None, "heads", "kv"), **kw)
            self.cross_proj = Dense(d, d, ("mlp", "embed"), **kw)
            self.cross_q_norm = RMSNorm(self.head_dim, param_dtype=param_dtype) if cfg.qk_norm else None
            self.cross_k_norm = RMSNorm(self.head_dim, param_dtype=param_dtype) if cfg.qk_norm else None
        self.fc1 = Dense(d, cfg.mlp_dim, ("embed", "mlp"), **kw)
        self.fc2 = Dense(cfg.mlp_dim, d, ("mlp", "embed"), **kw)

    def modulation(self, c):
        """adaLN-Zero's (shift, scale, gate) x 2 from the conditioning c: [6, B, L or 1, D]."""
        return jnp.moveaxis(self.adaln(jax.nn.silu(c)), -2, 0)

    def context_kv(self, ctx):
        """Cross-attention keys and values of the text context: [2, B, S, heads, head_dim]."""
        return jnp.moveaxis(checkpoint_name(self.cross_kv(ctx), "context_kv_proj"), -3, 0)

    def __call__(self, x, mod, rope, self_mask, ctx_kv, ctx_mask):
        """mod = self.modulation(c), ctx_kv = self.context_kv(ctx) (None without cross-attention)."""
        names_h = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
        shift1, scale1, gate1, shift2, scale2, gate2 = mod

        qkv = checkpoint_name(self.qkv(modulate(layer_norm(x), shift1, scale1)), "qkv_proj")
        q, k, v = jnp.moveaxis(qkv, -3, 0)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope, self.head_dim), apply_rope(k, *rope, self.head_dim)
        q, k, v = (sharding.constrain(a, names_h) for a in (q, k, v))
        a = attend(q, k, v, self_mask)
        x = x + gate1 * self.proj(a.reshape(*a.shape[:-2], -1))

        if self.cross:
            q = self.cross_q(layer_norm(x))
            k, v = ctx_kv
            if self.cross_q_norm is not None:
                q, k = self.cross_q_norm(q), self.cross_k_norm(k)
            a = attend(sharding.constrain(q, names_h), k, v, ctx_mask)
            x = x + self.cross_proj(a.reshape(*a.shape[:-2], -1))

        hidden = jax.nn.gelu(self.fc1(modulate(layer_norm(x), shift2, scale2)), approximate=True)
        hidden = sharding.constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        x = x + gate2 * self.fc2(hidden)
        return sharding.constrain(x, ("activation_batch", "activation_length", "activation_embed"))


class DiT(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        if cfg.width % cfg.heads:
            raise ValueError(f"model.width={cfg.width} is not divisible by model.heads={cfg.heads}")
        remat_policy(cfg.remat_policy)  # validate early
        cfg = ml_collections.FrozenConfigDict(cfg)
        self.cfg = cfg
        dtype, param_dtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d, c = cfg.width, cfg.latent_channels
        pt, ph, pw = cfg.patch
        self.patch_dim = pt * ph * pw * c
        self.out_dim = pt * ph * pw * (cfg.out_channels or c)

        self.patch_embed = Dense(self.patch_dim, d, (None, "embed"), **kw)
        self.t_fc1 = Dense(256, d, (None, "embed"), **kw)
        self.t_fc2 = Dense(d, d, ("mlp", "embed"), **kw)
        if cfg.num_classes:
            self.class_embed = nnx.Embed(cfg.num_classes + 1, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                         embedding_init=sharding.partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")))
        if cfg.cross_attention:
            tc = cfg.text
            if tc.encoder == "trained":
                self.text_encoder = TextEncoder(tc, **kw)
                ctx_in = tc.width
            elif tc.encoder == "precomputed":
                ctx_in = tc.emb_dim
            else:
                raise ValueError(f"model.text.encoder={tc.encoder!r}; choose 'trained' or 'precomputed'")
            self.text_proj = Dense(ctx_in, d, (None, "embed"), **kw)
            # One learned token per slot that every query can always attend to: empty (dropped)
            # captions then mean "attend to null" rather than an all-masked softmax.
            self.null_text = nnx.Param(sharding.partitioned(nnx.initializers.normal(0.02), ("embed",))(
                rngs.params(), (d,), param_dtype))

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        self.blocks = make_blocks(rngs)
        self.final_adaln = Dense(d, (2, d), ("embed", None, "mlp"), zero_init=True, **kw)
        self.final = Dense(d, self.out_dim, ("embed", None), zero_init=True, **kw)

    # --- conditioning ---------------------------------------------------------

    def _condition(self, t, class_labels):
        """c = TimeEmbed(t) (+ class): [B, L, D] for per-token t, [B, 1, D] for per-example t."""
        if t.ndim == 1:
            t = t[:, None]
        c = self.t_fc2(jax.nn.silu(self.t_fc1(timestep_features(t))))
        if self.cfg.num_classes:
            if class_labels is None:
                raise ValueError("a class-conditional DiT (model.num_classes > 0) needs class_labels [B]")
            c = c + self.class_embed(class_labels)[:, None, :]
        return c

    def _text_context(self, b, text_ids, text_emb, text_mask):
        """Slot texts -> ctx [B, K*(1+S), D] and key slot ids [B, K*(1+S)] (0 = masked key)."""
        tc = self.cfg.text
        if tc.encoder == "trained" and text_ids is not None:
            if text_ids.ndim == 2:  # bucketed shortcut: one caption per row
                text_ids = text_ids[:, None]
            emb, valid = self.text_encoder(text_ids)
        elif text_emb is not None:
            if text_emb.ndim == 3:
                text_emb = text_emb[:, None]
                text_mask = None if text_mask is None else text_mask[:, None]
            emb = text_emb
            valid = jnp.ones(emb.shape[:-1], bool) if text_mask is None else text_mask.astype(bool)
        elif text_ids is None and text_emb is None:  # unconditional: only the null token
            emb, valid = None, None
        else:
            raise ValueError(f"model.text.encoder={tc.encoder!r} does not match the given text "
                             f"(text_ids={'set' if text_ids is not None else None}, "
                             f"text_emb={'set' if text_emb is not None else None})")
        null = jnp.broadcast_to(self.null_text[...].astype(self.dtype), (b, 1 if emb is None else emb.shape[1], 1, self.cfg.width))
        if emb is None:
            ctx, valid = null, jnp.ones(null.shape[:-1], bool)
        else:
            ctx = jnp.concatenate([null, self.text_proj(emb)], 2)
            valid = jnp.concatenate([jnp.ones(valid.shape[:-1] + (1,), bool), valid], -1)
        k, s1 = ctx.shape[1:3]
        slot = jnp.where(valid, jnp.arange(1, k + 1, dtype=jnp.int32)[:, None], 0)
        ctx = sharding.constrain(ctx.reshape(b, k * s1, -1), ("activation_batch", "activation_text_length", "activation_embed"))
        return ctx, slot.reshape(b, k * s1)

    # --- forward ----------------------------------------------------------------

    def __call__(self, x, t, positions, segment_ids=None, *, text_ids=None, text_emb=None, text_mask=None,
                 class_labels=None, deterministic: bool = True):
        """x [B,L,P] noisy tokens, t [B,L] (or [B]) in [0,1], positions [B,L,3], segment_ids [B,L] or None.

        segment_ids=None means "bucketed: every token is slot 1, no padding" and skips the
        self-attention mask. Returns the prediction [B, L, pt*ph*pw*out_channels].
        `deterministic` is accepted for API symmetry (the model has no dropout).
        """
        cfg = self.cfg
        b, l, p = x.shape
        if p != self.patch_dim:
            raise ValueError(f"tokens have size {p} but patch {tuple(cfg.patch)} x {cfg.latent_channels} channels = {self.patch_dim}")
        act = ("activation_batch", "activation_length", "activation_embed")
        h = sharding.constrain(self.patch_embed(x), act)
        c = self._condition(t, class_labels).astype(self.dtype)
        rope = rope_angles(positions, cfg.width // cfg.heads, cfg.rope_theta)

        self_mask = None if segment_ids is None else segment_mask(segment_ids, segment_ids)
        ctx = ctx_mask = None
        if cfg.cross_attention:
            ctx, ctx_slot = self._text_context(b, text_ids, text_emb, text_mask)
            # Padding tokens (segment 0) look at slot 1's text so their softmax row is never empty.
            q_slot = jnp.ones((b, l), jnp.int32) if segment_ids is None else jnp.maximum(segment_ids, 1)
            ctx_mask = segment_mask(q_slot, ctx_slot)

        graphdef, stacked = nnx.split(self.blocks)

        # Inputs that are the same for every layer (the text context; c when t is per example)
        # are projected for all layers at once, before the loop: inside a scan each of these
        # small-row matmuls also costs a per-layer weight slice, a gradient write into a
        # zero-filled stacked buffer and a transposed weight copy (bench-small: docs/dit.md).
        # Per-token modulations ([B, L, 6D] a layer) stay in the block, so remat bounds them.
        def every_layer(method, arg):
            return jax.vmap(lambda s: method(nnx.merge(graphdef, s), arg))(stacked)

        mods = every_layer(Block.modulation, c) if c.shape[-2] == 1 else None
        ctx_kvs = every_layer(Block.context_kv, ctx) if cfg.cross_attention else None

        def block_fn(h, layer):
            layer_state, mod, ctx_kv = layer
            block = nnx.merge(graphdef, layer_state)
            mod = block.modulation(c) if mod is None else mod
            return block(h, mod, rope, self_mask, ctx_kv, ctx_mask)

        policy = remat_policy(cfg.remat_policy)
        if policy is not None:
            block_fn = jax.checkpoint(block_fn, policy=policy, prevent_cse=not cfg.scan_layers)
        layers = (stacked, mods, ctx_kvs)
        if cfg.scan_layers:
            h, _ = jax.lax.scan(lambda h, layer: (block_fn(h, layer), None), h, layers)
        else:
            for i in range(cfg.depth):
                h = block_fn(h, jax.tree.map(lambda a: a[i], layers))

        shift, scale = jnp.moveaxis(self.final_adaln(jax.nn.silu(c)), -2, 0)
        return self.final(modulate(layer_norm(h), shift, scale))


def create_dit(cfg: ml_collections.ConfigDict, seed: int = 0) -> DiT:
    """Unsharded model for tests and scripts (no mesh needed). Init runs as one jitted
    program (eager init dispatches hundreds of tiny ops) with an RBG key: XLA:CPU compiles
    threefry-based init of a few hundred tensors ~3x slower."""
    with nnx.use_eager_sharding(False):
        return nnx.jit(lambda: DiT(cfg, rngs=nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))))()


def count_params(model_or_state) -> int:
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(state)))
