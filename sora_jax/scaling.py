"""Compute-scaling study: the multiple-to-size rule, compute accounting, result collection.

A sweep point is a compute multiple m of a base run ("base" = 1x, "4x", "16x", ...).
Compute C is counted as training FLOPs, C ~ N * D (parameters x tokens); the
split between the two is the knob `data_frac` f:

  parameter factor  p = m^(1 - f) * size_step^size_shift
  token factor          m^f       / size_step^size_shift      (so p x tokens = m)

`size_shift` (an integer) moves a point along its isoFLOP line: several sizes at
one budget, declared as "16x,size_shift=-1|0|1".

Parameters grow by scaling width and depth together, the continuous form of
MaxText's global_parameter_scale (which cycles log2(scale) through heads/MLP,
embedding width and layers): a transformer has N ~ width^2 * depth, so

  depth  = max(1, round(depth0 * p^(1/3)))                      (1/3 of log2 p)
  heads  = the integer h >= 1 whose exact parameter count with that depth is
           closest to p * N0 in log space                       (2/3 of log2 p)
  width  = heads * head_dim (head_dim fixed), MLP = mlp_ratio * width

so the width absorbs the rounding of the depth. Training steps then make the
*compute* exact: steps = round(m * F0 * steps0 / F), with F the analytic training
FLOPs of one step (sora_jax.flops), so every point's cumulative FLOPs are m times
the base run's up to one step, and its tokens grow by about m^f (exactly m^f
when FLOPs are proportional to N; attention adds a width-only term). The batch
(and so the data seen per step), the data and the eval are the same for every
point; the cosine schedule spans each run's own steps.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

# --- sweep specs ------------------------------------------------------------------


def parse_multiple(name: str) -> float:
    """"base" -> 1, "4x" -> 4, "0.5x" -> 0.5."""
    text = str(name).strip().lower()
    if text == "base":
        return 1.0
    match = re.fullmatch(r"(\d+(?:\.\d+)?)x", text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"compute multiple must be 'base' or '<k>x' with k > 0 (e.g. '4x', '16x'), got {name!r}")
    return float(match.group(1))


def expand_sweep(spec: str) -> list[str]:
    """Expands "a|b,key=1|2" into the point args "a,key=1", "a,key=2", "b,key=1", "b,key=2".

    Every comma-separated item may list alternatives with "|"; the first item is
    the compute multiple. Order: multiples outermost, then the options in order.
    """
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise ValueError("empty sweep spec; expected e.g. 'base|4x|16x,preset=cpu'")
    choices = []
    for item in items:
        key, eq, values = item.partition("=")
        if not eq:
            choices.append([v.strip() for v in item.split("|") if v.strip()])
        else:
            choices.append([f"{key.strip()}={v.strip()}" for v in values.split("|") if v.strip()])
    for option in choices[0]:
        parse_multiple(option)
    return [",".join(combo) for combo in itertools.product(*choices)]


# Options that say where the inputs are, not what the point is: left out of point names.
LOCATION_OPTIONS = ("latents", "vae")


def point_name(arg: str) -> str:
    """A file-system-safe, unique name for a point: "16x,size_shift=-1" -> "16x_size_shift-1"."""
    items = [i for i in arg.split(",") if i.partition("=")[0].strip() not in LOCATION_OPTIONS]
    name = ",".join(items).replace(",", "_").replace("=", "").replace("+", "p")
    name = re.sub(r"[^A-Za-z0-9._-]", "-", name)
    return name


# --- the multiple-to-size rule -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    """The size of a DiT: width = heads * head_dim, MLP = mlp_ratio * width."""

    depth: int
    heads: int
    head_dim: int
    mlp_ratio: float

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the rule decides for one point; every field is recorded with the results."""

    multiple: float
    data_frac: float
    size_shift: int
    shape: Shape
    steps: int
    param_factor_target: float
    param_factor: float  # realised: params / base params
    flops_factor: float  # realised: total train FLOPs / base total train FLOPs
    token_factor: float  # realised: steps / base steps (the batch is fixed)
    params: int
    train_flops_per_step: float
    train_flops: float


def target_factors(multiple: float, data_frac: float, size_shift: int = 0, size_step: float = 4.0):
    """(parameter factor, token factor) for a compute multiple; their product is the multiple."""
    if not 0.0 <= data_frac <= 1.0:
        raise ValueError(f"data_frac must be in [0, 1], got {data_frac}")
    if size_step <= 1.0:
        raise ValueError(f"size_step must be > 1, got {size_step}")
    shift = size_step ** int(size_shift)
    return multiple ** (1.0 - data_frac) * shift, multiple**data_frac / shift


