"""This project's on-disk cache: things derived once from installed packages and kept between runs.

Kept graphs (``graphs``) and torchvision's model catalogue (``catalogue``) live in
``~/.cache/batch-classify/graphs/`` (or under ``$XDG_CACHE_HOME``); ``PIPELINE_GRAPH_CACHE`` moves the
folder, and deleting it rebuilds everything; graphs past ``graphs.MAX_KEPT_BYTES`` go, the least recently
used first. Entries are written atomically and a read-only disk means no cache, never a failure.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

CACHE_ENV = "PIPELINE_GRAPH_CACHE"


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "batch-classify" / "graphs"


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """``write(temporary_path)``, then the file moved into place at once: a concurrent reader never sees
    half a file. A disk that refuses (read-only, full) only means nothing is kept."""
    with contextlib.suppress(OSError, RuntimeError):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=path.suffix)
        os.close(handle)
        try:
            write(temporary)
            os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
            os.replace(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
