"""The layouts the package reads, in the order they are asked, and what is done with all of them at once:
finding the cases below a folder, and finding label files for evaluation."""

from __future__ import annotations

from pathlib import Path

from neuromap.errors import NeuroMapError
from neuromap.io.case import Case, Volume
from neuromap.io.layout import LabelFile, Layout
from neuromap.io.lgg import LggSliceLayout
from neuromap.io.nifti import NiftiLayout

NIFTI = NiftiLayout()
LGG = LggSliceLayout()
# NIfTI first: a folder with NIfTI files is a NIfTI case even if a stray .tif lies next to them.
LAYOUTS: tuple[Layout, ...] = (NIFTI, LGG)


def _claimed(folder: Path) -> Layout | None:
    return next((layout for layout in LAYOUTS if layout.claims(folder)), None)


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
        raise NeuroMapError(
            f"{root}: no cases found (no NIfTI files, MSD dataset.json or LGG .tif slices here or one level "
            "below). Fix: point to a case folder or a folder of case folders."
        )
    return cases


def load_case(
    case: Case, modalities: list[str] | None = None, with_seg: bool | None = None, check_only: bool = False
) -> Volume | None:
    """Validate and load ``case`` through its layout (see `Layout.load`)."""
    return case.layout.load(case, modalities, with_seg=with_seg, check_only=check_only)


def validate_case(case: Case, modalities: list[str] | None = None) -> None:
    """Raise NeuroMapError listing every problem with ``case``; return None when it is usable."""
    case.layout.load(case, modalities, check_only=True)


def label_files(root: Path, predicted: bool) -> list[LabelFile]:
    """Every layout's label files in ``root`` (see `Layout.label_files`)."""
    return [item for layout in LAYOUTS for item in layout.label_files(root, predicted)]
