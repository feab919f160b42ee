"""Whole-tumour-only training cases (LGG kaggle_3m slice stacks) mixed into a BraTS regions model's samples.

Why: the 22 labelled BraTS cases hold one low-grade glioma, and the models under-segment the whole tumour of
low-grade and older (BraTS-2013) patients; the LGG slices are 20 more low-grade patients whose FLAIR-abnormality
masks are the whole tumour, in the contrasts the BraTS models read (FLAIR, pre- and post-contrast T1). Three gaps to
a BraTS case are closed here, the rest is left to the augmentation:
- skull: kaggle_3m slices keep the skull, BraTS cases are skull-stripped. deepbet (the raw-scan path's brain
  extractor, `neuromap.prepare_raw.brain`) strips each stack on a 1 mm grid. The files store no voxel size, so the
  slices are taken as 0.94 mm (a 240 mm field of view over 256 pixels) and the stack as spanning 143 mm (the
  shared raw study TCGA-FG-6692, also in kaggle_3m, has 26 slices of 5.5 mm): deepbet only needs the proportions.
- context: neighbouring kaggle_3m slices are 3-7 mm apart, not 1 mm, so a 2.5D model gets the centre slice in
  place of its neighbours (``PreparedCase.flat``); at 1 mm the neighbours differ little from it.
- labels: only the whole tumour is known. Its voxels carry ``UNKNOWN_TUMOUR`` and the loss ignores the TC and ET
  outputs there (`neuromap.training.losses`).
Patients whose model inputs are copies of one another (kaggle_3m's stand-in for a missing sequence) are left out:
they would teach that post-contrast T1 looks like FLAIR.
"""

from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from neuromap.config import TrainConfig
from neuromap.io import load_case
from neuromap.labels import UNKNOWN_TUMOUR
from neuromap.prepare_raw.brain import extract_brain, mask_source
from neuromap.preprocess import prepare
from neuromap.training.data import PreparedCase, find_training_cases

IN_PLANE_MM = 0.94
STACK_EXTENT_MM = 143.0
MIN_TUMOUR_IN_BRAIN = 0.9  # a brain mask that cuts off more of the tumour than this is not trusted
# kaggle_3m axes in RAS terms: rows run anterior -> posterior, columns patient right -> left (radiological display),
# slices inferior -> superior. The layout reads them with an identity affine (it only has to give predictions back
# on the same grid); training needs the BraTS cases' orientation, or every slice would be a transposed brain.
SLICES_TO_RAS = np.array([[0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)


def _brain_mask(slices: np.ndarray) -> np.ndarray:
    """(rows, cols, N) slice stack of a T1-weighted sequence -> boolean brain mask of the same shape."""
    rows, cols, n = slices.shape
    stack = sitk.GetImageFromArray(np.ascontiguousarray(slices.transpose(2, 0, 1), dtype=np.float32))
    stack.SetSpacing((IN_PLANE_MM, IN_PLANE_MM, STACK_EXTENT_MM / n))
    grid = sitk.Image([round(cols * IN_PLANE_MM), round(rows * IN_PLANE_MM), round(STACK_EXTENT_MM)],
                      sitk.sitkFloat32)
    on_grid = sitk.GetArrayFromImage(sitk.Resample(stack, grid, sitk.Transform(), sitk.sitkLinear))  # (z, y, x)
    # (rows, cols, slices) with their RAS axes: extract_brain turns them to the orientation deepbet was trained on
    mask = extract_brain(on_grid.transpose(1, 2, 0), SLICES_TO_RAS).astype(np.uint8)
    mask_image = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 0, 1)))
    back = sitk.Resample(mask_image, stack, sitk.Transform(), sitk.sitkNearestNeighbor)
    return sitk.GetArrayFromImage(back).transpose(1, 2, 0) > 0


def load_auxiliary(cfg: TrainConfig) -> list[PreparedCase]:
    """The configured whole-tumour-only cases, skull-stripped and prepared like the BraTS cases (see above)."""
    assert cfg.auxiliary is not None
    modalities = cfg.preprocess.modalities
    source = mask_source(modalities, modalities[0])
    out: list[PreparedCase] = []
    for case in find_training_cases(cfg.auxiliary.data_roots):
        volume = load_case(case, modalities, with_seg=True)
        channels = volume.image
        if any(np.array_equal(channels[a], channels[b]) for a in range(len(channels)) for b in range(a)):
            print(f"auxiliary: {case.case_id} left out (two of {modalities} are the same image)", file=sys.stderr)
            continue
        brain = _brain_mask(channels[modalities.index(source)])
        tumour = volume.seg > 0
        inside = float((tumour & brain).sum() / max(tumour.sum(), 1))
        if inside < MIN_TUMOUR_IN_BRAIN:
            print(f"auxiliary: {case.case_id} left out (brain mask holds {inside:.0%} of the tumour)", file=sys.stderr)
            continue
        volume.brain_mask = brain
        volume.reference = nib.Nifti1Image(volume.reference.dataobj, SLICES_TO_RAS)
        volume.seg = np.where(tumour & brain, UNKNOWN_TUMOUR, 0).astype(np.uint8)
        prepared = prepare(volume, cfg.preprocess)
        out.append(PreparedCase.indexed(case.case_id, prepared.image, prepared.seg.astype(np.uint8),
                                        prepared.spacing, flat=True))
    return out
