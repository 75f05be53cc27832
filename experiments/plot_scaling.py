"""Scaling curves of a sweep: held-out loss vs training compute, isoFLOP view, fitted exponents.

  python experiments/plot_scaling.py --results=SWEEP_ROOT/results.json [--out=SWEEP_ROOT/plots]

Reads the results.json written by experiments/scaling_sweep.py and writes, as
PNG and SVG:
  loss_vs_compute   final held-out loss (fixed diffusion times) of every point vs
                    its cumulative training FLOPs, log-log, each run's eval
                    history as a thin line, the fitted L(C) = a C^-b + c on the
                    compute frontier (best point per budget) and a bootstrap band;
  loss_per_t        the same per fixed diffusion time t (when recorded);
  isoflop           loss vs parameters at each budget that has several sizes,
                    with the parabola in log N and its minimum;
and scaling_fit.json with the fitted parameters, exponent intervals and minima.
With --grid, samples_grid.{mp4,gif,png}: the final samples of every point (same
prompts and seeds, written by the DiT stage at the end of training and decoded
with the sweep's VAE) side by side, ordered by compute: the report's figure.
With --render_prompts="p1|p2" --render_seeds=0,1, those prompts and seeds are first
rendered with every point's checkpoint by `python -m sora_jax.sample` and gridded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sora_jax import powerlaw, scaling  # noqa: E402


def frontier(rows: Sequence[Mapping], loss_key: str = "final_eval_loss") -> list[Mapping]:
    """The best (lowest-loss) point of each compute budget, sorted by FLOPs."""
    by_budget = defaultdict(list)
    for row in rows:
        if row.get(loss_key) is not None and np.isfinite(row[loss_key]):
            by_budget[float(row["multiple"])].append(row)
    best = [min(group, key=lambda r: r[loss_key]) for group in by_budget.values()]
    return sorted(best, key=lambda r: r["flops"])


def _fit_entry(points: Sequence[Mapping], loss_key: str, num_bootstrap: int, seed: int) -> dict | None:
    flops = np.array([p["flops"] for p in points], np.float64)
    loss = np.array([p[loss_key] for p in points], np.float64)
    if np.unique(flops).size < 2:
        return None
    fit = powerlaw.fit_power_law(flops, loss)
    grid = np.logspace(np.log10(flops.min()) - 0.3, np.log10(flops.max()) + 0.3, 60)
    band = powerlaw.bootstrap_band(flops, loss, grid, fit, num_samples=num_bootstrap, seed=seed)
    return dict(
        fit=fit.as_dict(), exponent_interval=list(band["b_interval"]), band_level=band["level"],
        band_degenerate=band["degenerate"], bootstrap_samples=band["num_samples"],
        points=[p["point"] for p in points], grid=grid.tolist(), lo=np.asarray(band["lo"]).tolist(),
        hi=np.asarray(band["hi"]).tolist(), curve=fit(grid).tolist(),
    )


def analyze(rows: Sequence[Mapping], num_bootstrap: int = 500, seed: int = 0) -> dict:
    """All fits of a sweep as one JSON-able dict (what scaling_fit.json holds)."""
    out: dict = dict(num_points=len(rows))
    front = frontier(rows)
    out["loss_vs_compute"] = _fit_entry(front, "final_eval_loss", num_bootstrap, seed) if front else None
    per_t = {}
    for key in sorted({k for r in rows for k in r if k.startswith("eval_loss_t")}):
        entry = _fit_entry(frontier(rows, key), key, max(num_bootstrap // 4, 50), seed)
        if entry:
            per_t[key] = {k: v for k, v in entry.items() if k not in ("grid", "lo", "hi", "curve")}
    out["per_t"] = per_t
    isoflop = {}
    by_budget = defaultdict(list)
    for row in rows:
        by_budget[float(row["multiple"])].append(row)
    for multiple, group in sorted(by_budget.items()):
        sizes = {r["params"] for r in group}
        if len(sizes) >= 3:
            par = powerlaw.fit_isoflop_parabola([r["params"] for r in group], [r["final_eval_loss"] for r in group])
            isoflop[f"{multiple:g}x"] = dict(par, flops=float(np.median([r["flops"] for r in group])))
    out["isoflop"] = isoflop
    interior = [v for v in isoflop.values() if v["interior"]]
    if len({v["flops"] for v in interior}) >= 2:
        out["allocation"] = powerlaw.fit_allocation_exponent([v["flops"] for v in interior], [v["n_opt"] for v in interior])
    return out


def _save(fig, out_dir: str, stem: str) -> list[str]:
    paths = [os.path.join(out_dir, f"{stem}.{ext}") for ext in ("png", "svg")]
    for path in paths:
        fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return paths


def plot_loss_vs_compute(rows: Sequence[Mapping], analysis: Mapping, ax=None, loss_key: str = "final_eval_loss"):
    """Draws points, eval histories, the fit and its band on `ax` (a new figure if None)."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
    sizes = sorted({r["params"] for r in rows})
    cmap = plt.get_cmap("viridis")
    for row in rows:
        color = cmap(sizes.index(row["params"]) / max(len(sizes) - 1, 1))
        history = [h for h in row.get("eval_history", []) if h.get(loss_key.replace("final_", "")) is not None]
        if loss_key == "final_eval_loss" and len(history) > 1:
            ax.plot([h["flops"] for h in history], [h["eval_loss"] for h in history], color=color, lw=0.8, alpha=0.5)
        ax.scatter(row["flops"], row[loss_key], color=color, zorder=3, edgecolor="k", linewidth=0.5)
        ax.annotate(f"{row['point']}\n{row['params'] / 1e6:.2g}M", (row["flops"], row[loss_key]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    entry = analysis.get("loss_vs_compute") if loss_key == "final_eval_loss" else None
    if entry:
        fit = entry["fit"]
        label = f"L = {fit['a']:.3g} C^-{fit['b']:.3f}" + (
            f" + {fit['c']:.3g}" if fit["fit_offset"] else f" (c = 0: {fit['n_points']} points)")
        lo, hi = entry["exponent_interval"]
        if not entry["band_degenerate"]:
            ax.fill_between(entry["grid"], entry["lo"], entry["hi"], color="C1", alpha=0.2,
                            label=f"{int(entry['band_level'] * 100)}% bootstrap band; b in [{lo:.3f}, {hi:.3f}]")
        ax.plot(entry["grid"], entry["curve"], color="C1", lw=1.5, label=label)
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs, analytic)")
    ax.set_ylabel("held-out loss (fixed diffusion times)" if loss_key == "final_eval_loss" else loss_key)
    ax.grid(True, which="both", alpha=0.3)
    return fig if fig is not None else ax.figure


def plot_per_t(rows: Sequence[Mapping], analysis: Mapping):
    keys = sorted({k for r in rows for k in r if k.startswith("eval_loss_t")})
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        plot_loss_vs_compute([r for r in rows if r.get(key) is not None], analysis, ax=ax, loss_key=key)
        fit = analysis["per_t"].get(key, {}).get("fit")
        title = key.replace("eval_loss_", "")
        ax.set_title(title + (f": b = {fit['b']:.3f}" if fit else ""), fontsize=9)
        ax.set_ylabel("")
    fig.tight_layout()
    return fig


def plot_isoflop(rows: Sequence[Mapping], analysis: Mapping):
    if not analysis.get("isoflop"):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i, (name, par) in enumerate(sorted(analysis["isoflop"].items(), key=lambda kv: kv[1]["flops"])):
        group = sorted((r for r in rows if f"{float(r['multiple']):g}x" == name), key=lambda r: r["params"])
        n = np.array([r["params"] for r in group], np.float64)
        loss = np.array([r["final_eval_loss"] for r in group])
        ax.scatter(n, loss, color=f"C{i}", label=f"{name} (C = {par['flops']:.2g})", zorder=3)
        k2, k1, k0 = np.polyfit(np.log(n), loss, 2)
        grid = np.logspace(np.log10(n.min()), np.log10(n.max()), 50)
        ax.plot(grid, np.polyval([k2, k1, k0], np.log(grid)), color=f"C{i}", lw=1)
        ax.axvline(par["n_opt"], color=f"C{i}", ls="--" if par["interior"] else ":", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("held-out loss")
    ax.set_title("isoFLOP: loss vs size at fixed compute (dashed: fitted optimum)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def write_all(rows: Sequence[Mapping], out_dir: str, num_bootstrap: int = 500, seed: int = 0) -> dict:
    """Writes every plot (PNG + SVG) and scaling_fit.json; returns {name: [paths]}."""
    os.makedirs(out_dir, exist_ok=True)
    analysis = analyze(rows, num_bootstrap=num_bootstrap, seed=seed)
    written = {"loss_vs_compute": _save(plot_loss_vs_compute(rows, analysis), out_dir, "loss_vs_compute")}
    for name, fig in (("loss_per_t", plot_per_t(rows, analysis)), ("isoflop", plot_isoflop(rows, analysis))):
        if fig is not None:
            written[name] = _save(fig, out_dir, name)
    fit_path = os.path.join(out_dir, "scaling_fit.json")
    compact = json.loads(json.dumps(analysis))
    if compact.get("loss_vs_compute"):
        for key in ("grid", "lo", "hi", "curve"):
            compact["loss_vs_compute"].pop(key)
    with open(fit_path, "w") as f:
        json.dump(compact, f, indent=1)
    written["fit"] = [fit_path]
    return written


# --- side-by-side samples (the report's figure) -----------------------------------------

SAMPLE_KEYS = ("prompts", "latent_shape", "sampler", "steps", "guidance", "seed")


def final_samples(workdir: str) -> tuple[dict, list[np.ndarray]]:
    """The decoded samples the DiT stage wrote after a point's last step (workdir/samples/step_*)."""
    from sora_jax.data import video_io

    directory = os.path.join(workdir, "samples")
    steps = sorted(d for d in os.listdir(directory) if d.startswith("step_")) if os.path.isdir(directory) else []
    if not steps:
        raise FileNotFoundError(f"{directory}: no samples; the DiT stage writes them at the end of training")
    last = os.path.join(directory, steps[-1])
    with open(os.path.join(last, "prompts.json")) as f:
        meta = json.load(f)
    videos = []
    for i in range(len(meta["prompts"])):
        path = os.path.join(last, f"sample_{i}.gif")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} is missing: the samples of {workdir} were saved as latents only (no VAE to decode "
                "them); train the sweep with vae=DIR so the stage decodes its samples")
        videos.append(video_io.read_video(path)[0])
    return meta, videos


def _label(text: str, width: int, height: int = 14) -> np.ndarray:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(image).text((2, 1), text, fill=(0, 0, 0))
    return np.asarray(image)


RENDER_KEYS = ("prompt", "seed", "mode", "steps", "guidance", "sampler", "shift", "size", "frames")


def render_samples(rows: Sequence[Mapping], root: str, prompts: Sequence[str], seeds: Sequence[int] = (0,),
                   sample_args: Sequence[str] = (), out_name: str = "grid_samples", command=None) -> None:
    """Renders prompts x seeds with every point's final checkpoint through the sampling CLI,
    `python -m sora_jax.sample --workdir=POINT --prompts=JOBS --out=POINT/out_name` (issue 6).
    Points whose outputs already exist for these jobs are skipped (resumable)."""
    import subprocess

    jobs = [dict(mode="t2v", prompt=p, seed=int(seed), name=f"p{i}_seed{seed}")
            for i, p in enumerate(prompts) for seed in seeds]
    for row in rows:
        workdir = os.path.join(root, row["point"])
        out = os.path.join(workdir, out_name)
        if all(os.path.exists(os.path.join(out, j["name"] + ".gif")) for j in jobs) and _same_jobs(out, jobs):
            continue
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "jobs.jsonl"), "w") as f:
            f.write("".join(json.dumps(j) + "\n" for j in jobs))
        cmd = (command or [sys.executable, "-m", "sora_jax.sample"]) + [
            f"--workdir={workdir}", f"--prompts={os.path.join(out, 'jobs.jsonl')}", f"--out={out}", *sample_args]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"sampling {row['point']} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")


