"""Can the results be written? Asked before any work, so a wrong ``-o`` costs seconds, not a finished inference
or training run that then dies with a traceback.

The answer comes from trying: a probe file is created and removed in the output folder, or, when the folder does
not exist yet, in its nearest existing parent (where it would be created). Permission bits alone would not do:
root ignores them, and read-only file systems or full quotas do not show in them. Nothing is created that
outlives the check, so a refused run leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from neuromap.errors import NeuroMapError


def check_writable_folder(folder: str | Path, what: str) -> None:
    """Raise a NeuroMapError when ``folder`` (for ``what``, e.g. "segmentation outputs") is, or lies under, a file,
    or cannot be written into or created."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            raise NeuroMapError(f"{folder}: the {what} cannot be written there: {existing} is a broken link. "
                                "Fix: remove it or choose another output folder.")
        existing = existing.parent
    where = "it is" if existing == folder else f"it lies under {existing}, which is"
    if not existing.is_dir():
        raise NeuroMapError(f"{folder}: the {what} cannot be written there: {where} a file, not a folder. "
                            "Fix: choose another output folder.")
    try:
        handle, probe = tempfile.mkstemp(prefix=".neuromap-write-test-", dir=existing)
    except OSError as exc:
        action = "writing into it" if existing == folder else f"creating it inside {existing}"
        raise NeuroMapError(f"{folder}: the {what} cannot be written ({action} failed: {exc.strerror}). "
                            "Fix: choose a folder you can write to.") from None
    os.close(handle)
    os.unlink(probe)
