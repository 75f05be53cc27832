"""The DiT paper's class-conditional image models (Peebles & Xie 2023, Table 4), in our code.

get_config("XL/2"), "S/8", ... : S, B, L, XL with patch 2, 4 or 8, as 1-frame
256x256 images on the SD VAE's 32x32x4 latent, 1000 ImageNet classes (plus a
null class for classifier-free guidance) through adaLN, no text, output 2C
channels (the learned sigma), no QK-norm. Our one difference: 3D RoPE instead
of fixed sin-cos position embeddings (no parameters, no FLOPs in the paper's count).
`python -m sora_jax.flops --config=configs/dit_paper.py:XL/2` then reproduces the
paper's Gflops column; the scaling study uses this family as its anchor.
"""

import ml_collections

from sora_jax import config_lib
from sora_jax.models.dit import dit_config


def get_config(arg: str = "XL/2") -> ml_collections.ConfigDict:
    variant = (arg or "XL/2").split(",")[0]
    config = config_lib.base_config()
    config.stage = "dit"

    model = dit_config(variant)
    model.latent_channels = 4
    model.out_channels = 8  # mean and learned variance, as in DiT
    model.num_classes = 1000
    model.cross_attention = False
    model.qk_norm = False
    model.prediction = "x0"  # informational; the paper predicts noise with a DDPM loss
    config.model = model

    config.flops = ml_collections.ConfigDict(dict(latent_thw=(1, 32, 32), per_token_time=False))
    return config