def _same_jobs(out: str, jobs: Sequence[Mapping]) -> bool:
    try:
        with open(os.path.join(out, "jobs.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()] == list(jobs)
    except OSError:
        return False


def rendered_samples(workdir: str, out_name: str = "grid_samples") -> tuple[dict, list[np.ndarray]]:
    """The videos render_samples wrote for one point, with the settings each was sampled with."""
    from sora_jax.data import video_io

    out = os.path.join(workdir, out_name)
    with open(os.path.join(out, "jobs.jsonl")) as f:
        jobs = [json.loads(line) for line in f if line.strip()]
    settings, videos = [], []
    for job in jobs:
        with open(os.path.join(out, job["name"] + ".json")) as f:
            meta = json.load(f)
        settings.append({k: meta.get(k) for k in RENDER_KEYS})
        videos.append(video_io.read_video(os.path.join(out, job["name"] + ".gif"))[0])
    return dict(jobs=settings, prompts=[j["prompt"] for j in jobs]), videos


def sample_grid(rows: Sequence[Mapping], root: str, out_dir: str, fps: float = 8.0, source: str = "final",
                scale: int = 1) -> list[str]:
    """One video: a column per sweep point (by compute), a row per prompt, same prompts and seeds.

    scale: nearest-neighbour upscaling of every cell (toy-scale samples are ~48 px).

    source "final": the samples the DiT stage wrote after each point's last step (config.samples,
    shared by configs/scaling.py); "rendered": those of render_samples. Every point must have
    sampled with the same settings; a mismatch is an error rather than a misleading figure.
    """
    from sora_jax.data import video_io

    if source not in ("final", "rendered"):
        raise ValueError(f"sample_grid: source must be 'final' or 'rendered', got {source!r}")
    read = final_samples if source == "final" else rendered_samples
    ordered = sorted(rows, key=lambda r: r["flops"])
    metas, columns = [], []
    for row in ordered:
        meta, videos = read(os.path.join(root, row["point"]))
        metas.append(meta)
        columns.append(videos)
    keys = SAMPLE_KEYS if source == "final" else ("jobs", "prompts")
    reference = {k: metas[0].get(k) for k in keys}
    for row, meta in zip(ordered, metas):
        if {k: meta.get(k) for k in keys} != reference:
            raise ValueError(f"point {row['point']} sampled with {({k: meta.get(k) for k in keys})}, "
                             f"not {reference}: the grid needs the same prompts and seeds everywhere")
    if scale < 1:
        raise ValueError(f"sample_grid: scale must be >= 1, got {scale}")
    columns = [[np.repeat(np.repeat(v, scale, 1), scale, 2) for v in col] for col in columns]
    all_videos = [v for col in columns for v in col]
    t = max(v.shape[0] for v in all_videos)
    h = max(v.shape[1] for v in all_videos)
    w = max(v.shape[2] for v in all_videos)

    def fit(video):  # same length (hold the last frame) and size (white padding)
        video = np.concatenate([video, np.repeat(video[-1:], t - video.shape[0], 0)], 0)
        return np.pad(video, ((0, 0), (0, h - video.shape[1]), (0, w - video.shape[2]), (0, 0)), constant_values=255)

    pad = 2
    header = np.concatenate([np.concatenate([_label(f"{r['point']}", w), np.full((14, pad, 3), 255, np.uint8)], 1)
                             for r in ordered], 1)
    frames = []
    for k in range(t):
        grid_rows = [header]
        for p in range(len(reference["prompts"])):
            cells = [np.pad(fit(col[p])[k], ((0, pad), (0, pad), (0, 0)), constant_values=255) for col in columns]
            grid_rows.append(np.concatenate(cells, 1))
        frames.append(np.concatenate(grid_rows, 0))
    frames = np.stack(frames)
    os.makedirs(out_dir, exist_ok=True)
    paths = [video_io.write_video(os.path.join(out_dir, f"samples_grid.{ext}"), frames if ext != "png" else
                                  frames[t // 2:t // 2 + 1], fps) for ext in ("mp4", "gif", "png")]
    with open(os.path.join(out_dir, "samples_grid.json"), "w") as f:
        json.dump(dict(columns=[r["point"] for r in ordered], **reference), f, indent=1)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="results.json of a sweep (or its directory)")
    parser.add_argument("--out", default="", help="output directory (default: <results dir>/plots)")
    parser.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples for the band")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", action="store_true",
                        help="also write samples_grid.{mp4,gif,png}: every point's final samples side by side")
    parser.add_argument("--grid_scale", type=int, default=3, help="nearest-neighbour upscaling of the grid's cells")
    parser.add_argument("--render_prompts", default="",
                        help="'|'-separated prompts: render them with every point (python -m sora_jax.sample) "
                             "and grid those instead of the stage's own final samples")
    parser.add_argument("--render_seeds", default="0", help="comma-separated seeds for --render_prompts")
    parser.add_argument("--sample_args", default="", help="extra sampler flags, e.g. '--steps=32 --guidance=3'")
    args = parser.parse_args(argv)
    rows = scaling.read_results(args.results)
    results_dir = args.results if os.path.isdir(args.results) else os.path.dirname(os.path.abspath(args.results))
    out = args.out or os.path.join(results_dir, "plots")
    written = write_all(rows, out, num_bootstrap=args.bootstrap, seed=args.seed)
    if args.render_prompts:
        import shlex

        render_samples(rows, results_dir, [p.strip() for p in args.render_prompts.split("|") if p.strip()],
                       [int(x) for x in args.render_seeds.split(",") if x.strip()], shlex.split(args.sample_args))
        written["samples_grid"] = sample_grid(rows, results_dir, out, source="rendered", scale=args.grid_scale)
    elif args.grid:
        written["samples_grid"] = sample_grid(rows, results_dir, out, scale=args.grid_scale)
    for name, paths in written.items():
        print(f"{name}: {', '.join(paths)}")


if __name__ == "__main__":
    main()
