"""Re-caption a data set with a trained captioner (DALL-E 3 / Sora re-captioning).

    python -m sora_jax.recaption --workdir=CAPTIONER_DIR --data=ARRAYRECORD_GLOB --out=OUT_DIR \
        [--batch_size=16] [--step=N] [--no_ema] [--on_error=raise|skip] [--shard_size=256]

Reads ArrayRecord shards in the project's record format (data/importer.py,
data/sources.py), captions every video with greedy decoding and writes the same
records to OUT/data-NNNNN.array_record with `caption` replaced by the new
descriptive caption and the old one kept as `original_caption` (a record that
already has one keeps it, so the human caption survives repeated re-captioning).
Videos and every other field are copied unchanged.

What the captioner sees is what it was trained on: the clip and resolution policy
of the captioner's own config.data (first `frames` frames, native size within
its pixel budget). Videos are batched by shape, each shape compiled once.
OUT/recaption_report.json records counts, shapes, speed and a few examples.
Train on the result with `--config.data.source=arrayrecord --config.data.arrayrecord=OUT`.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import time

import numpy as np
import tqdm


def _latest_step(workdir: str) -> int | None:
    directory = os.path.join(workdir, "checkpoints")
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
    return max(steps) if steps else None


def recaption(workdir: str, data: str, out: str, *, batch_size: int = 16, step: int | None = None,
              use_ema: bool = True, on_error: str = "raise", shard_size: int = 256, chunk: int = 256,
              progress: bool = True) -> dict:
    """Rewrites the captions of the records at `data` into `out`; returns (and writes) the report."""
    from sora_jax.data import sources, transforms
    from sora_jax.stages import captioner as cap
    from sora_jax.train import checkpoint

    if on_error not in ("raise", "skip"):
        raise ValueError(f"--on_error must be 'raise' or 'skip', got {on_error!r}")
    config, model = checkpoint.restore_model(workdir, step=step, use_ema=use_ema)
    if config.stage != "captioner":
        raise ValueError(f"{workdir} is a {config.stage!r} workdir, not a captioner's")
    vocab = cap.read_vocabulary(workdir)
    source = sources.ArrayRecordSource(data)
    if os.path.abspath(out) in {os.path.dirname(os.path.abspath(p)) for p in source.paths}:
        raise ValueError(f"--out={out} holds the input shards; write the re-captioned set elsewhere")
    transform = transforms.VideoTransform(config.data, train=False)
    captioner = cap.CaptionWriter(model, vocab, batch_size=batch_size, max_len=int(config.data.text_len))

    os.makedirs(out, exist_ok=True)
    for stale in (p for p in os.listdir(out) if p.endswith(".array_record")):
        os.remove(os.path.join(out, stale))
    writer = sources.ShardWriter(out, shard_size, "data")
    report = {"captioner": os.path.abspath(workdir), "step": step if step is not None else _latest_step(workdir),
              "input": source.paths, "records": len(source), "written": 0, "skipped": {},
              "shapes": collections.Counter(), "examples": []}
    words_new, words_old = [], []
    start = time.perf_counter()
    bar = tqdm.tqdm(total=len(source), desc="recaptioning", unit="video", disable=not progress)
    try:
        for first in range(0, len(source), chunk):
            records, videos = [], []
            for i in range(first, min(first + chunk, len(source))):
                try:
                    record = source[i]
                    video = transform(record)["video"]
                except (sources.DataError, KeyError) as e:
                    if on_error == "raise":
                        raise sources.DataError(f"record {i} of {data}: {e}") from e
                    logging.warning("skipping record %d: %s", i, e)
                    report["skipped"][str(i)] = str(e)
                    bar.update(1)
                    continue
                records.append(record)
                videos.append(video)
                report["shapes"]["x".join(map(str, video.shape[:3]))] += 1
            for record, caption in zip(records, captioner.captions(videos)):
                original = record.get("caption", "")
                new = dict(record, caption=caption, original_caption=record.get("original_caption", original))
                writer.write(new)
                words_new.append(len(caption.split()))
                words_old.append(len(original.split()))
                if len(report["examples"]) < 5:
                    report["examples"].append({"index": record.get("index"), "original_caption": original,
                                               "caption": caption})
                report["written"] += 1
                bar.update(1)
    finally:
        writer.close()
        bar.close()
    seconds = time.perf_counter() - start
    report.update(seconds=round(seconds, 3), videos_per_s=round(report["written"] / max(seconds, 1e-9), 3),
                  mean_words_caption=float(np.mean(words_new)) if words_new else 0.0,
                  mean_words_original=float(np.mean(words_old)) if words_old else 0.0,
                  shards=[os.path.basename(p) for p in writer.paths], shapes=dict(report["shapes"]))
    with open(os.path.join(out, "recaption_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the captioner's training workdir")
    parser.add_argument("--data", required=True, help="ArrayRecord files, globs or directories (comma-separated)")
    parser.add_argument("--out", required=True, help="output folder for the re-captioned shards")
    parser.add_argument("--batch_size", type=int, default=16, help="videos per decoding batch")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--no_ema", action="store_true", help="use the raw weights, not the EMA ones")
    parser.add_argument("--on_error", choices=("raise", "skip"), default="raise")
    parser.add_argument("--shard_size", type=int, default=256, help="records per output shard")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from sora_jax.data import sources

    try:
        report = recaption(args.workdir, args.data, args.out, batch_size=args.batch_size, step=args.step,
                           use_ema=not args.no_ema, on_error=args.on_error, shard_size=args.shard_size)
    except (sources.DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"re-captioned {report['written']} of {report['records']} videos in {report['seconds']:.1f} s "
          f"({report['videos_per_s']:.2f} videos/s) with {args.workdir} step {report['step']} -> {args.out}; "
          f"skipped {len(report['skipped'])}; shapes {report['shapes']}")
    print(f"mean words: {report['mean_words_caption']:.1f} new vs {report['mean_words_original']:.1f} original")
    for ex in report["examples"][:2]:
        print(f"  original: {ex['original_caption']}\n  new:      {ex['caption']}")
    print(f"report: {os.path.join(args.out, 'recaption_report.json')}")
    return 0


if __name__ == "__main__":
    from sora_jax import hugepages

    hugepages.reexec_with_hugepages()  # before JAX starts: see sora_jax/hugepages.py
    sys.exit(main())
