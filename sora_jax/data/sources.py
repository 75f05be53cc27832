"""Random-access sources of raw video records (grain `RandomAccessDataSource` protocol).

Every source yields the same *raw record*, whatever the storage:

    {"video": uint8 (T, H, W, 3) at native size, "caption": str, "short_caption": str,
     "fps": float, "index": int, "ground_truth": str (JSON, "" when unknown)}

Sources:
  * `ToyWorldSource`: the procedural toy world; nothing stored, examples made on demand.
  * `ArrayRecordSource`: shards written by this project (data/importer.py,
    data/tfds_builder.py's exporter, data/latent_cache.py), in the record format below.
  * `TfdsSource`: a TFDS data set by name through `tfds.data_source` (ArrayRecord
    files; TensorFlow is not needed), with a feature mapping for common video sets.

Record format (one ArrayRecord entry = one msgpack map, version "sora_jax/1"):
numpy arrays are stored as msgpack maps {"__nd__": True, "dtype": str, "shape": [..],
"data": raw C-order bytes}; everything else is a plain msgpack value. `encode_record`
and `decode_record` are the whole format; any language with msgpack can read it.
"""

from __future__ import annotations

import glob
import json
import os
import threading
from typing import Any, Callable, Mapping, Sequence

import msgpack
import numpy as np

RECORD_VERSION = "sora_jax/1"


class DataError(ValueError):
    """A bad record, shard or file; the message names it."""


# --- record format ------------------------------------------------------------


def _pack_default(obj):
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return {"__nd__": True, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} in a record")


