"""NIfTI file access shared by loading and evaluation: open with a clear message and a header checked against its
file (`neuromap.io.header_checks`), spatial shape, read one channel."""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from neuromap.errors import NeuroMapError
from neuromap.io.case import ImageRef
from neuromap.io.header_checks import check_header

AFFINE_TOLERANCE = 1e-3  # mm / direction cosines: tighter than any real co-registration error


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
    check_header(img, path, what)
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
        # Read through dataobj: get_fdata() would cache a second copy inside the image object. An overflowing
        # scale factor is reported below, with its cause, instead of numpy's bare RuntimeWarning.
        with np.errstate(over="ignore", invalid="ignore"):
            data = np.asanyarray(img.dataobj) if integral else np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise NeuroMapError(f"{ref.path}: file is truncated or corrupt ({exc}). Fix: copy it again.") from None
    slope, inter = img.dataobj.slope, img.dataobj.inter
    if (slope != 1 or inter != 0) and img.get_data_dtype().kind in "iu" and not np.all(np.isfinite(data)):
        raise NeuroMapError(
            f"{ref.path}: the header's scaling (scl_slope {slope:g}, scl_inter {inter:g}) takes the stored integers "
            "beyond the float32 range. Fix: re-export the image with its real intensity scaling."
        )
    if ref.channel is not None:
        data = data[..., ref.channel]
    elif data.ndim == 4:
        data = data[..., 0]
    return data
