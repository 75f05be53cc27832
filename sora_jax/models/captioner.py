"""The video captioner of the re-captioning stage (DALL-E 3 style, Sora report section "Language understanding").

  video encoder   pixel spacetime patches (pt, ph, pw) -> width, pre-LN transformer with
                  3D RoPE over (t, h, w) patch coordinates, so any native size and length
                  works with no position table to interpolate
  text decoder    autoregressive transformer over HashTokenizer ids: causal
                  self-attention, cross-attention to every video token, GELU MLP; the
                  output head is tied to the token embedding

Frames. Clips have T = 1 + 4k frames (the data pipeline's rule, the same as the
causal VAE's). The first frame is repeated pt - 1 times in front, so T becomes a
multiple of pt and a 1-frame image is one temporal patch of its own, as in the VAE.
That patch equals a video's first one, so a learned media embedding (image or video)
is added to every token: it is what lets the captioner say "image".

Sequences. Teacher forcing feeds [EOS, ids[:-1]] and predicts ids: the tokenizer
has no BOS, so EOS (id 1) doubles as the start token, as GPT-2's <|endoftext|> does.
Greedy decoding keeps a per-layer key/value cache (fixed size max_len) and computes
the cross-attention keys and values of the video once; `decode_greedy` and the
teacher-forced `__call__` give the same logits (a test checks it).

Words. The hashing tokenizer has no inverse; the id -> word table is built by
the stage (sora_jax/stages/captioner.py, `build_vocabulary`) and stored with the
checkpoint as workdir/vocab.json. `allowed` in `decode_greedy` restricts the
argmax to ids that table can spell.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sora_jax import sharding
from sora_jax.data.tokenizer import EOS_ID, PAD_ID
from sora_jax.models import patches
from sora_jax.models.attention import Dense, apply_rope, attend, rope_angles

BATCH_LEN_EMBED = ("activation_batch", "activation_length", "activation_embed")
BATCH_TEXT_EMBED = ("activation_batch", "activation_text_length", "activation_embed")

# name -> (width, encoder depth, decoder depth, heads, mlp)
VARIANTS = {
    "micro": (64, 1, 1, 2, 128),
    "S": (128, 2, 2, 4, 512),
    "M": (256, 4, 4, 4, 1024),
    "B": (512, 6, 6, 8, 2048),
}


def captioner_config(variant: str = "S") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown captioner variant {variant!r}; known: {sorted(VARIANTS)}")
    width, enc, dec, heads, mlp = VARIANTS[variant]
    return ml_collections.ConfigDict(dict(
        variant=variant, patch=(4, 8, 8), width=width, encoder_depth=enc, decoder_depth=dec, heads=heads,
        mlp_dim=mlp, vocab_size=8192, max_len=112, rope_theta=10000.0, dtype="float32", param_dtype="float32"))


def _layer_norm(width, *, rngs, dtype, param_dtype):
    return nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                         scale_init=sharding.partitioned(nnx.initializers.ones, ("norm",)),
                         bias_init=sharding.partitioned(nnx.initializers.zeros, ("norm",)))


def pad_frames(video: jax.Array, pt: int) -> jax.Array:
    """(B, T, H, W, C) -> (B, T', H, W, C), T' a multiple of pt: frame 0 repeated in front."""
    pad = (-video.shape[1]) % pt
    if pad == 0:
        return video
    return jnp.concatenate([jnp.repeat(video[:, :1], pad, axis=1), video], axis=1)


class MLP(nnx.Module):
    def __init__(self, width, mlp, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Dense(width, mlp, ("embed", "mlp"), **kw)
        self.fc2 = Dense(mlp, width, ("mlp", "embed"), **kw)

    def __call__(self, x):
        h = sharding.constrain(jax.nn.gelu(self.fc1(x), approximate=True), ("activation_batch", None, "activation_mlp"))
        return self.fc2(h)


class EncoderBlock(nnx.Module):
    """Pre-LN self-attention over all video tokens (one clip shape per batch: no mask)."""

    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        width, heads = int(cfg.width), int(cfg.heads)
        self.head_dim = width // heads
        self.ln1 = _layer_norm(width, **kw)
        self.qkv = Dense(width, (3, heads, self.head_dim), ("embed", None, "heads", "kv"), **kw)
        self.out = Dense(width, width, ("mlp", "embed"), **kw)
        self.ln2 = _layer_norm(width, **kw)
        self.mlp = MLP(width, int(cfg.mlp_dim), **kw)

    def __call__(self, x, cos, sin):
        q, k, v = jnp.moveaxis(self.qkv(self.ln1(x)), -3, 0)
        q, k = apply_rope(q, cos, sin, self.head_dim), apply_rope(k, cos, sin, self.head_dim)
        a = attend(q, k, v, None)
        x = x + self.out(a.reshape(*a.shape[:-2], -1))
        x = x + self.mlp(self.ln2(x))
        return sharding.constrain(x, BATCH_LEN_EMBED)


class DecoderBlock(nnx.Module):
    """Causal self-attention, cross-attention to the video, MLP (all pre-LN)."""

    def __init__(self, cfg, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        width, heads = int(cfg.width), int(cfg.heads)
        self.heads, self.head_dim = heads, width // heads
        self.ln1 = _layer_norm(width, **kw)
        self.qkv = Dense(width, (3, heads, self.head_dim), ("embed", None, "heads", "kv"), **kw)
        self.self_out = Dense(width, width, ("mlp", "embed"), **kw)
        self.ln2 = _layer_norm(width, **kw)
        self.cross_q = Dense(width, (heads, self.head_dim), ("embed", "heads", "kv"), **kw)
        self.cross_kv = Dense(width, (2, heads, self.head_dim), ("embed", None, "heads", "kv"), **kw)
        self.cross_out = Dense(width, width, ("mlp", "embed"), **kw)
        self.ln3 = _layer_norm(width, **kw)
        self.mlp = MLP(width, int(cfg.mlp_dim), **kw)

    def video_kv(self, video_tokens):
        """Cross-attention keys and values [B, N, heads, head_dim] of the encoded video."""
        k, v = jnp.moveaxis(self.cross_kv(video_tokens), -3, 0)
        return k, v

    def _rest(self, x, self_attn, cross_k, cross_v):
        x = x + self.self_out(self_attn.reshape(*self_attn.shape[:-2], -1))
        c = attend(self.cross_q(self.ln2(x)), cross_k, cross_v, None)
        x = x + self.cross_out(c.reshape(*c.shape[:-2], -1))
        x = x + self.mlp(self.ln3(x))
        return sharding.constrain(x, BATCH_TEXT_EMBED)

    def __call__(self, x, causal_mask, cross_k, cross_v):
        q, k, v = jnp.moveaxis(self.qkv(self.ln1(x)), -3, 0)
        return self._rest(x, attend(q, k, v, causal_mask), cross_k, cross_v)

    def step(self, x, pos, cache_k, cache_v, cross_k, cross_v):
        """One new token x [B, 1, width] at position `pos`; returns (x, new cache_k, new cache_v)."""
        q, k, v = jnp.moveaxis(self.qkv(self.ln1(x)), -3, 0)
        cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), pos, axis=1)
        cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), pos, axis=1)
        mask = (jnp.arange(cache_k.shape[1]) <= pos)[None, None, None, :]
        return self._rest(x, attend(q, cache_k, cache_v, mask), cross_k, cross_v), cache_k, cache_v


class Captioner(nnx.Module):
    """video [B, T, H, W, 3] in [-1, 1] -> next-token logits over HashTokenizer ids."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(cfg.get("dtype", "float32")), jnp.dtype(cfg.get("param_dtype", "float32"))
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        width, heads = int(cfg.width), int(cfg.heads)
        if width % heads:
            raise ValueError(f"captioner width {width} is not divisible by heads {heads}")
        attention_rope_check = width // heads
        if attention_rope_check % 2 or attention_rope_check < 6:
            raise ValueError(f"captioner head_dim {attention_rope_check} must be even and >= 6 for 3D RoPE")
        self.patch = tuple(int(p) for p in cfg.patch)
        self.vocab_size, self.max_len = int(cfg.vocab_size), int(cfg.max_len)
        self.head_dim, self.theta, self.dtype = width // heads, float(cfg.rope_theta), dtype
        patch_dim = int(np.prod(self.patch)) * 3
        self.patch_embed = Dense(patch_dim, width, (None, "embed"), **kw)
        # Row 0 is added to every token of a video, row 1 to every token of an image. Without it an
        # image is indistinguishable from a video's first temporal patch (the same repeated frame 0,
        # and RoPE is relative), and the quick captioner called all its held-out images videos.
        self.media_embed = nnx.Param(sharding.partitioned(nnx.initializers.normal(0.02), (None, "embed"))(
            rngs.params(), (2, width), param_dtype))
        self.encoder = nnx.List([EncoderBlock(cfg, **kw) for _ in range(int(cfg.encoder_depth))])
        self.encoder_norm = _layer_norm(width, **kw)
        self.embed = nnx.Embed(self.vocab_size, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                               embedding_init=sharding.partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")))
        self.text_pos = nnx.Param(sharding.partitioned(nnx.initializers.normal(0.02), (None, "embed"))(
            rngs.params(), (self.max_len, width), param_dtype))
        self.decoder = nnx.List([DecoderBlock(cfg, **kw) for _ in range(int(cfg.decoder_depth))])
        self.decoder_norm = _layer_norm(width, **kw)

    # --- video ---------------------------------------------------------------------
    def encode(self, video: jax.Array) -> jax.Array:
        """[B, T, H, W, 3] -> video tokens [B, N, width] (N = spacetime patches)."""
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"captioner expects video (B, T, H, W, 3), got {video.shape}")
        is_image = int(video.shape[1] == 1)  # static: one compile per shape anyway
        video = pad_frames(video.astype(self.dtype), self.patch[0])
        grid = patches.grid_shape(video.shape[1:4], self.patch)
        x = self.patch_embed(patches.patchify(video, self.patch)) + self.media_embed[is_image].astype(self.dtype)
        x = sharding.constrain(x, BATCH_LEN_EMBED)
        positions = jnp.asarray(patches.grid_positions(grid))[None]
        cos, sin = rope_angles(positions, self.head_dim, self.theta)
        for block in self.encoder:
            x = block(x, cos, sin)
        return self.encoder_norm(x)

    def video_kv(self, video_tokens: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        return [block.video_kv(video_tokens) for block in self.decoder]

    # --- text --------------------------------------------------------------------------
    def _logits(self, x: jax.Array) -> jax.Array:
        return self.embed.attend(self.decoder_norm(x)).astype(jnp.float32)

    def decode(self, input_ids: jax.Array, video_tokens: jax.Array) -> jax.Array:
        """Teacher-forced logits [B, S, vocab] for input ids [B, S] (position i predicts token i)."""
        s = input_ids.shape[1]
        if s > self.max_len:
            raise ValueError(f"{s} text tokens but the captioner's max_len is {self.max_len}")
        x = sharding.constrain(self.embed(input_ids) + self.text_pos[:s].astype(self.dtype), BATCH_TEXT_EMBED)
        causal = jnp.tril(jnp.ones((s, s), bool))[None, None]
        for block, (k, v) in zip(self.decoder, self.video_kv(video_tokens)):
            x = block(x, causal, k, v)
        return self._logits(x)

    def __call__(self, video: jax.Array, input_ids: jax.Array) -> jax.Array:
        return self.decode(input_ids, self.encode(video))

    def decode_greedy(self, video: jax.Array, max_len: int | None = None, allowed: jax.Array | None = None) -> jax.Array:
        """Greedy captions: ids [B, max_len], EOS included, padding (0) after it.

        `allowed` (bool [vocab]) limits the argmax to ids with a known word (plus EOS).
        """
        max_len = int(max_len or self.max_len)
        if max_len > self.max_len:
            raise ValueError(f"max_len {max_len} > the captioner's max_len {self.max_len}")
        tokens = self.encode(video)
        b = tokens.shape[0]
        cross = self.video_kv(tokens)
        heads = cross[0][0].shape[2]
        zeros = jnp.zeros((b, max_len, heads, self.head_dim), self.dtype)
        caches = [(zeros, zeros) for _ in self.decoder]
        bias = None
        if allowed is not None:
            allowed = jnp.asarray(allowed, bool).at[EOS_ID].set(True).at[PAD_ID].set(False)
            bias = jnp.where(allowed, 0.0, -jnp.inf)

        def body(carry, pos):
            prev, done, caches = carry
            x = self.embed(prev[:, None]) + jax.lax.dynamic_slice_in_dim(self.text_pos[...], pos, 1)[None].astype(self.dtype)
            new_caches = []
            for block, (ck, cv), (k, v) in zip(self.decoder, caches, cross):
                x, ck, cv = block.step(x, pos, ck, cv, k, v)
                new_caches.append((ck, cv))
            logits = self._logits(x)[:, 0]
            if bias is not None:
                logits = logits + bias
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            token = jnp.where(done, PAD_ID, token)
            return (token, done | (token == EOS_ID), new_caches), token

        start = jnp.full((b,), EOS_ID, jnp.int32)
        _, ids = jax.lax.scan(body, (start, jnp.zeros((b,), bool), caches), jnp.arange(max_len))
        ids = ids.T
        # A caption that never ended gets EOS as its last token, as the tokenizer truncates.
        ended = jnp.any(ids == EOS_ID, axis=1)
        return ids.at[:, -1].set(jnp.where(ended, ids[:, -1], EOS_ID))


def teacher_forcing_inputs(ids: jax.Array) -> jax.Array:
    """[EOS, ids[:-1]]: the decoder input that predicts `ids` (EOS doubles as the start token)."""
    return jnp.concatenate([jnp.full_like(ids[:, :1], EOS_ID), ids[:, :-1]], axis=1)


def create_captioner(cfg: ml_collections.ConfigDict, seed: int = 0) -> Captioner:
    """An unsharded captioner (tests, notebooks); the loop builds it under the mesh instead."""
    with nnx.use_eager_sharding(False):
        return Captioner(cfg, rngs=nnx.Rngs(seed))
