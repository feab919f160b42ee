"""What a NIfTI header may claim, checked against its own file before a single voxel is read, and how two
voxel grids differ, said in millimetres, axes and voxel sizes.

nibabel trusts the header: a 2 kB file whose header claims 32767^3 voxels makes it allocate petabytes, and a
header whose dimensions were edited reads the voxels into the wrong shape without a word. So the one function
that opens NIfTI files (`neuromap.io.nifti_files.open_nifti`) calls `check_header`, which compares the bytes the
header describes with the bytes the file holds (exactly: the gzip trailer records the uncompressed size), bounds
the grid to what NeuroMap can hold in memory, and refuses what the header itself makes meaningless (complex or
RGB voxels, a singular or non-finite affine, voxel sizes that contradict the affine). A scale factor that overflows
is reported when the voxels are read (`neuromap.io.nifti_files.read_nifti`); an infinite one nibabel already
ignores, as the NIfTI standard does with invalid scale factors.
All 122 shared real files pass (`scripts/plausibility_survey.py`).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from neuromap.errors import NeuroMapError

# The largest 3D grid read: a 0.5 mm whole head (512^3 voxels); its four float32 sequences take 2 GiB.
MAX_VOXELS = 512**3
# A 4th dimension holds sequences (MSD stores four); more volumes than this is a time series, not a case.
MAX_VOLUMES = 8
# deflate codes a 258-byte match in no fewer than 2 bits: no .gz expands more than ~1032 times (plus headers).
DEFLATE_MAX_RATIO = 1032
GZIP_SLACK = 4096
# Voxels longer than this on any axis get a warning: the models were trained on 1 mm scans.
THICK_MM = 3.5
# Voxel sizes in the header and in the affine must agree to this relative tolerance.
ZOOM_RTOL = 1e-2
CHUNK = 1 << 20


def check_header(img: nib.Nifti1Image, path: Path, what: str) -> None:
    """Raise a NeuroMapError naming ``path`` when the header cannot describe a usable image (see module doc)."""
    shape = tuple(int(n) for n in img.shape)
    fix = f"Fix: re-export the {what} from its source (the header is damaged or was edited)."
    if not shape or min(shape) < 1:
        raise NeuroMapError(f"{path}: the header declares the shape {shape}, an empty or negative dimension. {fix}")
    if len(shape) < 3:  # before the geometry checks, which read three voxel sizes
        raise NeuroMapError(f"{path}: image is {len(shape)}D with shape {shape}; a 3D volume is required. Fix: give "
                            f"the whole {what} as one 3D NIfTI, not a single slice.")
    check_voxel_count(shape[:3], f"{path}: the header declares the shape {shape}", "Fix: resample the scan.")
    volumes = int(np.prod(shape[3:], dtype=np.int64))
    if volumes > MAX_VOLUMES:
        raise NeuroMapError(
            f"{path}: the header declares {volumes} volumes beyond the 3D grid (shape {shape}); a case holds at most "
            f"{MAX_VOLUMES} (one per sequence). Fix: give one 3D volume per sequence, not a time series."
        )
    dtype = img.get_data_dtype()
    if dtype.kind == "c":
        raise NeuroMapError(
            f"{path}: complex-valued voxels ({dtype}); MRI sequences are read as real magnitude images. Fix: export "
            f"the magnitude image (e.g. abs() of the complex data) as the {what}."
        )
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise NeuroMapError(f"{path}: voxels of type {dtype} (e.g. RGB colour); a {what} holds one number per voxel. "
                            f"Fix: export it as a grey-scale NIfTI.")
    _check_stored_size(img, path, shape, dtype, fix)
    _check_geometry(img, path, fix)


def check_voxel_count(shape: tuple[int, ...], what: str, fix: str) -> None:
    """Refuse a 3D grid larger than MAX_VOXELS, before anything of that size is allocated."""
    count = int(np.prod([int(n) for n in shape], dtype=np.float64))
    if count > MAX_VOXELS:
        raise NeuroMapError(
            f"{what}: {count:.3g} voxels, more than NeuroMap holds ({MAX_VOXELS:.3g}, a 0.5 mm whole-head grid). {fix}"
        )


def _check_stored_size(img: nib.Nifti1Image, path: Path, shape: tuple[int, ...], dtype: np.dtype, fix: str) -> None:
    """The file must hold exactly the bytes the header describes: fewer cannot be read, more means the header's
    dimensions or data type do not describe the data (it would be read into the wrong shape)."""
    offset = int(img.dataobj.offset)
    declared = offset + int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    on_disk = path.stat().st_size
    gzipped = path.name.lower().endswith(".gz")
    if gzipped and declared > on_disk * DEFLATE_MAX_RATIO + GZIP_SLACK:
        raise NeuroMapError(
            f"{path}: the header declares {_size(declared)} of image data (shape {shape}, {dtype}), but a compressed "
            f"file of {_size(on_disk)} cannot hold more than {_size(on_disk * DEFLATE_MAX_RATIO)}. {fix}"
        )
    stored = _inflated_size(path, declared) if gzipped else on_disk
    if stored != declared:
        holds = f"holds only {_size(stored)}, less" if stored < declared else "holds more"
        raise NeuroMapError(
            f"{path}: {holds} than the {_size(declared)} of header and voxels its header declares (shape {shape}, "
            f"{dtype}, data at byte {offset}): the file is truncated or its header does not describe the data. {fix}"
        )


def _inflated_size(path: Path, declared: int) -> int:
    """Uncompressed size of a .gz file, exact up to ``declared`` (above it: some larger number). The trailer
    records the size modulo 2^32 for the last gzip member; when it agrees with ``declared`` that is taken as it is,
    otherwise the stream is inflated and counted, stopping once past ``declared`` (a crafted file cannot make this
    read for long: ``declared`` is bounded by the deflate ratio check before)."""
    with path.open("rb") as handle:
        handle.seek(-4, 2)
        if struct.unpack("<I", handle.read(4))[0] == declared % 2**32:
            return declared
    count = 0
    try:
        with gzip.open(path, "rb") as stream:
            while count <= declared:
                chunk = stream.read(CHUNK)
                if not chunk:
                    break
                count += len(chunk)
    except (OSError, EOFError, zlib.error):  # truncated or corrupt stream: count what could be inflated
        pass
    return count


def _check_geometry(img: nib.Nifti1Image, path: Path, fix: str) -> None:
    affine = img.affine
    if not np.all(np.isfinite(affine)):
        raise NeuroMapError(f"{path}: the affine (voxel-to-world matrix) contains NaN or infinity. {fix}")
    axes = affine[:3, :3]
    norms = np.linalg.norm(axes, axis=0)
    if min(norms) == 0 or abs(np.linalg.det(axes)) < 1e-6 * float(np.prod(norms)):
        raise NeuroMapError(f"{path}: the affine is singular (voxel axes {np.round(axes, 4).tolist()} do not span 3D "
                            f"space), so voxel positions are undefined. {fix}")
    zooms = np.array(img.header.get_zooms()[:3], dtype=float)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise NeuroMapError(f"{path}: voxel size {_mm(zooms)} is not a positive number. {fix}")
    oriented = int(img.header["sform_code"]) > 0 or int(img.header["qform_code"]) > 0
    if oriented and not np.allclose(norms, zooms, rtol=ZOOM_RTOL):
        raise NeuroMapError(
            f"{path}: the header contradicts itself: pixdim gives voxels of {_mm(zooms)}, the affine {_mm(norms)}, so "
            f"volumes in mL would depend on which is believed. {fix}"
        )


def header_warnings(images: dict[Path | str, nib.Nifti1Image]) -> list[str]:
    """What usable headers say that makes the answer less trustworthy: said once for all the files it applies to,
    not refused. Keys name the inputs: file paths, or labels such as a DICOM series'."""
    unoriented = [p for p, img in images.items()
                  if int(img.header["sform_code"]) == 0 and int(img.header["qform_code"]) == 0]
    zooms = {p: np.array(img.header.get_zooms()[:3], dtype=float) for p, img in images.items()}
    thick = {p: z for p, z in zooms.items() if z.max() > THICK_MM}
    found = []
    if unoriented:
        codes = "".join(nib.aff2axcodes(images[unoriented[0]].affine))
        found.append(
            f"{_files(unoriented)}: the header records no orientation (qform_code and sform_code are 0), so NeuroMap "
            f"assumes the NIfTI default ({codes}); if the scan is stored otherwise, the model sees the head flipped "
            "and the pictures' left/right and front/back are wrong. Fix: re-export the scan with its orientation "
            "(dcm2niix writes it)."
        )
    if thick:
        found.append(
            f"{_files(list(thick))}: voxels of {_mm(next(iter(thick.values())))}: slices thicker than {THICK_MM:g} mm "
            "are interpolated to the models' 1 mm grid and thin structures are lost (5 mm slices cost up to 0.11 "
            "whole-tumour Dice on the shared cases, benchmarks/raw_vs_prepared.py). Expect a less accurate result."
        )
    return found


