"""A TFDS builder that materialises N toy-world examples as ArrayRecord.

    python -m sora_jax.data.tfds_builder --data_dir=/tmp/tfds --num_train=1000 --num_eval=64

writes DATA_DIR/sora_toy_world/1.0.0/ (splits "train" and "test"), which any
TFDS-aware tool reads with `tfds.data_source("sora_toy_world", data_dir=DATA_DIR)`,
and sora_jax with `--config.data.source=tfds --config.data.tfds_name=sora_toy_world
--config.data.tfds_dir=DATA_DIR --config.data.tfds_eval_split=test`.

No TensorFlow is needed: videos are stored as zlib-compressed uint8 tensors of
any (T, H, W), so native sizes survive the round trip exactly. The test split
holds world indices [num_train, num_train + num_eval), disjoint from train.
"""

from __future__ import annotations

import argparse

import numpy as np
import tensorflow_datasets as tfds

NAME = "sora_toy_world"


class SoraToyWorld(tfds.core.GeneratorBasedBuilder):
    """The procedural toy world (sora_jax/data/toy_world.py) as a TFDS data set."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Toy world videos at native size with captions and ground truth."}

    def __init__(self, *, num_train: int = 256, num_eval: int = 32, toy_config=None, seed: int = 0, **kwargs):
        self._num_train, self._num_eval, self._toy_config, self._seed = num_train, num_eval, toy_config, seed
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    # TFDS looks for a checksums file next to the builder's source via
    # `importlib_resources`, which is not installed (and nothing is downloaded here).
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Procedural toy-world videos (sora_jax) with exact per-frame ground truth.",
            features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8, encoding="zlib"),
                "caption": tfds.features.Text(),
                "short_caption": tfds.features.Text(),
                "fps": np.float32,
                "index": np.int64,
                "ground_truth": tfds.features.Text(),
            }),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the world is generated.
        return {
            "train": self._generate_examples(0, self._num_train),
            "test": self._generate_examples(self._num_train, self._num_train + self._num_eval),
        }

    def _generate_examples(self, start: int, stop: int):
        from sora_jax.data import toy_world

        world = toy_world.ToyWorld(self._toy_config, seed=self._seed, num_examples=self._num_train + self._num_eval)
        for i in range(start, stop):
            r = world[i]
            yield i, {"video": r["video"], "caption": r["caption"], "short_caption": r["short_caption"],
                      "fps": np.float32(r["fps"]), "index": np.int64(r["index"]), "ground_truth": r["ground_truth"]}


def build(data_dir: str, num_train: int, num_eval: int, toy_config=None, seed: int = 0) -> str:
    """Generates and prepares the data set; returns its directory."""
    builder = SoraToyWorld(data_dir=data_dir, num_train=num_train, num_eval=num_eval, toy_config=toy_config,
                           seed=seed)
    builder.download_and_prepare()
    return str(builder.data_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--num_train", type=int, default=1000)
    parser.add_argument("--num_eval", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.data_dir, args.num_train, args.num_eval, seed=args.seed))


if __name__ == "__main__":
    main()
