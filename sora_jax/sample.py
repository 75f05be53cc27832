"""Command line generation: every prompting mode from a trained DiT workdir.

  python -m sora_jax.sample --workdir=DIR [--step=N] --mode=t2v|t2i|i2v|extend|loop|edit|connect
      --prompt="a red circle bouncing" [--image=IMG] [--video=VID] [--video_b=VID] [--strength=0.6]
      [--frames=N] [--size=HxW] [--seed=S] [--steps=N] [--guidance=G] [--sampler=euler|heun]
      [--shift=auto|none|A] [--direction=forward|backward] [--context=1]
      [--expand=none|toy|openai] [--prompts=FILE.jsonl] [--out=DIR] [--mesh=data=-1]

Each video is written as OUT/NAME.mp4 (H.264), NAME.gif, NAME_sheet.png (contact
sheet), NAME_latents.npy and NAME.json (prompt, expanded prompt, mode, seed, steps,
guidance, shift, sampler, checkpoint step, size, frames, adjustments, timings); a
text-to-image result is NAME.png. `--prompts` reads one JSON object per line with
any of the flag names as keys ("prompt" required; "name" optional), flags giving
the defaults; a tqdm bar shows progress over the file.

Everything is checked before the model loads: both workdirs (config, a complete
checkpoint), every input file (VideoReadError names it), sizes (rounded to the
model's multiple, said on stdout) and frame counts (out of range: an error).
Prompt expansion with --expand=openai reads OPENAI_BASE_URL, OPENAI_MODEL and the
key from OPENAI_API_KEY (or --openai_key_env); the key is never printed or saved.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

FLAG_KEYS = ("mode", "prompt", "image", "video", "video_b", "strength", "frames", "size", "seed", "steps", "guidance",
             "sampler", "shift", "direction", "context", "expand", "name")
MODES = ("t2v", "t2i", "i2v", "extend", "loop", "edit", "connect")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sora_jax.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="DiT workdir (its config names the VAE workdir)")
    p.add_argument("--vae_workdir", default=None, help="override the VAE workdir of the DiT config")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest complete)")
    p.add_argument("--no_ema", action="store_true", help="use the raw parameters instead of the EMA ones")
    p.add_argument("--mode", default="t2v", choices=MODES)
    p.add_argument("--prompt", default=None)
    p.add_argument("--image", default=None, help="i2v / loop: the image to animate")
    p.add_argument("--video", default=None, help="extend / edit / connect (video A)")
    p.add_argument("--video_b", default=None, help="connect: video B")
    p.add_argument("--strength", type=float, default=0.6, help="edit: SDEdit strength in [0, 1]")
    p.add_argument("--frames", type=int, default=None,
                   help="t2v/i2v/loop: total frames (1 + 4k); extend/connect: new frames (4k)")
    p.add_argument("--size", default=None, help="HxW in pixels, rounded to the model's multiple")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--sampler", default=None, choices=("euler", "heun"))
    p.add_argument("--shift", default=None, help="auto (the resolution rule) | none | a number")
    p.add_argument("--direction", default="forward", choices=("forward", "backward"))
    p.add_argument("--context", type=int, default=1, help="connect: latent frames given from each video")
    p.add_argument("--expand", default="none", choices=("none", "toy", "openai"))
    p.add_argument("--openai_key_env", default="OPENAI_API_KEY", help="name of the env variable holding the key")
    p.add_argument("--prompts", default=None, help="a .jsonl file of jobs (keys: flag names)")
    p.add_argument("--out", default="samples_out")
    p.add_argument("--mesh", default="", help="mesh axes for sharded generation, e.g. 'data=1,tensor=-1'")
    p.add_argument("--name", default=None, help="output base name (default: MODE_SEED or NNN_MODE in a batch)")
    return p


def parse_size(text):
    if text is None or isinstance(text, (list, tuple)):
        return text
    from sora_jax.generate import GenerationError

    parts = str(text).lower().replace("*", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise GenerationError(f"--size must be HxW in pixels (e.g. 64x96), got {text!r}") from None
    return (h, w)


def parse_mesh(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = int(value)
    return out


def read_jobs(args) -> list[dict]:
    """The jobs of this invocation: one from the flags, or one per line of --prompts."""
    from sora_jax.generate import GenerationError

    defaults = {k: getattr(args, k) for k in FLAG_KEYS}
    if not args.prompts:
        return [defaults]
    if not os.path.isfile(args.prompts):
        raise GenerationError(f"--prompts file {args.prompts!r} does not exist")
    jobs = []
    with open(args.prompts) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise GenerationError(f"{args.prompts}:{n}: not JSON ({e})") from None
            if isinstance(item, str):
                item = {"prompt": item}
            unknown = set(item) - set(FLAG_KEYS)
            if unknown:
                raise GenerationError(f"{args.prompts}:{n}: unknown keys {sorted(unknown)}; known: {list(FLAG_KEYS)}")
            jobs.append({**defaults, **item, "_line": n})
    if not jobs:
        raise GenerationError(f"--prompts file {args.prompts!r} has no jobs")
    return jobs


def check_job(job: dict, geometry) -> dict:
    """Validates one job and reads its input files (cheap); raises before any model work."""
    from sora_jax import generate as G

    where = f"{job.get('_line') and 'line ' + str(job['_line']) + ': ' or ''}"
    mode = job["mode"]
    if mode not in MODES:
        raise G.GenerationError(f"{where}mode must be one of {MODES}, got {mode!r}")
    if not job.get("prompt") and mode != "edit":
        raise G.GenerationError(f"{where}--prompt is required for mode {mode}")
    needs = {"i2v": ["image"], "extend": ["video"], "edit": ["video"], "connect": ["video", "video_b"]}.get(mode, [])
    for key in needs:
        if not job.get(key):
            raise G.GenerationError(f"{where}mode {mode} needs --{key}")
    job = dict(job, size=parse_size(job.get("size")))
    notes: list = []
    if job["size"] is not None:
        geometry.round_size(job["size"], notes)
    inputs = {}
    for key in ("image", "video", "video_b"):
        if job.get(key) and (key in needs or (key == "image" and mode == "loop")):
            inputs[key] = G.load_frames(job[key], key)  # VideoReadError names the file
    frames = job.get("frames")
    if frames is not None:
        if mode in ("t2v", "i2v", "loop"):
            geometry.round_frames(frames, notes, min_latent={"t2v": 1, "i2v": 2, "loop": 3}[mode])
        elif mode == "extend":
            given = geometry.latent_frames(min(len(inputs["video"]), geometry.pixel_frames(geometry.max_latent_frames - 1)))
            geometry.round_new_frames(frames, notes, given_latent=given)
        elif mode == "connect":
            geometry.round_new_frames(frames, notes, given_latent=2 * int(job.get("context") or 1))
        else:
            raise G.GenerationError(f"{where}--frames does not apply to mode {mode} "
                                    f"({'always 1 frame' if mode == 't2i' else 'the input video sets the length'})")
    if mode == "edit" and not 0.0 <= float(job["strength"]) <= 1.0:
        raise G.GenerationError(f"{where}--strength must be in [0, 1], got {job['strength']}")
    if job.get("sampler") not in (None, "euler", "heun"):
        raise G.GenerationError(f"{where}sampler must be euler or heun, got {job['sampler']!r}")
    return dict(job, _inputs=inputs)


def run_job(gen, job: dict, expander) -> Any:
    common = dict(seed=job.get("seed"), steps=job.get("steps"), guidance=job.get("guidance"),
                  sampler=job.get("sampler"), shift=job.get("shift"), expand_with=expander)
    mode, prompt, inputs, size = job["mode"], job.get("prompt") or "", job["_inputs"], job.get("size")
    if mode == "t2v":
        return gen.text_to_video(prompt, size=size, frames=job.get("frames"), **common)
    if mode == "t2i":
        return gen.text_to_image(prompt, size=size, **common)
    if mode == "i2v":
        return gen.image_to_video(inputs["image"], prompt, size=size, frames=job.get("frames"), **common)
    if mode == "extend":
        return gen.extend(inputs["video"], prompt, frames=job.get("frames"), direction=job.get("direction") or "forward",
                          size=size, **common)
    if mode == "loop":
        return gen.loop(prompt, image=inputs.get("image"), size=size, frames=job.get("frames"), **common)
    if mode == "edit":
        return gen.edit(inputs["video"], prompt, strength=float(job["strength"]), size=size, **common)
    return gen.connect(inputs["video"], inputs["video_b"], prompt, frames=job.get("frames"),
                       context=int(job.get("context") or 1), size=size, **common)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from sora_jax import generate as G
    from sora_jax.data.video_io import VideoReadError

    try:
        # --- every check that needs no model -------------------------------------------------
        config, step = G.check_checkpoint(args.workdir, args.step, "DiT")
        vae_dir = args.vae_workdir or config.get("vae_workdir", "")
        if not vae_dir:
            raise G.CheckpointError(f"DiT workdir {os.path.abspath(args.workdir)}: its config has no vae_workdir "
                                    "(pass --vae_workdir)")
        G.check_checkpoint(vae_dir, None, "VAE")
        geometry = G.Geometry.from_config(config)
        jobs = [check_job(job, geometry) for job in read_jobs(args)]
        expander = None
        if args.expand == "openai" or any(j.get("expand") == "openai" for j in jobs):
            from sora_jax.data import prompt_expansion

            expander = prompt_expansion.get_expander(
                "openai", base_url=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
                model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"), api_key_env=args.openai_key_env)
    except (G.GenerationError, G.CheckpointError, VideoReadError) as e:
        print(f"sora_jax.sample: error: {e}", file=sys.stderr)
        return 2

    # --- the expensive part -------------------------------------------------------------------
    import tqdm

    from sora_jax import sharding

    mesh = sharding.make_mesh(parse_mesh(args.mesh)) if args.mesh else None
    gen = G.Generator.from_workdir(args.workdir, step, use_ema=not args.no_ema, mesh=mesh, vae_workdir=vae_dir)
    print(f"[sample] DiT {os.path.abspath(args.workdir)} step {step}, VAE {os.path.abspath(vae_dir)}, "
          f"{len(jobs)} job(s) -> {os.path.abspath(args.out)}", flush=True)
    bar = tqdm.tqdm(jobs, desc="generating", disable=len(jobs) == 1)
    written = []
    for i, job in enumerate(bar):
        backend = job.get("expand") or "none"
        result = run_job(gen, job, expander if backend == "openai" else (None if backend == "none" else backend))
        md = result.metadata
        name = job.get("name") or (f"{i:03d}_{md['mode']}" if len(jobs) > 1 else f"{md['mode']}_seed{md['seed']}")
        paths = G.save(result, args.out, name)
        written.append(paths)
        lines = [f"[sample] {name}: {md['mode']}, {md['frames']} frames at {md['size'][0]}x{md['size'][1]}, "
                 f"seed {md['seed']}, {md['steps']} {md['sampler']} steps, guidance {md['guidance']}, "
                 f"{md['timings']['total_s']:.2f} s"]
        if md["expanded_prompt"] != md["prompt"]:
            lines.append(f"[sample]   prompt:   {md['prompt']}\n[sample]   expanded: {md['expanded_prompt']}")
        lines += [f"[sample]   note: {note}" for note in md["adjustments"]]
        lines.append(f"[sample]   wrote {', '.join(sorted(os.path.basename(p) for p in paths.values()))}")
        bar.write("\n".join(lines))
    return 0


if __name__ == "__main__":
    from sora_jax import hugepages

    hugepages.reexec_with_hugepages()  # before JAX starts: see sora_jax/hugepages.py
    sys.exit(main())
