"""LGG kaggle_3m slice files: the naming rules, reading slices and binary masks, and writing predicted masks.

Files are read with tifffile, which handles both the uncompressed original download and zlib-compressed copies;
predicted masks are written uncompressed like the original download, so any TIFF reader opens them.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
import tifffile

from neuromap.errors import NeuroMapError
from neuromap.io.atomic import atomic_path
from neuromap.io.case import visible_files

SLICE_NAME = re.compile(r"^(?P<prefix>.+)_(?P<number>\d+)(?P<mask>_mask)?\.tiff?$", re.IGNORECASE)
PRED_SUFFIX = "_pred_mask.tif"
PRED_NAME = re.compile(r"^(?P<prefix>.+)_(?P<number>\d+)_pred_mask\.tiff?$", re.IGNORECASE)
TIF_SUFFIXES = (".tif", ".tiff")


def read_tif(path: Path) -> np.ndarray:
    try:
        return tifffile.imread(path)
    except Exception as exc:  # tifffile raises many types (TiffFileError, ValueError, zlib.error...) on bad files
        raise NeuroMapError(
            f"{path}: cannot be read as TIFF ({type(exc).__name__}: {exc}). Fix: copy the file again."
        ) from None


def mask_to_binary(mask: np.ndarray, path: Path) -> np.ndarray:
    """0/255 (kaggle_3m) or 0/1 masks -> {0, 1}; any other value set means the file is not a binary mask."""
    if mask.dtype.kind not in "biu":
        raise NeuroMapError(f"{path}: mask has dtype {mask.dtype}; expected uint8 0/255. Fix: re-export the mask.")
    values = {int(v) for v in np.unique(mask)}
    if values <= {0, 1}:
        return mask.astype(np.uint8)
    if values <= {0, 255}:
        return (mask > 127).astype(np.uint8)
    raise NeuroMapError(
        f"{path}: mask values {sorted(values)[:8]} are not binary (expected 0/255, or 0/1); it may be a resized "
        "or JPEG-compressed copy. Fix: use the original mask file."
    )


def read_masks(files: dict[int, Path], size: tuple[int, int] | None = None) -> np.ndarray:
    """Stack mask files (slice number -> file, in slice order) into (rows, cols, N) uint8 {0, 1}.

    Every mask must be 2D, binary (0/255 or 0/1) and of ``size`` (default: the first mask's). All problems are
    raised together, naming the files.
    """
    if not files:
        raise NeuroMapError("no mask files to read.")
    problems: list[str] = []
    masks: list[np.ndarray] = []
    for path in files.values():
        try:
            mask = read_tif(path)
            size = size or mask.shape
            if mask.ndim != 2 or mask.shape != size:
                raise NeuroMapError(f"{path}: mask shape {mask.shape}; expected 2D {size} like the images.")
            masks.append(mask_to_binary(mask, path))
        except NeuroMapError as exc:
            problems.append(str(exc))
    if problems:
        raise NeuroMapError("\n".join(problems))
    return np.stack(masks, axis=-1)


def predicted_mask_files(folder: Path) -> dict[int, Path]:
    """Slice number -> ``<slice stem>_pred_mask.tif`` of a prediction folder, in slice order."""
    found: dict[int, list[Path]] = {}
    for path in visible_files(folder):
        match = PRED_NAME.match(path.name)
        if match:
            found.setdefault(int(match["number"]), []).append(path)
    duplicates = [", ".join(p.name for p in paths) for paths in found.values() if len(paths) > 1]
    if duplicates:
        raise NeuroMapError(f"{folder}: several predicted masks for one slice ({'; '.join(duplicates)}). Keep one.")
    return {n: found[n][0] for n in sorted(found)}


def write_masks(labels: np.ndarray, targets: list[Path], out_dir: Path, overwrite: bool,
                stack: contextlib.ExitStack | None) -> list[Path]:
    """Write slice z of ``labels`` (rows, cols, N) to ``targets[z]`` as rows x cols uint8 0/255; non-zero labels
    are abnormality.

    All targets are checked before the first is written. Every file is staged under a temporary name and all
    are renamed together when ``stack`` closes: the caller's stack, so other outputs (report, picture) appear
    with the masks, or else one private to this call. An error before that leaves no mask behind.
    """
    existing = [p.name for p in targets if p.exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise NeuroMapError(
            f"{out_dir}: {len(existing)} mask file(s) already exist ({shown}). "
            "Fix: choose another output folder or pass --overwrite."
        )
    masks = np.where(labels != 0, 255, 0).astype(np.uint8)
    with contextlib.ExitStack() as own:
        staging = stack if stack is not None else own
        for z, target in enumerate(targets):
            tmp = staging.enter_context(atomic_path(target, overwrite))
            tifffile.imwrite(tmp, np.ascontiguousarray(masks[:, :, z]), photometric="minisblack")
    return targets
