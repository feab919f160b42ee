"""DICOM studies as cases: find every series in a folder tree, read each with its exact geometry.

Discovery reads headers only (pydicom, a few tags per file), in any file order, skipping files that are not
DICOM and objects that are not images (DICOMDIR, SEG, SR...). Files are grouped by SeriesInstanceUID, never by
folder or file name, and slices are sorted by their position along the slice normal (ImagePositionPatient
projected on the cross product of the ImageOrientationPatient vectors), never by InstanceNumber, which
scanners number in either direction.

Pixels are read by SimpleITK's ImageSeriesReader from that sorted file list, as float32 so per-file rescale
slope/intercept (applied by GDCM) cannot be truncated; `docs/experiments/dicom_reader.md` measures it against
dcm2niix. Geometry comes from the headers: voxel (i, j, k) is column i, row j of the k-th sorted slice, and
the affine maps it to RAS+ millimetres (nibabel's convention; DICOM's LPS+ x and y change sign).

`neuromap.io.dicom_layout.DicomLayout` turns each study into a `Case` whose images are `SeriesRef`s chosen by
`neuromap.io.dicom_map`, and loads it into the same `Volume` a NIfTI case gives.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from neuromap.errors import NeuroMapError
from neuromap.io.case import ImageRef
from neuromap.io.header_checks import MAX_VOXELS
from neuromap.io.nifti_files import AFFINE_TOLERANCE

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Tags that tell the sequence apart (see `neuromap.io.dicom_map`), kept as text in `Series.tags`.
ACQUISITION_TAGS = [
    "Modality", "ImageType", "RepetitionTime", "EchoTime", "InversionTime", "ScanningSequence", "SequenceVariant",
    "ContrastBolusAgent", "PatientID", "StudyDate", "FrameOfReferenceUID",
]
HEADER_TAGS = [
    "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "ProtocolName",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "NumberOfFrames",
    *ACQUISITION_TAGS,
]
IMAGE_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1."  # storage SOP classes; images are told apart by geometry tags
POSITION_TOLERANCE_MM = 0.01


@dataclass
class Series:
    """One DICOM series: header facts from its first file, its files in slice order, and its grid.

    ``problem`` says why it is not one readable 3D volume (then ``affine`` is None)."""

    uid: str
    study_uid: str
    number: int | None
    description: str
    protocol: str
    tags: dict
    files: list[Path]
    shape: tuple[int, int, int] = (0, 0, 0)
    affine: np.ndarray | None = None
    problem: str | None = None

    @property
    def size(self) -> str:
        return "x".join(str(n) for n in self.shape)

    @property
    def title(self) -> str:
        """Its number and description, as a person names the series."""
        number = self.number if self.number is not None else "?"
        return f"#{number} '{self.description or self.protocol or '(no description)'}'"

    def label(self) -> str:
        """How messages name the series: number, description, size and UID."""
        return f"{self.title} {self.size} {self.uid}"

    @property
    def is_axial(self) -> bool:
        return self.affine is not None and abs(_unit(self.affine[:3, 2])[2]) > 0.9


@dataclass(frozen=True)
class SeriesRef(ImageRef):
    """A case image that is a DICOM series; ``path`` is the folder holding its files."""

    series: Series | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"DICOM series {self.series.label()} in {self.path}" if self.series else str(self.path)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _read_header(path: Path):
    """The header of a DICOM file, or None for anything else (pydicom needs the 'DICM' preamble)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
        return None


