"""NIfTI reading with validation, and atomic NIfTI writing in the input's exact grid."""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from neuromap.errors import NeuroMapError
from neuromap.io.atomic import atomic_path
from neuromap.io.cases import Case, ImageRef
from neuromap.labels import guess_convention, to_internal

AFFINE_TOLERANCE = 1e-3  # mm / direction cosines: tighter than any real co-registration error


@dataclass
class Volume:
    """A loaded case: image channels in file voxel order plus the grid every output must match."""

    case: Case
    image: np.ndarray  # (C, X, Y, Z) float32
    modalities: list[str]
    reference: nib.Nifti1Image  # the first modality's image (lazy proxy): its header and affine are the output grid
    seg: np.ndarray | None = None  # internal labels, uint8
    brain_mask: np.ndarray | None = None

    @property
    def affine(self) -> np.ndarray:
        return self.reference.affine

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(z) for z in self.reference.header.get_zooms()[:3])

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def spacing_known(self) -> bool:
        """False where the files store no voxel size (LGG slices: the grid is 1 x 1 x 1 by convention), so
        sizes must be given in voxels, not mm or mL."""
        return bool(self.case.extra.get("spacing_known", True))


def open_nifti(ref: ImageRef | Path, what: str) -> nib.Nifti1Image:
    path = ref.path if isinstance(ref, ImageRef) else Path(ref)
    if not path.is_file():
        raise NeuroMapError(f"{path}: {what} file does not exist.")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for corrupt or non-NIfTI content
        raise NeuroMapError(
            f"{path}: cannot be read as NIfTI ({type(exc).__name__}: {exc}). Fix: re-export the {what} as .nii/.nii.gz."
        ) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise NeuroMapError(f"{path}: is a {type(img).__name__}, not NIfTI. Fix: convert the {what} to NIfTI.")
    return img


def spatial_shape(img: nib.Nifti1Image, ref: ImageRef) -> tuple[int, ...]:
    shape = img.shape
    if ref.channel is not None:
        if len(shape) != 4 or ref.channel >= shape[3]:
            raise NeuroMapError(f"{ref.path}: expected a 4D image with channel {ref.channel}, got shape {shape}.")
        return shape[:3]
    if len(shape) == 4 and shape[3] == 1:
        return shape[:3]
    return shape


def read_nifti(img: nib.Nifti1Image, ref: ImageRef, integral: bool = False) -> np.ndarray:
    try:
        # Read through dataobj: get_fdata() would cache a second copy inside the image object.
        data = np.asanyarray(img.dataobj) if integral else np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise NeuroMapError(f"{ref.path}: file is truncated or corrupt ({exc}). Fix: copy it again.") from None
    if ref.channel is not None:
        data = data[..., ref.channel]
    elif data.ndim == 4:
        data = data[..., 0]
    return data