def scale_shape(base: Shape, param_factor: float, param_count: Callable[[Shape], int]) -> Shape:
    """Width and depth together: depth takes 1/3 of log2(p), heads fit the exact count."""
    target = param_factor * param_count(base)
    depth = max(1, round(base.depth * param_factor ** (1.0 / 3.0)))
    ideal_heads = base.heads * math.sqrt(param_factor * base.depth / depth)
    candidates = {max(1, math.floor(ideal_heads) + k) for k in (-1, 0, 1, 2)}
    best = min(
        candidates,
        key=lambda h: abs(math.log(param_count(dataclasses.replace(base, depth=depth, heads=h)) / target)),
    )
    return dataclasses.replace(base, depth=depth, heads=best)


def plan_point(
    base: Shape,
    base_steps: int,
    multiple: float,
    data_frac: float,
    param_count: Callable[[Shape], int],
    flops_per_step: Callable[[Shape], float],
    size_shift: int = 0,
    size_step: float = 4.0,
) -> Plan:
    """Applies the rule: the point's shape and its step count for exactly m x base compute."""
    p_target, _ = target_factors(multiple, data_frac, size_shift, size_step)
    shape = scale_shape(base, p_target, param_count)
    base_flops, flops = float(flops_per_step(base)), float(flops_per_step(shape))
    steps = max(1, round(multiple * base_flops * base_steps / flops))
    base_params, params = param_count(base), param_count(shape)
    return Plan(
        multiple=multiple, data_frac=data_frac, size_shift=int(size_shift), shape=shape, steps=int(steps),
        param_factor_target=p_target, param_factor=params / base_params,
        flops_factor=steps * flops / (base_steps * base_flops), token_factor=steps / base_steps,
        params=int(params), train_flops_per_step=flops, train_flops=steps * flops,
    )


# --- results -------------------------------------------------------------------------

DONE_MARKER = "scaling_done.json"

# Columns of results.csv (results.json has these plus the eval history of each point).
CSV_COLUMNS = (
    "point", "arg", "multiple", "size_shift", "data_frac", "depth", "width", "heads", "params", "dit_params",
    "steps", "tokens", "flops", "flops_xla", "device_seconds", "wall_seconds", "num_devices",
    "final_eval_loss", "eval_ema_loss", "xla_over_analytic",
)


def read_jsonl(path: str) -> list[dict]:
    """Reads a JSON-lines file; a truncated last line (a run killed mid-write) is skipped."""
    rows = []
    with open(path) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({err})") from err
    return rows


