"""Back to the input grid, in one place (like nnU-Net's ``export_prediction.py``): model probabilities in prepared
space -> internal labels (and, on request, uncertainty and probability maps) in the patient's own voxel grid ->
uint8 images that carry the input's header and affine bit for bit.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from neuromap.labels import from_internal
from neuromap.preprocess import Inverse
from neuromap.tasks import Task


def labels_in_input_grid(probs: np.ndarray, inverse: Inverse, task: Task) -> np.ndarray:
    """Internal labels in the input grid from prepared-space probabilities (K, X, Y, Z).

    The probabilities go back to the crop at input resolution before the decision, so borders stay smooth; only
    the label map is then placed into the full grid (outside the crop is background either way).
    """
    return crop_to_input_grid(task.labels(crop_probabilities(probs, inverse)), inverse)


def crop_probabilities(probs: np.ndarray, inverse: Inverse) -> np.ndarray:
    """Prepared-space probabilities (K, X, Y, Z) resized (linearly) to the crop at input resolution, still RAS:
    where labels are decided and uncertainty maps computed (`neuromap.uncertainty`)."""
    return inverse.to_crop(probs, linear=True)


def crop_to_input_grid(array: np.ndarray, inverse: Inverse) -> np.ndarray:
    """An array (..., crop) at input resolution placed into the input grid's voxel order; 0 outside the crop."""
    return inverse.to_original(array)


def output_image(internal: np.ndarray, reference: nib.Nifti1Image, convention: str) -> nib.Nifti1Image:
    """The label image users get: ``internal`` labels written in ``convention`` on the reference's grid."""
    return uint8_image(from_internal(internal, convention), reference)


def uint8_image(data: np.ndarray, reference: nib.Nifti1Image, description: str | None = None) -> nib.Nifti1Image:
    """A uint8 image on the reference's grid (3D, or 4D with channels last), header, sform and qform unchanged
    (bit for bit); ``description`` goes into the header's 80-byte ``descrip`` field."""
    data = np.asarray(data, dtype=np.uint8)
    if data.shape[:3] != reference.shape[:3]:
        raise ValueError(f"image shape {data.shape} does not match the reference grid {reference.shape[:3]}")
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(data.shape)  # also turns a 4D (MSD) header into a 3D one
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    header["cal_min"], header["cal_max"] = 0, max(int(data.max()), 1)
    if description is not None:
        header["descrip"] = description.encode("ascii", "replace")[:79]
    # The reference's own affine equals its header's best affine, so nibabel leaves sform/qform untouched.
    return nib.Nifti1Image(data, reference.affine, header)
