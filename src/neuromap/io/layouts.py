"""The layouts the package reads, in the order they are asked, and what is done with all of them at once:
finding the cases below a folder, and finding label files for evaluation."""

from __future__ import annotations

from pathlib import Path

from neuromap.errors import NeuroMapError
from neuromap.io.case import Case, Volume
from neuromap.io.dicom_layout import DicomLayout
from neuromap.io.layout import LabelFile, Layout
from neuromap.io.lgg import LggSliceLayout
from neuromap.io.nifti import NiftiLayout

NIFTI = NiftiLayout()
LGG = LggSliceLayout()
DICOM = DicomLayout()
# Layouts of a folder per case, asked in order for a folder and then for each folder below it. NIfTI first: a
# folder with NIfTI files is a NIfTI case even if a stray .tif lies next to them.
FOLDER_LAYOUTS: tuple[Layout, ...] = (NIFTI, LGG)
# Layouts that read a whole tree (a DICOM export), asked only when the folder layouts found nothing.
TREE_LAYOUTS: tuple[Layout, ...] = (DICOM,)
LAYOUTS: tuple[Layout, ...] = (*FOLDER_LAYOUTS, *TREE_LAYOUTS)


def _claimed(folder: Path) -> Layout | None:
    return next((layout for layout in FOLDER_LAYOUTS if layout.claims(folder)), None)


def discover_cases(root: str | Path) -> list[Case]:
    """Find all cases under ``root``: a case folder itself, a dataset (MSD task), or a folder of those."""
    root = Path(root)
    if not root.exists():
        raise NeuroMapError(f"{root}: no such file or folder.")
    if root.is_file():
        raise NeuroMapError(
            f"{root}: is a file; give the case folder, or files with an explicit mapping (--map t1ce=FILE ...)."
        )
    layout = _claimed(root)
    if layout is not None:
        return layout.discover(root)
    cases: list[Case] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        layout = _claimed(sub)
        if layout is not None:
            cases.extend(layout.discover(sub))
    if not cases:
        tree = next((layout for layout in TREE_LAYOUTS if layout.claims(root)), None)
        if tree is not None:
            return tree.discover(root)
        raise NeuroMapError(
            f"{root}: no cases found (no NIfTI files, MSD dataset.json or LGG .tif slices here or one level "
            "below, no DICOM files). Fix: point to a case folder, a folder of case folders or a DICOM study."
        )
    return cases


def load_case(case: Case, modalities: list[str] | None = None, with_seg: bool | None = None) -> Volume:
    """Validate and load ``case`` through its layout (see `Layout.load`)."""
    return case.layout.load(case, modalities, with_seg=with_seg)


def validate_case(case: Case, modalities: list[str] | None = None) -> list[str]:
    """Raise NeuroMapError listing every problem with ``case``; when it is usable, return the warnings a
    segmentation of it would report (see `Layout.check`)."""
    return case.layout.check(case, modalities)


def label_files(root: Path, predicted: bool) -> list[LabelFile]:
    """Every layout's label files in ``root`` (see `Layout.label_files`)."""
    return [item for layout in LAYOUTS for item in layout.label_files(root, predicted)]
