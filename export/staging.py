"""The last step of every gated export (fp32/fp16 parity, the INT8 gate): publish or reject the staged
bundle. Its own module so that export.bundle and export.int8 both use it without importing each other."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def publish_staged(stage: Path, out: Path, passed: bool, failure: Callable[[Path], Exception]) -> None:
    """The last step of every gated export: a staged bundle whose gate ``passed`` replaces ``out``;
    one that failed moves to ``OUT.rejected`` (replacing an older one) and ``failure(rejected)`` is raised."""
    if not passed:
        rejected = out.with_name(out.name + ".rejected")
        shutil.rmtree(rejected, ignore_errors=True)
        os.replace(stage, rejected)
        raise failure(rejected)
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)
