"""Back to the input grid, in one place (like nnU-Net's ``export_prediction.py``): model probabilities in prepared
space -> internal labels in the patient's own voxel grid -> a label image in the output convention that carries
the input's header and affine bit for bit.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch

from neuromap.labels import from_internal
from neuromap.preprocess import Inverse
from neuromap.tasks import Task


def labels_in_input_grid(probs: torch.Tensor, inverse: Inverse, task: Task) -> np.ndarray:
    """Internal labels in the input grid from prepared-space probabilities (K, X, Y, Z).

    The probabilities go back to the crop at input resolution before the decision, so borders stay smooth; only
    the label map is then placed into the full grid (outside the crop is background either way).
    """
    return inverse.to_original(task.labels(inverse.to_crop(probs.cpu(), linear=True)))


def output_image(internal: np.ndarray, reference: nib.Nifti1Image, convention: str) -> nib.Nifti1Image:
    """The label image users get: ``internal`` labels written in ``convention`` on the reference's grid."""
    return label_image(from_internal(internal, convention), reference)


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
