"""Watching a run: JSON lines, TensorBoard, a progress bar, throughput and MFU.

Only process 0 writes; on other processes the writer is silent. Throughput is
reported per device so runs on different pods compare directly:

  tokens/s          Stage.tokens_in_batch summed over the global batch, per second
  TFLOP/s/device    Stage.train_flops_per_batch * steps/s / devices
  MFU               TFLOP/s/device over the accelerator's dense bf16 peak (table
                    below); on CPU over a measured fp32 matmul peak per device
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

# Dense bf16 peak FLOP/s per device (chip for TPU, GPU for NVIDIA), from vendor specs.
# Keys are matched as substrings of jax.Device.device_kind (lower-cased), first match wins.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),  # v5p reports "TPU v5"
    ("tpu v4", 275e12),
    ("h200", 989e12),  # SXM, dense
    ("h100", 989e12),  # SXM, dense (PCIe: 756e12)
    ("a100", 312e12),
)

_cpu_peak_cache: dict[str, float] = {}


def weighted_eval_mean(batch_metrics: list[Mapping[str, Any]]) -> dict[str, float]:
    """The held-out metrics over all eval batches: each batch's means weighted by its "count".

    A finite eval pass ends with a partial batch (the quickstart DiT's 64 held-out clips pack
    into 61 + 3), so an unweighted mean of batch means would give those 3 clips half the
    eval loss. The result's "count" is the total: how many examples (or tokens) were scored.
    A batch without "count" weighs 1 (Stage.eval_metrics).
    """
    if not batch_metrics:
        return {}
    sums: dict[str, float] = {}
    total = 0.0
    for metrics in batch_metrics:
        weight = float(metrics.get("count", 1.0))
        total += weight
        for k, v in metrics.items():
            if k != "count":
                sums[k] = sums.get(k, 0.0) + weight * float(v)
    if total <= 0:
        raise ValueError("the eval batches hold no real examples (every batch's count is 0)")
    return {**{k: v / total for k, v in sums.items()}, "count": total}


def measured_cpu_peak(size: int = 512, repeats: int = 5) -> float:
    """FLOP/s of an fp32 matmul on the first local device, divided among the local devices.

    Fake CPU devices share the same cores, so each one gets a share of the host peak.
    """
    if "cpu" not in _cpu_peak_cache:
        device = jax.local_devices()[0]
        a = jax.device_put(np.ones((size, size), np.float32), device)
        matmul = jax.jit(lambda x: x @ x)
        matmul(a).block_until_ready()
        start = time.perf_counter()
        for _ in range(repeats):
            out = matmul(a)
        out.block_until_ready()
        seconds = (time.perf_counter() - start) / repeats
        _cpu_peak_cache["cpu"] = 2 * size**3 / seconds / jax.local_device_count()
    return _cpu_peak_cache["cpu"]


def peak_flops_per_device(device: jax.Device | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for a device."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    for key, peak in PEAK_FLOPS:
        if key in kind:
            return peak, f"{device.device_kind} bf16 spec"
    if device.platform == "cpu":
        return measured_cpu_peak(), "measured fp32 matmul per CPU device"
    return 0.0, f"unknown device kind {device.device_kind!r} (no MFU)"


def throughput(steps: int, seconds: float, tokens_per_step: float, flops_per_step: float, num_devices: int,
               peak: float) -> dict[str, float]:
    steps_per_s = steps / max(seconds, 1e-9)
    tflops = flops_per_step * steps_per_s / num_devices / 1e12
    out = {
        "perf/steps_per_s": steps_per_s,
        "perf/tokens_per_s": tokens_per_step * steps_per_s,
        "perf/tflops_per_device": tflops,
    }
    if peak > 0 and flops_per_step > 0:
        out["perf/mfu"] = tflops * 1e12 / peak
    return out


class MetricsWriter:
    """JSON lines at workdir/metrics.jsonl plus TensorBoard events in workdir/tb (process 0 only)."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, progress: bool = True):
        self.active = jax.process_index() == 0
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # tensorboardX is a dependency, but the loop must not die for a log
            self.tb = None
        if progress:
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal (log files get the printed lines instead).
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            smoothing=0.1, mininterval=1.0, disable=None)
            if self.bar.disable:
                self.bar = None

    @property
    def has_progress_bar(self) -> bool:
        return self.bar is not None

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self.jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in clean.items():
                self.tb.add_scalar(key, value, step)

    def progress(self, step: int, loss: float | None = None, steps_per_s: float | None = None) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        post = {}
        if loss is not None:
            post["loss"] = f"{loss:.4g}"
        if steps_per_s:
            post["steps/s"] = f"{steps_per_s:.3g}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def log(self, message: str) -> None:
        """A line for the human, above the progress bar."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def add_video(self, tag: str, video: np.ndarray, step: int, fps: int = 8) -> None:
        """video: (N, T, H, W, C) uint8 or float in [0, 1].

        TensorBoard videos need moviepy (not a dependency); without it each video
        is shown as an image strip of its frames, one row per video.
        """
        if self.tb is None:
            return
        v = np.asarray(video)
        if v.dtype != np.uint8:
            v = (np.clip(v, 0, 1) * 255).astype(np.uint8)
        if v.shape[-1] == 1:
            v = np.repeat(v, 3, axis=-1)
        if importlib.util.find_spec("moviepy") is not None:
            self.tb.add_video(tag, np.transpose(v, (0, 1, 4, 2, 3)), step, fps=fps)
        else:
            n, t, h, w, c = v.shape
            strip = v.transpose(0, 2, 1, 3, 4).reshape(n * h, t * w, c)  # rows: videos, columns: frames
            self.tb.add_image(tag, strip, step, dataformats="HWC")

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()
