"""Which folder is which in ``evaluate PRED_DIR GT_DIR``: a prediction folder holds label maps (and NeuroMap's
reports), never MRI scans. A dataset folder given as the predictions, most often the two arguments swapped, would
otherwise be scored: its segmentations read as predictions, the predictions as ground truth, and sensitivity and
precision silently exchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from neuromap.errors import NeuroMapError
from neuromap.io.case import visible_files
from neuromap.io.lgg_files import SLICE_NAME
from neuromap.io.nifti import is_mri_image

REPORT_SUFFIX = "_report.json"  # what `neuromap segment` writes next to every label output


def check_prediction_folder(pred_root: Path, gt_root: Path) -> None:
    """Refuse a prediction folder that holds MRI scans but no NeuroMap report; say so when the ground-truth
    folder holds the reports (the arguments are swapped). A folder with both (outputs written next to the scans)
    passes."""
    scan = _first(pred_root, _is_scan)
    if scan is None or _first(pred_root, _is_report) is not None:
        return
    report = _first(gt_root, _is_report)
    swapped = (f" and {gt_root} holds NeuroMap outputs ({report.name}): the two folders look swapped. Fix: give "
               "the predictions first, then the ground truth.") if report is not None else (
        ". Fix: give the output folder of `neuromap segment` (or a folder of label maps) as the predictions.")
    raise NeuroMapError(f"{pred_root}: given as the predictions, but it holds MRI scans ({scan.name}), i.e. it is a "
                        f"dataset, not segmentation results{swapped}")


def _is_scan(path: Path) -> bool:
    """An MRI sequence NIfTI in any supported naming, or an LGG slice image (not a mask)."""
    if is_mri_image(path):
        return True
    match = SLICE_NAME.match(path.name)  # predicted masks (<slice>_pred_mask.tif) do not match
    return bool(match) and not match.group("mask")


def _is_report(path: Path) -> bool:
    return path.name.endswith(REPORT_SUFFIX)


def _first(root: Path, test: Callable[[Path], bool]) -> Path | None:
    """The first file passing ``test`` in ``root`` or one folder below it (how deep cases and outputs lie)."""
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))]
    return next((p for folder in folders for p in visible_files(folder) if test(p)), None)
