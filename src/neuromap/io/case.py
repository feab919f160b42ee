"""What io hands to the rest of the package: a `Case` (one patient's files, nothing read yet) and a `Volume` (a
loaded, validated case), plus the file-name rules every layout shares.

A case knows its `Layout` object, and every layout-specific decision (how to load it, which files a result
becomes, how labels are read back) is asked of that object; nothing else branches on the kind of input.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

if TYPE_CHECKING:
    from neuromap.io.dicom_map import StudyChoice
    from neuromap.io.layout import Layout

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SEG_TOKENS = {"seg", "label", "labels", "segmentation", "gt"}
MASK_TOKENS = {"brainmask", "mask"}

Slice = tuple[int, Path, Path | None]  # (slice number, image file, mask file or None) of a slice-folder case


@dataclass(frozen=True)
class ImageRef:
    """A NIfTI file, or one channel of a 4D NIfTI (MSD) or of a slice stack (LGG)."""

    path: Path
    channel: int | None = None

    def __str__(self) -> str:
        return f"{self.path}[channel {self.channel}]" if self.channel is not None else str(self.path)


@dataclass
class Case:
    """One patient's files; nothing is read until ``case.layout.load(case)``.

    ``naming`` says which naming convention was recognised (brats, brats2023, brats-toolkit, plain, msd,
    mapping, kaggle_3m, dicom) and is only shown to people. ``slices`` and ``problems`` are filled by slice-folder
    layouts: the slices in stacking order, and naming problems found at discovery that loading must report
    (discovery itself never fails for one broken patient, so the others stay usable); ``study`` by DICOM.
    """

    case_id: str
    root: Path
    images: dict[str, ImageRef]
    layout: Layout
    naming: str
    seg: ImageRef | None = None
    label_convention: str | None = None  # None: guessed from the label values when read
    brain_mask: Path | None = None
    slices: list[Slice] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    study: StudyChoice | None = None  # DICOM: the series chosen for each sequence, and those left out

    @property
    def modalities(self) -> list[str]:
        return list(self.images)

    def input_paths(self) -> set[Path]:
        """Every input file or slice folder, resolved: outputs must never land on (or in) one of these."""
        paths = {Path(r.path).resolve() for r in self.images.values()}
        if self.seg is not None:
            paths.add(Path(self.seg.path).resolve())
        return paths


@dataclass
class Volume:
    """A loaded case: image channels in file voxel order plus the grid every output must match.

    ``warnings`` are what the loader found that a reader of the results must know (e.g. a channel that is a
    copy of another sequence, or a voxel size the files do not store); loaders report them here and never
    change the case.
    """

    case: Case
    image: np.ndarray  # (C, X, Y, Z) float32
    modalities: list[str]
    reference: nib.Nifti1Image  # its header and affine are the output grid (a lazy proxy for NIfTI input)
    seg: np.ndarray | None = None  # internal labels, uint8
    brain_mask: np.ndarray | None = None
    spacing_known: bool = True  # False: the files store no voxel size; sizes are then given in voxels
    warnings: list[str] = field(default_factory=list)

    @property
    def affine(self) -> np.ndarray:
        return self.reference.affine

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(z) for z in self.reference.header.get_zooms()[:3])

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def nifti_stem(path: Path) -> str | None:
    """The file name without .nii/.nii.gz, or None for a file that is not NIfTI by name."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def split_name_token(stem: str) -> tuple[str, str]:
    """'Brats18_x_1_t1ce' -> ('Brats18_x_1', 't1ce'); 'flair' -> ('', 'flair')."""
    match = re.match(r"^(.*?)[_\-.]([A-Za-z0-9]+)$", stem)
    if match:
        return match.group(1), match.group(2).lower()
    return "", stem.lower()


# Image formats people export sequences in that NeuroMap does not read (it reads NIfTI and DICOM): a file in one of
# them, named like a sequence, is refused by name instead of leaving that sequence "missing" without a word.
OTHER_IMAGE_SUFFIXES = (".hdr", ".img", ".img.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".mgz", ".mgh", ".mnc",
                        ".nii.bz2", ".nii.zip", ".nii.xz", ".zip", ".gz")


def unusable_entry(path: Path) -> str | None:
    """Why a folder entry named like an image cannot be read (None when it can be, or is no image by name).

    ``visible_files`` skips anything that is not a regular file, so without this a sequence whose file is a broken
    link, a folder or a pipe would simply be absent, and the user would hear only that it is missing.
    """
    if nifti_stem(path):
        if path.is_file():
            return None
        if path.is_symlink() and not path.exists():
            return f"is a link to {path.readlink()}, which does not exist"
        return "is a folder" if path.is_dir() else "is not a regular file (a pipe, socket or device)"
    if path.is_file() and (suffix := _other_format(path)):
        return f"is in a format NeuroMap does not read ({suffix}); it reads NIfTI (.nii, .nii.gz) and DICOM series"
    return None


def _other_format(path: Path) -> str | None:
    """The `OTHER_IMAGE_SUFFIXES` entry ``path`` ends with, if any."""
    return next((s for s in OTHER_IMAGE_SUFFIXES if path.name.lower().endswith(s)), None)


def image_token(path: Path) -> str:
    """The naming token of an image file in any format ('Brats18_x_flair.mha' -> 'flair')."""
    stem = nifti_stem(path)
    if stem is None:
        suffix = _other_format(path)
        stem = path.name[: -len(suffix)] if suffix else path.name
    return split_name_token(stem)[1]


def visible_files(folder: Path) -> list[Path]:
    """The files of ``folder`` in name order, without hidden ones (macOS ``._name`` forks are not data)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def duplicate_ids(cases: list[Case]) -> list[str]:
    """Case ids that occur more than once (their outputs or splits would collide)."""
    counts = Counter(c.case_id for c in cases)
    return sorted(i for i, n in counts.items() if n > 1)
