"""Knowing before running: parameters, FLOPs per step and compiled memory vs device memory.

The train step is lowered and compiled once ahead of time (AOT, as MaxText
does); `compiled.memory_analysis()` gives the per-device bytes of arguments,
outputs and temporaries. If that exceeds the device's memory the run is
refused before step 1, with the knobs that would make it fit.

On CPU the "devices" share host RAM, so the check compares the sum over local
devices with the host's available memory.
"""

from __future__ import annotations

import os
from typing import Any

import jax

HEADROOM = 0.95  # leave room for the runtime, fragmentation and the input pipeline

FIT_HINTS = (
    "  - shard more: raise config.mesh.fsdp (parameters and optimizer state split across devices)\n"
    "  - recompute activations: config.remat_policy='full' (or 'minimal' / 'save_qkv_proj')\n"
    "  - split the batch: raise config.optim.microbatches (gradient accumulation; the global batch stays fixed)\n"
    "  - lower precision: config.precision.compute_dtype='bfloat16'\n"
    "  - a smaller model variant, batch or clip length"
)


class PreflightError(RuntimeError):
    """The run cannot work as configured (does not fit, bad batch split, ...)."""


def _host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def device_memory() -> tuple[int, str, int]:
    """(bytes available to the check, description, how many local devices share it)."""
    device = jax.local_devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory per device", 1
    return _host_available_bytes(), "available host RAM shared by all local CPU devices", jax.local_device_count()


def memory_needed(compiled) -> dict[str, int]:
    """Per-device bytes from the compiled step (donated inputs alias the outputs)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    get = lambda name: int(getattr(analysis, name, 0) or 0)
    args, out, temp = get("argument_size_in_bytes"), get("output_size_in_bytes"), get("temp_size_in_bytes")
    alias, code = get("alias_size_in_bytes"), get("generated_code_size_in_bytes")
    return dict(arguments=args, outputs=out, temporaries=temp, aliased=alias, code=code,
                total=args + out - alias + temp + code)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def check_batch_split(global_batch: int, microbatches: int, batch_shards: int) -> None:
    if global_batch % microbatches:
        raise PreflightError(
            f"global batch {global_batch} is not divisible by config.optim.microbatches={microbatches}"
        )
    if (global_batch // microbatches) % batch_shards:
        raise PreflightError(
            f"each microbatch has {global_batch // microbatches} examples, not divisible by the "
            f"{batch_shards} batch shards (mesh data x fsdp); change the batch size, "
            "config.optim.microbatches or config.mesh"
        )


def report(*, stage_name: str, num_params: int, flops_per_step: float, compiled, compile_seconds: float,
           cost_flops: float | None, enforce: bool = True) -> str:
    """The pre-step-1 summary. Raises PreflightError when the step cannot fit."""
    need = memory_needed(compiled)
    limit, where, sharing = device_memory()
    lines = [
        f"[preflight] stage={stage_name} devices={jax.device_count()} ({jax.devices()[0].device_kind}) "
        f"processes={jax.process_count()}",
        f"[preflight] parameters: {num_params:,} ({num_params / 1e6:.2f} M)",
        f"[preflight] FLOPs/step: {flops_per_step:.3e} analytic"
        + (f", {cost_flops:.3e} from XLA cost analysis (per device)" if cost_flops else ""),
        f"[preflight] compile time: {compile_seconds:.1f} s",
    ]
    if need:
        per_device = need["total"]
        lines.append(
            f"[preflight] memory per device: {fmt_bytes(per_device)} (arguments {fmt_bytes(need['arguments'])}, "
            f"outputs {fmt_bytes(need['outputs'])}, temporaries {fmt_bytes(need['temporaries'])}, "
            f"donated/aliased {fmt_bytes(need['aliased'])})"
        )
        total = per_device * sharing
        lines.append(
            f"[preflight] needs {fmt_bytes(total)}"
            + (f" for {sharing} local devices" if sharing > 1 else "")
            + f" of {fmt_bytes(limit)} ({where}): {100 * total / max(limit, 1):.1f}%"
        )
        if enforce and total > HEADROOM * limit:
            raise PreflightError(
                "\n".join(lines)
                + f"\nThe compiled train step needs {fmt_bytes(total)} but only {fmt_bytes(limit)} is available "
                f"({where}). It will not fit. Options:\n{FIT_HINTS}\n"
                "(set config.train.check_memory=False to try anyway)"
            )
    else:
        lines.append("[preflight] memory: this backend gives no memory analysis")
    return "\n".join(lines)