def _unpack_hook(obj):
    if obj.get("__nd__"):
        return np.frombuffer(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    return obj


def encode_record(record: Mapping[str, Any]) -> bytes:
    return msgpack.packb({"version": RECORD_VERSION, **record}, default=_pack_default, use_bin_type=True)


def decode_record(data: bytes, where: str = "record") -> dict:
    try:
        record = msgpack.unpackb(data, object_hook=_unpack_hook, raw=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise DataError(f"{where}: not a sora_jax record ({type(e).__name__}: {e})") from e
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        raise DataError(f"{where}: not a {RECORD_VERSION} record (got version {record.get('version')!r})")
    record.pop("version")
    return record


def check_video(video: np.ndarray, where: str) -> np.ndarray:
    """Checks a raw video is uint8 (T>=1, H, W, 3); names `where` otherwise."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise DataError(f"{where}: video must be (T, H, W, 3) RGB, got shape {video.shape}")
    if video.shape[0] == 0:
        raise DataError(f"{where}: video has zero frames")
    if video.dtype != np.uint8:
        raise DataError(f"{where}: video must be uint8, got {video.dtype}")
    return video


class ShardWriter:
    """Writes records into OUT/{prefix}-NNNNN.array_record shards of `shard_size` records."""

    def __init__(self, directory: str, shard_size: int, prefix: str):
        from array_record.python import array_record_module

        self._module = array_record_module
        self.directory, self.shard_size, self.prefix = directory, shard_size, prefix
        self.paths: list[str] = []
        self._writer, self._count = None, 0

    def write(self, record: dict) -> None:
        if self._writer is None or self._count == self.shard_size:
            self.close()
            path = os.path.join(self.directory, f"{self.prefix}-{len(self.paths):05d}.array_record")
            self._writer = self._module.ArrayRecordWriter(path, "group_size:1")
            self.paths.append(path)
            self._count = 0
        self._writer.write(encode_record(record))
        self._count += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# --- toy world ------------------------------------------------------------------


class ToyWorldSource:
    """The procedural toy world as a random-access source; example i is world index i."""

    def __init__(self, toy_config, seed: int, num_examples: int):
        from sora_jax.data import toy_world

        self._world = toy_world.ToyWorld(toy_config, seed=seed, num_examples=num_examples)

    def __len__(self) -> int:
        return len(self._world)

    def __getitem__(self, index: int) -> dict:
        record = dict(self._world[int(index)])
        record["video"] = check_video(record["video"], f"toy world example {index}")
        return record

    def __repr__(self) -> str:
        return f"ToyWorldSource(len={len(self)})"


# --- ArrayRecord shards written by this project ------------------------------------


def resolve_paths(spec: str | Sequence[str]) -> list[str]:
    """Comma-separated files, globs or directories -> sorted list of *.array_record* files."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for item in filter(None, items):
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.array_record*")))
        elif any(ch in item for ch in "*?["):
            found = sorted(glob.glob(item))
        else:
            found = [item] if os.path.exists(item) else []
        if not found:
            raise DataError(f"no ArrayRecord files at {item!r}")
        paths.extend(found)
    if not paths:
        raise DataError(f"no ArrayRecord files given (got {spec!r})")
    return paths


class ArrayRecordSource:
    """Records of one or more ArrayRecord shards, indexed across shards in order.

    Readers are opened lazily per thread (so the source pickles into grain worker
    processes and reads safely from grain's reader threads). Every error names the
    shard and the record within it.
    """

    def __init__(self, paths: str | Sequence[str], decode: Callable[[bytes, str], dict] = decode_record):
        from array_record.python import array_record_module

        self.paths = resolve_paths(paths)
        self._decode = decode
        self._lengths = []
        for path in self.paths:
            size = os.path.getsize(path)
            try:
                count = array_record_module.ArrayRecordReader(path).num_records()
            except Exception as e:
                raise DataError(f"unreadable ArrayRecord shard {path}: {e}") from e
            if count == 0 and size > 0:
                raise DataError(f"unreadable ArrayRecord shard {path}: {size} bytes but no records (corrupt?)")
            self._lengths.append(count)
        self._offsets = np.cumsum([0] + self._lengths)
        self._local = threading.local()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_local")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _reader(self, shard: int):
        from array_record.python import array_record_module

        readers = self._local.__dict__.setdefault("readers", {})
        if shard not in readers:
            readers[shard] = array_record_module.ArrayRecordReader(self.paths[shard], "readahead_buffer_size:0")
        return readers[shard]

    def locate(self, index: int) -> tuple[str, int]:
        """(shard path, record number within the shard) of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records in {self.paths}")
        shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return self.paths[shard], int(index - self._offsets[shard])

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        path, local = self.locate(index)
        shard = self.paths.index(path)
        where = f"{path} record {local}"
        try:
            data = self._reader(shard).read([local])[0]
        except Exception as e:
            raise DataError(f"cannot read {where}: {e}") from e
        record = self._decode(data, where)
        if "video" in record:
            record["video"] = check_video(record["video"], where)
        return record

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} shards, {len(self)} records)"


# --- TFDS data sets by name ----------------------------------------------------------

# How the features of known TFDS video data sets map onto a raw record:
# (video feature, caption function of (example, info), fps).
def _label_caption(key: str, template: str):
    def caption(example, info):
        label = int(example[key])
        names = info.features[key].names if hasattr(info.features[key], "names") else None
        name = names[label] if names else str(label)
        # UCF101 names are CamelCase ("ApplyEyeMakeup") -> "apply eye makeup".
        words = "".join(" " + c.lower() if c.isupper() else c for c in name).strip().replace("_", " ")
        return template.format(words)

    return caption


TFDS_FEATURES: dict[str, tuple[str, Callable, float]] = {
    "ucf101": ("video", _label_caption("label", "a video of a person doing {}"), 25.0),
    "bair_robot_pushing_small": ("image_main", lambda ex, info: "a robot arm pushing objects on a table", 10.0),
    "moving_mnist": ("image_sequence", lambda ex, info: "two handwritten digits moving and bouncing", 10.0),
    "kinetics400": ("video", _label_caption("label", "a video of {}"), 25.0),
}
_TEXT_KEYS = ("caption", "text", "description", "title")


def _tfds_mapping(name: str, info) -> tuple[str, Callable, float]:
    base = name.split("/")[0].split(":")[0]
    if base in TFDS_FEATURES:
        return TFDS_FEATURES[base]
    # Unknown set: the first video-like feature, and a text or label feature as caption.
    import tensorflow_datasets as tfds

    video_key = next((k for k, f in info.features.items() if isinstance(f, tfds.features.Video)), None)
    video_key = video_key or next((k for k in ("video", "frames", "image_sequence") if k in info.features), None)
    if video_key is None:
        raise DataError(f"TFDS data set {name!r} has no Video (or 'video'/'frames') feature; features: {list(info.features)}")
    for key in _TEXT_KEYS:
        if key in info.features:
            return video_key, (lambda ex, info, key=key: _as_str(ex[key])), 0.0
    label_key = next((k for k, f in info.features.items() if isinstance(f, tfds.features.ClassLabel)), None)
    if label_key:
        return video_key, _label_caption(label_key, "a video of {}"), 0.0
    raise DataError(f"TFDS data set {name!r}: no caption, text or label feature among {list(info.features)}")


def _as_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def to_rgb(video: np.ndarray, where: str) -> np.ndarray:
    """Grayscale -> RGB, RGBA -> RGB (alpha dropped); anything else is an error naming `where`."""
    video = np.asarray(video)
    if video.ndim == 3:
        video = video[..., None]
    if video.ndim != 4:
        raise DataError(f"{where}: expected video (T, H, W, C), got shape {video.shape}")
    if video.shape[-1] == 1:
        video = np.repeat(video, 3, axis=-1)
    elif video.shape[-1] == 4:
        video = video[..., :3]
    elif video.shape[-1] != 3:
        raise DataError(f"{where}: video has {video.shape[-1]} channels; expected 1, 3 or 4")
    if video.dtype != np.uint8:
        raise DataError(f"{where}: video must be uint8, got {video.dtype}")
    return np.ascontiguousarray(video)


class TfdsSource:
    """A prepared TFDS data set read with `tfds.data_source` (no TensorFlow needed).

    The data set must already be prepared in `data_dir` (array_record file format);
    nothing is downloaded. Our own toy-world builder (data/tfds_builder.py) stores
    records in the raw-record layout already, and is passed through unchanged.
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        import tensorflow_datasets as tfds

        self.name, self.split = name, split
        if name.split(":")[0] == "sora_toy_world":
            from sora_jax.data import tfds_builder  # noqa: F401  (registers the builder)
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
        except Exception as e:
            raise DataError(
                f"TFDS data set {name!r} split {split!r} is not available in data_dir={data_dir or '~/tensorflow_datasets'}"
                f" as ArrayRecord ({type(e).__name__}: {e}). Prepare it first, e.g. "
                f"`tfds build {name} --file_format=array_record --data_dir=DIR`."
            ) from e
        self._info = self._source.dataset_info
        features = set(self._info.features)
        self._raw = {"video", "caption", "short_caption"} <= features
        if not self._raw:
            self._video_key, self._caption_fn, self._fps = _tfds_mapping(name, self._info)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        where = f"TFDS {self.name} split {self.split} example {index}"
        try:
            ex = self._source[index]
        except Exception as e:
            raise DataError(f"cannot read {where}: {e}") from e
        if self._raw:
            return {
                "video": to_rgb(ex["video"], where),
                "caption": _as_str(ex["caption"]),
                "short_caption": _as_str(ex["short_caption"]),
                "fps": float(ex.get("fps", 0.0)),
                "index": int(ex.get("index", index)),
                "ground_truth": _as_str(ex.get("ground_truth", b"")),
            }
        caption = self._caption_fn(ex, self._info)
        return {
            "video": to_rgb(ex[self._video_key], where),
            "caption": caption,
            "short_caption": " ".join(caption.split()[:6]),
            "fps": self._fps,
            "index": index,
            "ground_truth": "",
        }

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, len={len(self)})"


# --- train / eval split -------------------------------------------------------------


def split_range(total: int, num_train: int, num_eval: int, split: str, where: str) -> range:
    """Held-out eval indices are the last `num_eval` ones; train is the rest (capped)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if num_eval >= total:
        raise DataError(f"{where}: {total} examples cannot hold out num_eval={num_eval} and still train")
    train_end = total - num_eval if num_train <= 0 else min(num_train, total - num_eval)
    return range(0, train_end) if split == "train" else range(total - num_eval, total)


class IndexedSource:
    """A view of `source` restricted to `indices` (keeps the source's own error messages)."""

    def __init__(self, source, indices: Sequence[int]):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[self.indices[int(i)]]

    def __repr__(self) -> str:
        return f"{self.source!r}[{self.indices}]"


def make_source(data_config, split: str):
    """The raw-record source of `split` ("train" | "eval") that `data_config.source` names."""
    c = data_config
    if c.source == "toy":
        total = c.num_train + c.num_eval
        return IndexedSource(ToyWorldSource(c.toy, seed=c.toy_seed, num_examples=total),
                             split_range(total, c.num_train, c.num_eval, split, "toy world"))
    if c.source == "arrayrecord":
        if not c.arrayrecord:
            raise DataError("config.data.source='arrayrecord' needs config.data.arrayrecord=PATHS")
        source = ArrayRecordSource(c.arrayrecord)
        return IndexedSource(source, split_range(len(source), c.num_train, c.num_eval, split, c.arrayrecord))
    if c.source == "tfds":
        if not c.tfds_name:
            raise DataError("config.data.source='tfds' needs config.data.tfds_name")
        if split == "eval" and c.tfds_eval_split:
            source = TfdsSource(c.tfds_name, c.tfds_eval_split, c.tfds_dir)
            return IndexedSource(source, range(min(c.num_eval, len(source))))
        source = TfdsSource(c.tfds_name, c.tfds_split, c.tfds_dir)
        if c.tfds_eval_split:  # A separate eval split: train may use all of this one.
            return IndexedSource(source, range(min(c.num_train, len(source)) if c.num_train > 0 else len(source)))
        return IndexedSource(source, split_range(len(source), c.num_train, c.num_eval, split, f"TFDS {c.tfds_name}"))
    raise ValueError(f"config.data.source must be 'toy', 'tfds' or 'arrayrecord', got {c.source!r}")


def ground_truth(record: Mapping[str, Any]) -> Any:
    """The parsed ground truth of a record (None when the source has none)."""
    text = record.get("ground_truth") or ""
    return json.loads(text) if text else None
