"""`config.data`: the one data config every stage (vae, captioner, dit) reads.

Sizes are chosen for a 2-core CPU smoke run; a real run overrides them on the
command line (`--config.data.pixels=65536 --config.data.frames=33`).

Shapes follow the model's strides so that no stage has to crop again:
  * H and W are multiples of `multiple` = VAE spatial stride x DiT patch (8 x 2 = 16);
  * T is 1 + 4k (the causal VAE keeps the first frame and compresses the rest by 4),
    so a 1-frame image is a valid video and encodes to one latent frame.
"""

from __future__ import annotations

import ml_collections


def default_data_config() -> ml_collections.ConfigDict:
    from sora_jax.data import toy_world  # Local import: toy_world pulls in its renderer.

    c = ml_collections.ConfigDict()

    # --- where examples come from --------------------------------------------
    c.source = "toy"  # "toy" | "tfds" | "arrayrecord"
    c.toy = toy_world.default_toy_config()
    c.toy_seed = 0  # the world's seed; the data order uses config.seed
    c.num_train = 4096  # toy: examples [0, num_train); other sources: 0 = all but the eval ones
    c.num_eval = 64  # held-out examples, disjoint from train (see sources.split_indices)
    c.tfds_name = ""  # e.g. "ucf101", "bair_robot_pushing_small", "moving_mnist", "sora_toy_world"
    c.tfds_dir = ""  # TFDS data_dir ("" = the TFDS default, ~/tensorflow_datasets)
    c.tfds_split = "train"
    c.tfds_eval_split = ""  # "" = hold out num_eval examples of tfds_split
    c.arrayrecord = ""  # comma-separated files, globs or directories written by data/importer.py
    c.latents_dir = ""  # output of data/latent_cache.py, read by token_batches

    # --- captions -------------------------------------------------------------
    c.caption = "descriptive"  # "descriptive" | "short" (the caption-length ablation)
    c.text_len = 96
    c.vocab_size = 8192

    # --- frames -----------------------------------------------------------------
    c.frames = 17  # maximum frames per clip (rounded down to 1 + 4k)
    c.frame_stride = 1  # take every k-th frame (used when fps = 0)
    c.fps = 0.0  # > 0: resample to this frame rate instead of frame_stride
    c.random_clip = True  # train: random clip start; eval always starts at frame 0

    # --- space -------------------------------------------------------------------
    c.resolution = "native"  # "native" | "square_crop" | "resize" | "random_crop" (data/transforms.py)
    c.pixels = 64 * 64  # native, random_crop: pixel budget per frame (H*W <= pixels after rounding)
    c.size = 64  # square_crop: side; resize, random_crop: side too unless height/width are set
    c.height = 0
    c.width = 0
    c.multiple = 16  # spatial rounding = VAE stride x patch
    c.vae_stride = (4, 8, 8)  # (t, h, w) compression of the VAE, for token counts
    c.patch = (1, 2, 2)  # (t, h, w) DiT patch on latents; keep equal to config.model.patch

    # --- batching ------------------------------------------------------------------
    c.batching = "pack"  # token batches: "pack" | "bucket"; pixel batches are always bucketed
    c.batch_size = 8  # rows per batch (pack) / batch size of the largest bucket (bucket)
    c.tokens_per_batch = 0  # bucket: latent tokens per batch; 0 = batch_size x largest example
    c.max_batch_size = 64  # cap for buckets of tiny examples (1-frame images)
    c.row_len = 512  # pack: tokens per row
    c.max_slots = 16  # pack: examples per row at most
    c.pack_lookahead = 64  # pack: examples held to choose from (bigger = fuller rows)
    c.bucket_lookahead = 256  # bucket: examples held before a partial bucket is flushed
    # Pixel buckets with several processes: "shared" fixes the (T,H,W) of every step on all
    # processes alike (data/bucket_schedule.py); "greedy" lets each process pick (one process
    # only: shapes would differ across processes); "auto" = shared when process_count > 1.
    c.bucket_schedule = "auto"
    c.bucket_schedule_examples = 4096  # shared: examples whose shapes set the schedule (0 or >= split: all)

    # --- robustness and speed ------------------------------------------------------
    c.on_error = "raise"  # "raise" | "skip": a bad record is an error, or counted and logged
    c.read_threads = 2  # threads that decode/transform examples ahead of batching
    c.prefetch = 2  # batches prepared ahead in a background thread (0 = none)
    return c
