"""An animated GIF grid of toy-world samples, for the docs.

    python -m sora_jax.data.toy_gallery docs/gallery/toy_world.gif --n=12 --seed=0

writes the GIF and prints a Markdown table of each tile's captions (docs/toy_world.md).
Tiles keep their native aspect ratio, centred in equal cells; shorter clips loop.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw

from sora_jax.data import video_io
from sora_jax.data.toy_world import ToyWorld, ToyWorldConfig


def make_gallery(path: str, n: int = 12, seed: int = 0, cols: int = 4, scale: int = 2,
                 config: ToyWorldConfig | None = None) -> list[dict]:
    """Writes the grid to `path` (.gif); returns one dict per tile (number, index, size, captions)."""
    world = ToyWorld(config or ToyWorldConfig(), seed=seed, num_examples=max(n, 1))
    records = [world[i] for i in range(n)]
    cell_h = max(r["video"].shape[1] for r in records) + 6
    cell_w = max(r["video"].shape[2] for r in records) + 6
    num_frames = max(r["video"].shape[0] for r in records)
    rows = -(-n // cols)
    grid = np.full((num_frames, rows * cell_h, cols * cell_w, 3), 255, np.uint8)
    for k, r in enumerate(records):
        video = r["video"]
        t, h, w, _ = video.shape
        y0 = (k // cols) * cell_h + (cell_h - h) // 2
        x0 = (k % cols) * cell_w + (cell_w - w) // 2
        for f in range(num_frames):
            grid[f, y0:y0 + h, x0:x0 + w] = video[f % t]
    grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    for f in range(num_frames):  # tile numbers, to match the caption table
        image = Image.fromarray(grid[f])
        draw = ImageDraw.Draw(image)
        for k in range(n):
            draw.text(((k % cols) * cell_w * scale + 2, (k // cols) * cell_h * scale), str(k + 1), fill=(0, 0, 0))
        grid[f] = np.asarray(image)
    video_io.write_video(path, grid, fps=float(records[0]["fps"]))
    return [dict(tile=k + 1, index=r["index"], shape="x".join(map(str, r["video"].shape[:3])),
                 caption=r["caption"], short_caption=r["short_caption"]) for k, r in enumerate(records)]


def markdown_table(tiles: list[dict]) -> str:
    lines = ["| tile | T x H x W | short caption | caption |", "|---|---|---|---|"]
    lines += [f"| {t['tile']} | {t['shape']} | {t['short_caption']} | {t['caption']} |" for t in tiles]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(markdown_table(make_gallery(args.path, n=args.n, seed=args.seed)))