def load_case(
    case: Case, modalities: list[str] | None = None, with_seg: bool | None = None, check_only: bool = False
) -> Volume | None:
    """Validate and load ``case``: every requested modality present, 3D, same shape and affine, finite, not
    all zero; segmentation (if any) integral with known labels. All problems are reported together.
    """
    if case.layout == "lgg":
        from neuromap.io.lgg import load_lgg  # imported here: neuromap.io.lgg imports Volume from this module

        return load_lgg(case, modalities, with_seg=with_seg, check_only=check_only)
    if case.layout == "dicom":
        from neuromap.io.dicom import load_dicom  # same reason: neuromap.io.dicom imports Volume from here

        return load_dicom(case, modalities, with_seg=with_seg, check_only=check_only)
    modalities = list(modalities or case.modalities)
    problems: list[str] = []
    missing = [m for m in modalities if m not in case.images]
    if missing:
        raise NeuroMapError(
            f"case '{case.case_id}' ({case.root}): missing modality {missing} (found: {case.modalities}). "
            "Fix: add the file(s), map them with --map, or choose a model that needs only the sequences present."
        )
    refs = [case.images[m] for m in modalities]
    headers = [open_nifti(r, f"{m} image") for r, m in zip(refs, modalities, strict=True)]
    first_ref, first = refs[0], headers[0]
    shape0 = spatial_shape(first, first_ref)
    off_grid = []
    for ref, img in zip(refs, headers, strict=True):
        shape = spatial_shape(img, ref)
        if len(shape) != 3:
            problems.append(f"{ref}: image is {len(shape)}D with shape {shape}; a 3D volume is required.")
        elif shape != shape0:
            off_grid.append(f"{ref}: shape {shape} differs from {first_ref.path.name} {shape0}")
        elif not np.allclose(img.affine, first.affine, atol=AFFINE_TOLERANCE):
            off_grid.append(f"{ref}: affine differs from {first_ref.path.name} (voxel grids not aligned)")
    if off_grid:
        problems.append(
            f"case '{case.case_id}' ({case.root}): the sequences are on different voxel grids (raw scans, not "
            "co-registered):\n  " + "\n  ".join(off_grid) + "\nFix: run with --raw (co-registration, brain "
            "extraction and resampling to 1 mm; Python: raw=True), or co-register the sequences to one grid yourself."
        )
    seg_img = None
    if case.seg is not None and with_seg is not False:
        seg_img = open_nifti(case.seg, "segmentation")
        if spatial_shape(seg_img, case.seg) != shape0:
            problems.append(f"{case.seg}: segmentation shape {seg_img.shape} differs from the images {shape0}.")
    elif with_seg:
        problems.append(f"case '{case.case_id}': no segmentation file (expected a *_seg.nii.gz next to the images).")
    if problems:
        raise NeuroMapError("\n".join(problems))

    # gzip decompression releases the GIL, so the sequences are read in parallel threads (~2x on 2 cores).
    with ThreadPoolExecutor(max_workers=min(4, len(refs))) as pool:
        channels = list(pool.map(read_nifti, headers, refs))
    for ref, data, mod in zip(refs, channels, modalities, strict=True):
        if not np.all(np.isfinite(data)):
            problems.append(f"{ref}: contains NaN or infinite values. Fix: re-export the {mod} image.")
        elif not np.any(data):
            problems.append(f"{ref}: the {mod} image is all zero (empty).")
    seg = None
    if seg_img is not None:
        raw = read_nifti(seg_img, case.seg, integral=True)
        try:
            convention = case.label_convention or guess_convention(np.unique(raw))
            seg = to_internal(raw, convention, source=str(case.seg))
        except NeuroMapError as exc:
            problems.append(str(exc))
    brain_mask = None
    if case.brain_mask is not None:
        mask_ref = ImageRef(case.brain_mask)
        mask_img = open_nifti(mask_ref, "brain mask")
        if spatial_shape(mask_img, mask_ref) != shape0:
            problems.append(f"{case.brain_mask}: brain mask shape {mask_img.shape} differs from the images {shape0}.")
        else:
            brain_mask = read_nifti(mask_img, mask_ref, integral=True) > 0
            if not brain_mask.any():
                problems.append(f"{case.brain_mask}: brain mask is empty.")
    if problems:
        raise NeuroMapError("\n".join(problems))
    if check_only:
        return None
    return Volume(
        case=case, image=np.stack(channels).astype(np.float32, copy=False), modalities=modalities,
        reference=first, seg=seg, brain_mask=brain_mask,
    )


def validate_case(case: Case, modalities: list[str] | None = None) -> None:
    """Raise NeuroMapError listing every problem with ``case``; return None when it is usable."""
    load_case(case, modalities, check_only=True)


def label_image(labels: np.ndarray, reference: nib.Nifti1Image) -> nib.Nifti1Image:
    """A uint8 label image with the reference's header, sform and qform unchanged (bit for bit)."""
    labels = np.asarray(labels, dtype=np.uint8)
    if labels.shape != reference.shape[:3]:
        raise ValueError(f"label shape {labels.shape} does not match the reference grid {reference.shape[:3]}")
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(labels.shape)  # also turns a 4D (MSD) header into a 3D one
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    header["cal_min"], header["cal_max"] = 0, max(int(labels.max()), 1)
    # The reference's own affine equals its header's best affine, so nibabel leaves sform/qform untouched.
    return nib.Nifti1Image(labels, reference.affine, header)


def write_labels(
    labels: np.ndarray, reference: nib.Nifti1Image, target: str | Path, overwrite: bool = False
) -> Path:
    """Write the label map in the reference grid atomically (temp file, fsync, rename)."""
    img = label_image(labels, reference)
    with atomic_path(target, overwrite) as tmp:
        nib.save(img, str(tmp))
    return Path(target)
