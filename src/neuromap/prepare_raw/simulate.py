"""Raw acquisitions simulated from a prepared case, to measure the raw path against a known answer: each
sequence moved by a known rigid motion, acquired in thick axial slices on its own grid (spacing, field of view,
position), as scanners deliver them, and the expert labels put on the reference sequence's grid.

Used by `tests/test_raw.py` and `benchmarks/raw_vs_prepared.py`: with the motion known, the registration can be
checked point by point, and with the labels known, the raw path's Dice can be set against the prepared input's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from neuromap.labels import to_internal
from neuromap.prepare_raw.grid import nifti_on, to_array, to_sitk

# Each sequence's own grid: in-plane spacing (mm), size, and how far its first voxel sits from the reference's (mm).
GRIDS = {"t1ce": (1.0, (240, 240, 31), (0.0, 0.0, 0.0)), "t1": (1.0, (232, 236, 30), (3.5, -2.5, 1.5)),
         "t2": (1.2, (200, 200, 31), (1.0, 1.0, -2.0)), "flair": (0.9, (262, 258, 30), (-6.0, -4.0, 2.5))}
SLICE_MM = 5
Motion = tuple[tuple[float, float, float], tuple[float, float, float]]  # rotation about x, y, z (deg), shift (mm)


def euler(rotation_deg, translation_mm, centre):
    """The rigid transform of a motion about ``centre`` (LPS scanner coordinates, mm)."""
    import SimpleITK as sitk

    transform = sitk.Euler3DTransform()
    transform.SetCenter([float(c) for c in centre])
    transform.SetRotation(*[float(np.radians(r)) for r in rotation_deg])
    transform.SetTranslation([float(t) for t in translation_mm])
    return transform


def registration_error_mm(entry: dict, motion: Motion, centre) -> float:
    """How far a registration (a report's ``raw_preparation.registration`` entry) is from undoing the known
    ``motion``: the largest distance, over points up to 50 mm from ``centre`` along each axis, between a point and
    where the found transform followed by the motion takes it (0 when the registration undoes the motion)."""
    found = euler(entry["rotation_deg"], entry["translation_mm"], entry["centre_mm"])
    moved = euler(*motion, centre)
    points = np.array(centre) + np.stack(np.meshgrid(*[[-50.0, 0.0, 50.0]] * 3), -1).reshape(-1, 3)
    return max(float(np.linalg.norm(np.array(moved.TransformPoint(found.TransformPoint(p.tolist()))) - p))
               for p in points)


def random_motion(rng: np.random.Generator, max_deg: float = 5.0, max_mm: float = 5.0) -> Motion:
    """A patient motion of up to ``max_deg`` about each axis and ``max_mm`` along each (uniform)."""
    return (tuple(rng.uniform(-max_deg, max_deg, 3).round(2)), tuple(rng.uniform(-max_mm, max_mm, 3).round(2)))


def thick(image, modality: str):
    """The scan as acquired on ``modality``'s own grid: SLICE_MM-thick axial slices (each the mean of the 1 mm
    slices it spans, as a thick slice integrates), its own in-plane spacing, field of view and position."""
    import SimpleITK as sitk

    spacing, size, offset = GRIDS[modality]
    slab = sitk.BoxMean(image, [0, 0, SLICE_MM // 2])
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetDirection(image.GetDirection())
    grid.SetSpacing([spacing, spacing, float(SLICE_MM)])
    first = image.TransformContinuousIndexToPhysicalPoint([0.0, 0.0, (SLICE_MM - 1) / 2])
    grid.SetOrigin([float(v) for v in np.array(first) + offset])
    return sitk.Resample(slab, grid, sitk.Transform(), sitk.sitkLinear, 0.0)


@dataclass
class Simulated:
    folder: Path  # <name>_<modality>.nii.gz, one grid each
    truth_ref: np.ndarray  # internal labels on the reference (T1ce) grid
    truth_1mm: np.ndarray  # internal labels on the case's own grid
    centre: tuple[float, ...]  # the reference's centre (LPS mm), about which the motions turn
    reference: object  # the reference's SimpleITK grid


def simulate_raw(case_dir: Path, folder: Path, motion: dict[str, Motion], name: str = "Moved") -> Simulated:
    """The BraTS-layout case in ``case_dir`` as raw scans in ``folder``: every sequence in SLICE_MM slices on its own
    grid (`GRIDS`), those in ``motion`` moved by it (the patient moved: the scan samples the head at T(x)), the
    T1ce unmoved as the reference; intensities rounded to int16 as scanners store them."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    images = {m: nib.load(case_dir / f"{case_dir.name}_{m}.nii.gz") for m in (*GRIDS, "seg")}
    truth = to_internal(np.asarray(images["seg"].dataobj), "brats")
    reference = thick(to_sitk(images["t1ce"].get_fdata(), images["t1ce"].affine), "t1ce")
    centre = reference.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in reference.GetSize()])
    for m in GRIDS:
        image = to_sitk(images[m].get_fdata(), images[m].affine)
        if m in motion:
            image = sitk.Resample(image, image, euler(*motion[m], centre), sitk.sitkLinear, 0.0)
        scanned = thick(image, m)
        nib.save(nifti_on(scanned, np.round(to_array(scanned)), np.int16), folder / f"{name}_{m}.nii.gz")
    seg = sitk.Resample(to_sitk(truth, images["seg"].affine), reference, sitk.Transform(),
                        sitk.sitkNearestNeighbor, 0.0)
    return Simulated(folder, to_array(seg).astype(np.uint8), truth, centre, reference)