def latest_checkpoint_step(workdir: str) -> int | None:
    """Highest finished orbax step directory in workdir/checkpoints (None if there is none)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
    return max(steps) if steps else None


def is_done(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, DONE_MARKER))


def mark_done(workdir: str, summary: Mapping[str, Any]) -> None:
    tmp = os.path.join(workdir, DONE_MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(dict(summary), f, indent=1, sort_keys=True, default=_jsonable)
    os.replace(tmp, os.path.join(workdir, DONE_MARKER))


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_results(rows: Sequence[Mapping[str, Any]], out_dir: str, sweep: str = "") -> tuple[str, str]:
    """Writes results.json (everything) and results.csv (one row per point, per-t columns too)."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    with open(json_path, "w") as f:
        json.dump(dict(sweep=sweep, points=list(rows)), f, indent=1, default=_jsonable)
    t_columns = sorted({k for row in rows for k in row if k.startswith("eval_loss_t")})
    csv_path = os.path.join(out_dir, "results.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS) + t_columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in writer.fieldnames})
    return json_path, csv_path


def read_results(path: str) -> list[dict]:
    """Points of a results.json (or of a directory holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise ValueError(f"{path}: expected a JSON object with a 'points' list (written by scaling.write_results)")
    for i, row in enumerate(data["points"]):
        for key in ("point", "flops", "final_eval_loss"):
            if key not in row:
                raise ValueError(f"{path}: point {i} has no {key!r}")
    return data["points"]


# --- compute accounting ----------------------------------------------------------------
#
# The loop (sora_jax/train/loop.py) writes workdir/metrics.jsonl, one JSON object per
# event: train lines carry train/* and perf/steps_per_s, perf/tokens_per_s,
# perf/tflops_per_device; eval lines carry eval/<metric> (and eval_ema/<metric>).
# It does not write cumulative totals, so they are derived here after the run:
#   flops_per_step  the loop's own analytic count (Stage.train_flops_per_batch, from
#                   sora_jax.flops), recovered as tflops_per_device x devices / steps_per_s;
#                   the plan's (config) count when no train line was logged
#   flops           steps x flops_per_step: the compute in the final model. Steps redone
#                   after a resume are not counted here (device_seconds counts them)
#   tokens          real (non-padding) latent tokens seen: sum over log windows of
#                   window steps x tokens_per_s / steps_per_s
#   device_seconds  sum over log windows of window steps / steps_per_s x devices: time in
#                   train steps; wall_seconds (the runner's clock around each launch)
#                   adds start-up, compile, eval and checkpoint time
#   flops_xla       steps x XLA cost_analysis FLOPs of the compiled step (per device, as
#                   printed by the loop's preflight) x devices: the cross-check. XLA counts
#                   the body of a lax.scan once, not once per layer, so with
#                   model.scan_layers=True (the default) that number is left out
#                   (flops_xla_scanned keeps it) and the independent check below is used
#   xla_over_analytic  XLA cost_analysis of one example's forward with the layers
#                   unrolled, over the analytic forward FLOPs (xla_check, written by
#                   the runner's --xla_check into scaling_xla_check.json)

WALL_FILE = "scaling_wall.json"
XLA_CHECK_FILE = "scaling_xla_check.json"
TRAIN_LOG = "scaling_train.log"  # the runner's capture of the loop's stdout/stderr
_PER_T = re.compile(r"^(?:loss[/_@]?)?t=?([0-9]*\.?[0-9]+)$")
_PREFLIGHT_DEVICES = re.compile(r"\[preflight\] stage=\S+ devices=(\d+)")
_PREFLIGHT_XLA = re.compile(r"FLOPs/step: \S+ analytic, ([0-9.eE+-]+) from XLA cost analysis \(per device\)")


def metrics_lines(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    return read_jsonl(path) if os.path.exists(path) else []


def last_logged_step(workdir: str) -> int | None:
    steps = [int(line["step"]) for line in metrics_lines(workdir) if "step" in line]
    return max(steps) if steps else None


def add_wall_seconds(workdir: str, seconds: float) -> None:
    path = os.path.join(workdir, WALL_FILE)
    total = 0.0
    if os.path.exists(path):
        with open(path) as f:
            total = float(json.load(f)["wall_seconds"])
    with open(path, "w") as f:
        json.dump({"wall_seconds": total + float(seconds)}, f)


def _eval_values(line: Mapping[str, Any], prefix: str = "eval") -> dict[str, float]:
    """eval/loss -> eval_loss; eval/loss_t0.25 (or eval/t0.25) -> eval_loss_t0.25; others kept by name."""
    out = {}
    for key, value in line.items():
        if not key.startswith(prefix + "/"):
            continue
        name = key[len(prefix) + 1:]
        match = _PER_T.match(name)
        if name == "loss":
            out["eval_loss"] = float(value)
        elif match:
            out[f"eval_loss_t{float(match.group(1)):g}"] = float(value)
        else:
            out[f"eval_{name}"] = float(value)
    return out


def _is_train(line: Mapping[str, Any]) -> bool:
    return bool(line.get("perf/steps_per_s"))


def _segments(lines: Sequence[dict]) -> list[list[dict]]:
    """Splits the appended metrics of several launches: a launch starts where a line's step
    does not increase over the previous line of the same kind (train or eval)."""
    segments: list[list[dict]] = []
    last: dict[bool, int] = {}
    for line in lines:
        kind, step = _is_train(line), int(line.get("step", -1))
        if not segments or (kind in last and step <= last[kind]):
            segments.append([])
            last = {}
        segments[-1].append(line)
        last[kind] = step
    return segments


def _latest_run_lines(lines: Sequence[dict]) -> list[dict]:
    """The lines that describe the final model: a launch that resumed and first logged step f
    supersedes every earlier line at step >= f (redone after the crash)."""
    kept: list[dict] = []
    for segment in _segments(lines):
        first = int(segment[0].get("step", -1))
        kept = [line for line in kept if int(line.get("step", -1)) < first] + segment
    return kept


def _windows(lines: Sequence[dict]) -> list[tuple[int, dict]]:
    """(steps in the log window, train line) for every train line of every launch.

    A window runs from the previous train line of the lines still valid at that point;
    a resumed launch's first window thus starts at the last kept log step (its checkpoint
    when checkpoints fall on log steps, as the presets arrange)."""
    out: list[tuple[int, dict]] = []
    kept: list[dict] = []
    for segment in _segments(lines):
        first = int(segment[0].get("step", -1))
        kept = [line for line in kept if int(line.get("step", -1)) < first]
        previous = max((int(line["step"]) for line in kept if _is_train(line)), default=0)
        for line in segment:
            if _is_train(line):
                out.append((int(line["step"]) - previous, line))
                previous = int(line["step"])
        kept += segment
    return out


def log_facts(workdir: str) -> dict:
    """Devices and the XLA cost-analysis FLOPs/step from the loop's preflight lines (last launch)."""
    facts: dict = {}
    path = os.path.join(workdir, TRAIN_LOG)
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            text = f.read()
        devices = _PREFLIGHT_DEVICES.findall(text)
        xla = _PREFLIGHT_XLA.findall(text)
        if devices:
            facts["num_devices"] = int(devices[-1])
        if xla:
            facts["xla_flops_per_step_per_device"] = float(xla[-1])
    return facts


