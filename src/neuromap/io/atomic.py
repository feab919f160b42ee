"""Atomic output: write next to the target under a temporary name, fsync, then rename.

A crash or error mid-write therefore never leaves a partial file under the final name, and inputs are never
touched because targets that resolve to an input are refused by the callers.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from neuromap.errors import NeuroMapError


@contextlib.contextmanager
def atomic_path(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path with the target's suffixes; on success it is renamed onto ``target``."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise NeuroMapError(f"{target}: already exists. Fix: choose another output folder or pass --overwrite.")
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".part{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results get the user's normal file mode
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_bytes_atomic(target: str | Path, data: bytes, overwrite: bool = False) -> Path:
    with atomic_path(target, overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(target)