def _number(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _files(root: Path) -> Iterator[Path]:
    """Every file below ``root`` in a stable order, hidden files and folders (.DS_Store, .git) left out."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        # regular files only: opening a pipe or device found in an exported tree would block or read forever
        yield from (Path(dirpath) / name for name in sorted(filenames)
                    if not name.startswith(".") and os.path.isfile(os.path.join(dirpath, name)))


def scan_dicom(root: str | Path) -> tuple[list[Series], list[str]]:
    """All image series under ``root`` with their geometry, and notes on the DICOM files that are not images
    (DICOMDIR, SEG, SR, ...), which are skipped."""
    root = Path(root)
    groups: dict[str, list[tuple[Path, object]]] = {}
    notes: list[str] = []
    for path in _files(root):
        header = _read_header(path)
        if header is None:
            continue
        sop = str(header.get("SOPClassUID", ""))
        if not header.get("SeriesInstanceUID") or not sop.startswith(IMAGE_SOP_PREFIX) or \
                "ImageOrientationPatient" not in header:
            notes.append(f"{path.relative_to(root)}: DICOM object without image geometry (SOP class {sop}) skipped")
            continue
        groups.setdefault(str(header.SeriesInstanceUID), []).append((path, header))
    return [_series(uid, members) for uid, members in groups.items()], notes


def _series(uid: str, members: list[tuple[Path, object]]) -> Series:
    first = members[0][1]
    number = _number(first.get("SeriesNumber"))
    tags = {key: _text(first.get(key)) for key in ACQUISITION_TAGS}
    series = Series(
        uid=uid, study_uid=str(first.get("StudyInstanceUID", "")), number=int(number) if number is not None else None,
        description=_text(first.get("SeriesDescription")), protocol=_text(first.get("ProtocolName")), tags=tags,
        files=[p for p, _ in members],
    )
    series.problem = _geometry(series, [h for _, h in members])
    return series


def _geometry(series: Series, headers: list) -> str | None:
    """Sort the files along the slice normal and set shape and RAS affine; or say why this is not a volume."""
    if any(int(_number(h.get("NumberOfFrames")) or 1) > 1 for h in headers):
        return "multi-frame (enhanced) images are not supported yet"
    try:
        orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
        spacings = np.array([[float(v) for v in h.PixelSpacing] for h in headers])
        sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
    except (AttributeError, TypeError, ValueError):
        return "geometry tags (ImagePositionPatient, ImageOrientationPatient, PixelSpacing) missing or unreadable"
    rows, cols = sizes.pop() if len(sizes) == 1 else (0, 0)
    series.shape = (cols, rows, len(headers))
    if not rows:
        return "images of different sizes"
    spacing = spacings[0]
    if np.abs(spacings - spacing).max() > 1e-4:
        return "images with different pixel spacings"
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        return "images in different orientations (a localizer?)"
    if len(headers) < 2:
        return "a single image, not a volume"
    if cols * rows * len(headers) > MAX_VOXELS:
        return f"{cols} x {rows} x {len(headers)} voxels, more than NeuroMap holds ({MAX_VOXELS:.3g}); resample it"
    row_dir, col_dir = _unit(orientations[0, :3]), _unit(orientations[0, 3:])
    along = positions @ np.cross(row_dir, col_dir)
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    series.files = [series.files[i] for i in order]
    steps = np.diff(along)
    if steps.min() < POSITION_TOLERANCE_MM:
        unique = len(np.unique(np.round(along / POSITION_TOLERANCE_MM)))
        return f"{len(headers)} images at {unique} positions (several echoes, phases or stacks?)"
    if steps.max() - steps.min() > max(POSITION_TOLERANCE_MM, 0.01 * np.median(steps)):
        return f"uneven slice spacing ({steps.min():.3g}-{steps.max():.3g} mm): slices missing?"
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # along a row: next column
    lps[:3, 1] = col_dir * spacing[0]  # down a column: next row
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(headers) - 1)
    lps[:3, 3] = positions[0]
    series.affine = LPS_TO_RAS @ lps
    return None


def read_series(series: Series) -> np.ndarray:
    """Pixels of a series as float32 (X = column, Y = row, Z = slice along the normal), rescale applied."""
    import SimpleITK as sitk

    if series.problem:
        raise NeuroMapError(f"DICOM series {series.label()}: {series.problem}.")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in series.files])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise NeuroMapError(
            f"DICOM series {series.label()}: pixels cannot be read ({str(exc).strip().splitlines()[-1]}). "
            "Fix: export the series again, uncompressed or with a standard transfer syntax."
        ) from None
    return np.ascontiguousarray(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0))


def same_grid(a: Series, b: Series) -> bool:
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=AFFINE_TOLERANCE)


def reference_image(series: Series) -> nib.Nifti1Image:
    """An image with the series' grid (no pixels: a zero-strided view) whose header every output copies."""
    image = nib.Nifti1Image(np.broadcast_to(np.uint8(0), series.shape), series.affine)
    image.header.set_qform(series.affine, code=1)
    image.header.set_sform(series.affine, code=1)
    image.header["descrip"] = f"DICOM series {series.number}"[:79].encode()
    return image


def is_dicom_tree(root: str | Path, probe: int = 200) -> bool:
    """True when a folder tree holds DICOM files (checks at most ``probe`` files)."""
    root = Path(root)
    if not root.is_dir():
        return False
    for path in itertools.islice(_files(root), probe):
        try:
            with open(path, "rb") as handle:
                handle.seek(128)
                if handle.read(4) == b"DICM":
                    return True
        except OSError:
            pass
    return False


def study_ids(root: Path, studies: dict[str, list[Series]]) -> list[str]:
    """Case ids: the root folder's name for one study; for several, the top folder holding each study's files
    when those differ (a folder per patient), else the root's name numbered."""
    if len(studies) == 1:
        return [root.name]
    tops = []
    for members in studies.values():
        parts = {p.relative_to(root).parts[0] for s in members for p in s.files if len(p.relative_to(root).parts) > 1}
        tops.append(parts.pop() if len(parts) == 1 else None)
    if None not in tops and len(set(tops)) == len(tops):
        return tops
    first_files = [min(p for s in members for p in s.files) for members in studies.values()]
    rank = {path: n for n, path in enumerate(sorted(first_files))}  # numbered in folder order
    return [f"{root.name}_{rank[path] + 1}" for path in first_files]