def summarize_point(arg: str, workdir: str, plan: Mapping[str, Any]) -> dict:
    """One results row: the plan's sizes + compute accounting + held-out losses (see above)."""
    all_lines = metrics_lines(workdir)
    if not all_lines:
        raise ValueError(f"{workdir}/metrics.jsonl is missing or empty: point {arg!r} has no results")
    lines = _latest_run_lines(all_lines)
    facts = log_facts(workdir)
    num_devices = int(facts.get("num_devices", plan.get("num_devices", 1)))
    steps = max(int(line["step"]) for line in lines)

    windows = _windows(all_lines)  # every launch: device time includes redone steps
    logged = [line for _, line in windows if line.get("perf/tflops_per_device")]
    if logged:
        last = logged[-1]
        flops_per_step = last["perf/tflops_per_device"] * 1e12 * num_devices / last["perf/steps_per_s"]
    else:
        flops_per_step = float(plan["train_flops_per_step"])
    kept_windows = _windows(lines)
    tokens = sum(n * line.get("perf/tokens_per_s", 0.0) / line["perf/steps_per_s"] for n, line in kept_windows)
    seconds = sum(n / line["perf/steps_per_s"] for n, line in windows)

    history = []
    for line in lines:
        values = _eval_values(line)
        if "eval_loss" in values:
            step = int(line["step"])
            ema = _eval_values(line, "eval_ema").get("eval_loss")
            history.append(dict(step=step, flops=step * flops_per_step, **values,
                                **({"eval_ema_loss": ema} if ema is not None else {})))
    if not history:
        raise ValueError(f"{workdir}/metrics.jsonl has no eval/loss line; point {arg!r} has no held-out loss")
    final = history[-1]
    wall = None
    if os.path.exists(os.path.join(workdir, WALL_FILE)):
        with open(os.path.join(workdir, WALL_FILE)) as f:
            wall = float(json.load(f)["wall_seconds"])
    xla = facts.get("xla_flops_per_step_per_device")
    xla_total = steps * xla * num_devices if xla else None
    scanned = bool(plan.get("scan_layers", True))
    check = None
    if os.path.exists(os.path.join(workdir, XLA_CHECK_FILE)):
        with open(os.path.join(workdir, XLA_CHECK_FILE)) as f:
            check = json.load(f)["xla_over_analytic"]
    plan_keys = ("multiple", "size_shift", "data_frac", "depth", "width", "heads", "mlp_dim", "params", "dit_params")
    return dict(
        point=point_name(arg), arg=arg, **{k: plan[k] for k in plan_keys if k in plan},
        steps=steps, planned_steps=int(plan["steps"]), tokens=tokens if tokens else None,
        flops=steps * flops_per_step, flops_per_step=flops_per_step,
        flops_per_step_plan=float(plan["train_flops_per_step"]),
        flops_xla=None if scanned else xla_total, flops_xla_scanned=xla_total if scanned else None,
        xla_over_analytic=check,
        device_seconds=seconds * num_devices if windows else None, num_devices=num_devices,
        wall_seconds=wall, final_eval_step=final["step"], final_eval_loss=final["eval_loss"],
        **{k: v for k, v in final.items() if k.startswith("eval_") and k != "eval_loss"},
        eval_history=history,
    )


def xla_check(workdir: str, model_cfg, latent_thw) -> float:
    """XLA's FLOPs of one example's forward, layers unrolled, over the analytic count (cached)."""
    path = os.path.join(workdir, XLA_CHECK_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return float(json.load(f)["xla_over_analytic"])
    from sora_jax import flops

    model_cfg = model_cfg.copy_and_resolve_references()
    model_cfg.scan_layers = False  # XLA's cost analysis counts a scanned body once
    analytic = float(flops.dit_flops(model_cfg, tuple(latent_thw))["forward_flops"])
    xla = flops.xla_dit_forward_flops(model_cfg, tuple(latent_thw))
    with open(path, "w") as f:
        json.dump(dict(latent_thw=list(latent_thw), analytic_forward=analytic, xla_forward=xla,
                       xla_over_analytic=xla / analytic), f, indent=1)
    return xla / analytic


def plan_from_config(arg: str, config_file: str | None = None) -> dict:
    """config.scaling of configs/scaling.py:arg (what the rule planned for this point)."""
    import importlib.util

    path = config_file or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                       "configs", "scaling.py")
    spec = importlib.util.spec_from_file_location("_sora_configs_scaling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.get_config(arg).scaling)