def _files(names: list[Path | str]) -> str:
    """Several files of one folder as ``folder/ (a, b)``; anything else as listed."""
    if len(names) == 1 or not all(isinstance(n, Path) for n in names) or len({n.parent for n in names}) > 1:
        return ", ".join(map(str, names))
    return f"{names[0].parent}/ ({', '.join(n.name for n in names)})"


def grid_difference(img: nib.Nifti1Image, reference: nib.Nifti1Image, shape: tuple[int, ...],
                    reference_shape: tuple[int, ...], tolerance: float) -> str | None:
    """How the voxel grid of ``img`` differs from ``reference`` (None: the same grid within ``tolerance`` mm):
    shape, voxel size, axis order and direction (flips), rotation, and the shift of the field-of-view centre."""
    if shape == reference_shape and np.allclose(img.affine, reference.affine, atol=tolerance):
        return None
    parts = []
    if shape != reference_shape:
        parts.append(f"shape {shape} vs {reference_shape}")
    zooms, ref_zooms = (np.linalg.norm(a.affine[:3, :3], axis=0) for a in (img, reference))
    if not np.allclose(zooms, ref_zooms, atol=tolerance):
        parts.append(f"voxel size {_mm(zooms)} vs {_mm(ref_zooms)}")
    codes, ref_codes = nib.aff2axcodes(img.affine), nib.aff2axcodes(reference.affine)
    if codes != ref_codes:
        parts.append(f"orientation {''.join(codes)} vs {''.join(ref_codes)} ({_axis_change(codes, ref_codes)})")
    else:
        angle = _rotation_deg(img.affine, reference.affine)
        if angle > 0.01:
            parts.append(f"rotated by {angle:.2f} degrees")
    centre = img.affine @ np.r_[(np.array(shape[:3]) - 1) / 2, 1]
    ref_centre = reference.affine @ np.r_[(np.array(reference_shape[:3]) - 1) / 2, 1]
    shift = (centre - ref_centre)[:3]
    if np.linalg.norm(shift) > tolerance:
        parts.append(f"field-of-view centre shifted by {np.linalg.norm(shift):.3g} mm "
                     f"(x {shift[0]:+.3g}, y {shift[1]:+.3g}, z {shift[2]:+.3g} mm)")
    return "; ".join(parts) or "affine differs by less than the voxel size"


def _axis_change(codes: tuple[str, ...], ref_codes: tuple[str, ...]) -> str:
    """'axis 2 flipped (P vs A)', or the permutation when the axes are in another order."""
    opposite = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
    flipped = [f"axis {i + 1} flipped ({a} vs {b})" for i, (a, b) in enumerate(zip(codes, ref_codes, strict=True))
               if opposite[a] == b]
    if len(flipped) == sum(a != b for a, b in zip(codes, ref_codes, strict=True)):
        return ", ".join(flipped)
    return "voxel axes in another order"


def _rotation_deg(affine: np.ndarray, reference: np.ndarray) -> float:
    directions = [a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0) for a in (affine, reference)]
    cosine = (np.trace(directions[0].T @ directions[1]) - 1) / 2
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def _mm(values: np.ndarray) -> str:
    return " x ".join(f"{float(v):.4g}" for v in values) + " mm"


def _size(n: float) -> str:
    units = ("bytes", "kB", "MB", "GB", "TB", "PB", "EB")
    step = 0
    while n >= 1000 and step < len(units) - 1:
        n, step = n / 1000, step + 1
    return f"{n:.3g} {units[step]}"
