"""Bring your own videos: a folder of video files + captions -> ArrayRecord shards.

    python -m sora_jax.data.importer --videos=DIR --captions=captions.jsonl --out=OUT \
        [--fps=8] [--max_frames=65] [--on_error=skip|raise] [--shard_size=256]

Captions file (one entry per video; the file name is relative to --videos):
  * jsonl: {"file": "clips/a.mp4", "caption": "a red kite ...", "short_caption": "red kite"}
  * csv with a header row: file,caption[,short_caption]
Videos are kept at their native size (resizing happens in the training transforms);
`--fps` resamples in time, `--max_frames` keeps the first N frames after that.
Grayscale videos become RGB and alpha channels are dropped; every file changed beyond
decoding (grayscale or alpha source, frame-rate resampling, frames cut) is listed
under "converted" in the report with what was done.
A file with no caption, a corrupt, truncated or empty video: an error naming the
file (--on_error=raise, default) or a counted skip with its reason (--on_error=skip).

Output: OUT/data-NNNNN.array_record (record format: data/sources.py) and
OUT/import_report.json {imported, skipped: {file: reason}, converted: {file: what changed},
captions_without_video}.
Train on it with `--config.data.source=arrayrecord --config.data.arrayrecord=OUT`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys

import numpy as np
import tqdm

from sora_jax.data import sources

VIDEO_EXTENSIONS = (".mp4", ".webm", ".gif", ".avi", ".mov", ".mkv", ".m4v", ".ogv", ".mpg", ".mpeg")


def read_captions(path: str) -> dict[str, dict]:
    """file name -> {"caption", "short_caption"} from a .jsonl or .csv file (errors name the line)."""
    out: dict[str, dict] = {}

    def add(entry: dict, where: str):
        name = entry.get("file") or entry.get("video") or entry.get("path")
        caption = entry.get("caption")
        if not name or not isinstance(caption, str) or not caption.strip():
            raise sources.DataError(f"{where}: need a 'file' and a non-empty 'caption', got {entry}")
        out[os.path.normpath(name)] = {"caption": caption.strip(),
                                       "short_caption": (entry.get("short_caption") or "").strip()}

    if not os.path.exists(path):
        raise sources.DataError(f"captions file {path} does not exist")
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise sources.DataError(f"{path} line {n}: not JSON ({e})") from e
                    add(entry, f"{path} line {n}")
    elif path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                add(row, f"{path} line {n}")
    else:
        raise sources.DataError(f"captions file {path} must end in .jsonl or .csv")
    return out


def list_videos(directory: str) -> list[str]:
    """Video files under `directory`, as sorted relative paths."""
    if not os.path.isdir(directory):
        raise sources.DataError(f"--videos={directory} is not a directory")
    found = []
    for root, _, files in os.walk(directory):
        for name in files:
            if name.lower().endswith(VIDEO_EXTENSIONS):
                found.append(os.path.normpath(os.path.relpath(os.path.join(root, name), directory)))
    return sorted(found)


def resample(frames: np.ndarray, fps: float, target_fps: float) -> tuple[np.ndarray, float]:
    """Nearest-earlier-frame resampling to `target_fps` (a no-op when target_fps <= 0)."""
    if target_fps <= 0 or fps <= 0 or abs(fps - target_fps) < 1e-6:
        return frames, fps
    step = fps / target_fps
    n = int(np.floor((len(frames) - 1) / step)) + 1
    idx = np.minimum(np.floor(np.arange(n) * step + 1e-6).astype(np.int64), len(frames) - 1)
    return frames[idx], float(target_fps)


_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def source_format_notes(path: str) -> list[str]:
    """What decoding to RGB changes in this file's stored pixel format: grayscale, alpha.

    `video_io.read_video` always returns RGB, so the stored format is read here from
    the header (FFmpeg's pixel format, or Pillow's image mode and palette) without
    decoding frames. Palette -> RGB is lossless and not noted; a palette of only
    grays is noted as grayscale.
    """
    notes = []
    if path.lower().endswith(".gif"):
        from PIL import Image

        with Image.open(path) as im:
            gray = im.mode in _GRAY_MODES
            if im.mode == "P" and im.palette is not None:
                colours = np.frombuffer(im.palette.tobytes(), np.uint8)
                if im.palette.mode == "RGB" and colours.size:
                    colours = colours[: colours.size // 3 * 3].reshape(-1, 3)
                    gray = bool(np.all(colours == colours[:, :1]))
            alpha = "A" in im.mode or "transparency" in im.info
    else:
        import av

        try:
            with av.open(path) as container:
                stream = container.streams.video[0]
                fmt = av.VideoFormat(stream.codec_context.pix_fmt) if stream.codec_context.pix_fmt else None
        except Exception:  # read_video has already decoded it; an unusual header only loses the note
            return notes
        if fmt is None:
            return notes
        colour = [c for c in fmt.components if not c.is_alpha]
        gray = len(colour) == 1 and not fmt.has_palette
        alpha = any(c.is_alpha for c in fmt.components)
    if gray:
        notes.append("grayscale -> RGB")
    if alpha:
        notes.append("alpha dropped")
    return notes


def load_video(path: str, *, target_fps: float, max_frames: int) -> tuple[np.ndarray, float, str]:
    """(uint8 RGB (T, H, W, 3), fps, conversion note or "") of one file; DataError naming it.

    The note lists every change beyond decoding, "; "-separated: a grayscale or alpha
    source format, frame-rate resampling and frames cut by `max_frames`.
    """
    from sora_jax.data import video_io

    try:
        frames, fps = video_io.read_video(path)
    except video_io.VideoReadError as e:
        raise sources.DataError(str(e) if path in str(e) else f"{path}: {e}") from e
    frames = np.asarray(frames)
    if frames.ndim < 3 or frames.shape[0] == 0:
        raise sources.DataError(f"{path}: video has zero frames")
    notes = source_format_notes(path)
    frames = sources.to_rgb(frames, path)
    source_fps, source_frames = float(fps or 0.0), frames.shape[0]
    frames, fps = resample(frames, source_fps, target_fps)
    if fps != source_fps:
        notes.append(f"{source_fps:g} fps -> {fps:g} fps ({source_frames} -> {frames.shape[0]} frames)")
    if 0 < max_frames < frames.shape[0]:
        notes.append(f"kept the first {max_frames} of {frames.shape[0]} frames")
        frames = frames[:max_frames]
    return np.ascontiguousarray(frames), fps, "; ".join(notes)


def import_videos(videos: str, captions: str, out: str, *, fps: float = 0.0, max_frames: int = 0,
                  on_error: str = "raise", shard_size: int = 256, progress: bool = True) -> dict:
    """Imports a folder of videos; returns (and writes to OUT/import_report.json) the report."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"--on_error must be 'raise' or 'skip', got {on_error!r}")
    table = read_captions(captions)
    files = list_videos(videos)
    if not files:
        raise sources.DataError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) under {videos}")
    os.makedirs(out, exist_ok=True)
    for stale in (p for p in os.listdir(out) if p.endswith(".array_record")):
        os.remove(os.path.join(out, stale))
    writer = sources.ShardWriter(out, shard_size, "data")
    report = {"imported": 0, "skipped": {}, "converted": {}, "frames": 0,
              "captions_without_video": sorted(set(table) - set(files))}
    try:
        for name in tqdm.tqdm(files, desc="importing videos", unit="video", disable=not progress):
            path = os.path.join(videos, name)
            try:
                if name not in table:
                    raise sources.DataError(f"{path}: no caption for this file in {captions}")
                frames, video_fps, note = load_video(path, target_fps=fps, max_frames=max_frames)
            except sources.DataError as e:
                if on_error == "raise":
                    raise
                logging.warning("skipping %s", e)
                report["skipped"][name] = str(e)
                continue
            if note:
                report["converted"][name] = note
            entry = table[name]
            writer.write({"video": frames, "caption": entry["caption"],
                          "short_caption": entry["short_caption"] or transforms_short(entry["caption"]),
                          "fps": video_fps, "index": report["imported"], "ground_truth": "", "source_file": name})
            report["imported"] += 1
            report["frames"] += int(frames.shape[0])
    finally:
        writer.close()
    report["shards"] = [os.path.basename(p) for p in writer.paths]
    with open(os.path.join(out, "import_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def transforms_short(caption: str) -> str:
    """A short caption when none is given: the first few words."""
    return " ".join(caption.split()[:6])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", required=True, help="folder of video files (searched recursively)")
    parser.add_argument("--captions", required=True, help="captions .jsonl or .csv")
    parser.add_argument("--out", required=True, help="output folder for ArrayRecord shards")
    parser.add_argument("--fps", type=float, default=0.0, help="resample to this frame rate (0 = keep)")
    parser.add_argument("--max_frames", type=int, default=0, help="keep at most N frames (0 = all)")
    parser.add_argument("--on_error", choices=("raise", "skip"), default="raise")
    parser.add_argument("--shard_size", type=int, default=256, help="records per ArrayRecord shard")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        report = import_videos(args.videos, args.captions, args.out, fps=args.fps, max_frames=args.max_frames,
                               on_error=args.on_error, shard_size=args.shard_size)
    except sources.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"imported {report['imported']} videos ({report['frames']} frames) into {len(report['shards'])} shards "
          f"at {args.out}; skipped {len(report['skipped'])}")
    for name, reason in report["skipped"].items():
        print(f"  skipped {name}: {reason}")
    converted = list(report["converted"].items())
    if converted:
        print(f"  converted {len(converted)} videos (all listed in the report), e.g.")
        for name, note in converted[:5]:
            print(f"    {name}: {note}")
    if report["captions_without_video"]:
        print(f"  {len(report['captions_without_video'])} captions name no video file, e.g. "
              f"{report['captions_without_video'][0]}")
    print(f"report: {os.path.join(args.out, 'import_report.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
