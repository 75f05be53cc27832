"""A small text transformer over HashTokenizer ids, trained jointly with the DiT by default.

It needs nothing downloaded (the tokenizer is the hashing trick, see
sora_jax/data/tokenizer.py). A user with a big frozen encoder instead stores its
outputs in the data set and sets `model.text.encoder = "precomputed"`; the DiT
then reads `text_emb` / `text_mask` and this module is not built.

Empty captions. Caption dropout for classifier-free guidance replaces a
caption by all-padding ids. Padding keys are masked, and every query may also
see itself, so an all-padding caption never produces an all-masked softmax row
(no NaN). What the DiT attends to for an empty caption is its learned null
token per slot (see DiT._text_context), so the encoder's output on padding is
never read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from sora_jax import sharding
from sora_jax.models.attention import Dense, attend, layer_norm


class TextBlock(nnx.Module):
    """Pre-LN transformer block (learned-affine LayerNorms, GELU MLP)."""

    def __init__(self, width: int, heads: int, mlp: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.heads, self.head_dim = heads, width // heads
        self.ln1 = nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                 scale_init=sharding.partitioned(nnx.initializers.ones, ("norm",)),
                                 bias_init=sharding.partitioned(nnx.initializers.zeros, ("norm",)))
        self.ln2 = nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                 scale_init=sharding.partitioned(nnx.initializers.ones, ("norm",)),
                                 bias_init=sharding.partitioned(nnx.initializers.zeros, ("norm",)))
        self.qkv = Dense(width, (3, heads, self.head_dim), ("embed", None, "heads", "kv"), **kw)
        self.out = Dense(heads * self.head_dim, width, ("mlp", "embed"), **kw)
        self.fc1 = Dense(width, mlp, ("embed", "mlp"), **kw)
        self.fc2 = Dense(mlp, width, ("mlp", "embed"), **kw)

    def __call__(self, x, mask):
        q, k, v = jnp.moveaxis(self.qkv(self.ln1(x)), -3, 0)
        a = attend(q, k, v, mask)
        x = x + self.out(a.reshape(*a.shape[:-2], -1))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x)), approximate=True))


class TextEncoder(nnx.Module):
    """ids [..., S] int (0 = padding) -> embeddings [..., S, width] and key mask [..., S]."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        width, heads = int(cfg.width), int(cfg.heads)
        if width % heads:
            raise ValueError(f"model.text.width={width} is not divisible by model.text.heads={heads}")
        self.max_len, self.dtype = int(cfg.max_len), dtype
        self.embed = nnx.Embed(int(cfg.vocab_size), width, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                               embedding_init=sharding.partitioned(nnx.initializers.normal(0.02), ("vocab", "embed")))
        self.pos = nnx.Param(sharding.partitioned(nnx.initializers.normal(0.02), (None, "embed"))(
            rngs.params(), (self.max_len, width), param_dtype))
        self.blocks = nnx.List([TextBlock(width, heads, int(cfg.get("mlp_dim", 4 * width)), rngs=rngs, dtype=dtype,
                                          param_dtype=param_dtype) for _ in range(int(cfg.depth))])
        self.ln_f = nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                  scale_init=sharding.partitioned(nnx.initializers.ones, ("norm",)),
                                  bias_init=sharding.partitioned(nnx.initializers.zeros, ("norm",)))

    def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        *lead, s = ids.shape
        if s > self.max_len:
            raise ValueError(f"text_ids have {s} tokens but model.text.max_len is {self.max_len}")
        ids = ids.reshape(-1, s)
        valid = ids != 0
        x = self.embed(ids) + self.pos[:s].astype(self.dtype)
        # Keys: real tokens, plus the query itself (keeps all-padding rows finite).
        mask = (valid[:, None, :] | jnp.eye(s, dtype=bool)[None])[:, None]
        for block in self.blocks:
            x = block(x, mask)
        x = self.ln_f(x)
        return x.reshape(*lead, s, -1), valid.reshape(*lead, s)
