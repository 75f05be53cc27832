"""Atomic JSON files: a reader never sees a half-written file after a crash or preemption.

Resume logic reads these files (latent stats, caption vocabularies, latent-cache
metadata), so a torn write must leave the previous version, not garbage.
"""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, obj: Any, indent: int | None = 1) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)
    return path
