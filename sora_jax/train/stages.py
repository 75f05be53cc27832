"""Stage registry: config.stage -> Stage subclass, imported lazily.

`config.stage = "vae"` imports `sora_jax.stages.vae` only when asked for and
returns the Stage subclass defined there whose `name` is "vae" (or, failing a
name match, its only Stage subclass). A dotted form "package.module:ClassName"
names any Stage class, which is how tests and out-of-tree stages plug in.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from sora_jax.train.stage import Stage


def available_stages() -> list[str]:
    """Names of the modules in sora_jax/stages (without importing them)."""
    try:
        package = importlib.import_module("sora_jax.stages")
    except ModuleNotFoundError:
        return []
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def get_stage_class(name: str) -> type[Stage]:
    if not name:
        raise ValueError(f"config.stage is empty; set it to one of {available_stages()} or 'module:Class'")
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name, None)
        if not (inspect.isclass(cls) and issubclass(cls, Stage)):
            raise ValueError(f"config.stage {name!r}: {class_name} in {module_name} is not a Stage subclass")
        return cls
    try:
        module = importlib.import_module(f"sora_jax.stages.{name}")
    except ModuleNotFoundError as err:
        if err.name not in (f"sora_jax.stages.{name}", "sora_jax.stages"):
            raise  # the stage exists but one of its own imports failed: show that error
        raise ValueError(f"unknown config.stage {name!r}; available: {available_stages()}") from None
    candidates = [
        obj for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, Stage) and obj is not Stage and obj.__module__ == module.__name__
        and not inspect.isabstract(obj)
    ]
    named = [c for c in candidates if c.name == name]
    if len(named) == 1:
        return named[0]
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(
        f"sora_jax.stages.{name} defines {len(candidates)} concrete Stage classes "
        f"({[c.__name__ for c in candidates]}); give exactly one of them name = {name!r}"
    )
