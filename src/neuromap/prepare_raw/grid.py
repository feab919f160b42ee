"""Grids of raw scans: nibabel (RAS affine) <-> SimpleITK (LPS origin/direction) images, the 1 mm working grid,
resampling onto it, and labels back onto the reference sequence's own grid.

Why convert by hand instead of letting SimpleITK read the NIfTI: NIfTI readers disagree on sform/qform
precedence, and the labels file must carry exactly the affine nibabel reads from the reference file (the rest of
NeuroMap copies that header bit for bit). So the affine nibabel sees is the one geometry used everywhere.

The working grid keeps the reference's direction cosines and covers the reference's field of view at 1 mm: its
axes are the reference's axes, so labels go back by resampling at the reference voxel centres (nearest
neighbour, the same sampling that puts a 1 mm ground truth on a thick-slice grid).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from neuromap.errors import NeuroMapError

LPS = np.diag([-1.0, -1.0, 1.0])
ORTHOGONAL_TOLERANCE = 1e-3  # direction cosines: ITK images cannot carry sheared grids


def to_sitk(array: np.ndarray, affine: np.ndarray, source: str = "image"):
    """A SimpleITK image from an (X, Y, Z) array and its RAS affine (nibabel convention)."""
    import SimpleITK as sitk

    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(zooms <= 0):
        raise NeuroMapError(f"{source}: the affine has a zero voxel size. Fix: repair the file's header.")
    direction = affine[:3, :3] / zooms
    if np.abs(direction.T @ direction - np.eye(3)).max() > ORTHOGONAL_TOLERANCE:
        raise NeuroMapError(
            f"{source}: the voxel axes are not orthogonal (sheared affine); raw-scan preparation needs an "
            "orthogonal grid. Fix: re-export the series from the scanner or DICOM without gantry tilt correction."
        )
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, dtype=np.float32).transpose(2, 1, 0)))
    image.SetSpacing([float(z) for z in zooms])
    image.SetOrigin([float(v) for v in LPS @ affine[:3, 3]])
    image.SetDirection([float(v) for v in (LPS @ direction).ravel()])
    return image


def to_array(image) -> np.ndarray:
    """(X, Y, Z) numpy array of a SimpleITK image."""
    import SimpleITK as sitk

    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def ras_affine(image) -> np.ndarray:
    """The RAS affine (nibabel convention) of a SimpleITK image's grid."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = LPS @ np.array(image.GetOrigin())
    return affine


def working_grid(reference, spacing: float = 1.0):
    """An empty image on the 1 mm grid covering the reference's field of view, with the reference's axes."""
    import SimpleITK as sitk

    old_spacing = np.array(reference.GetSpacing())
    size = [max(1, int(round(n * s / spacing))) for n, s in zip(reference.GetSize(), old_spacing, strict=True)]
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    # Voxel centres move so the new grid spans the same box: first centre half a new voxel inside the old edge.
    shift = direction @ ((spacing - old_spacing) / 2)
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    grid.SetDirection(reference.GetDirection())
    grid.SetOrigin([float(v) for v in np.array(reference.GetOrigin()) + shift])
    return grid


def resample(image, grid, transform=None, linear: bool = True, default: float = 0.0):
    """``image`` sampled on ``grid`` through ``transform`` (grid point -> image point; identity if None)."""
    import SimpleITK as sitk

    return sitk.Resample(image, grid, transform or sitk.Transform(), sitk.sitkLinear if linear else
                         sitk.sitkNearestNeighbor, default, sitk.sitkFloat32 if linear else image.GetPixelID())


def labels_to_reference(labels: np.ndarray, grid, reference) -> np.ndarray:
    """Labels on the working grid -> the reference grid (nearest neighbour at the reference voxel centres)."""
    return to_array(resample(_on(grid, np.asarray(labels, dtype=np.uint8)), reference, linear=False))


def values_to_reference(values: np.ndarray, grid, reference) -> np.ndarray:
    """A map of values on the working grid (X, Y, Z) -> the reference grid, linearly interpolated (float32)."""
    return to_array(resample(_on(grid, np.asarray(values, dtype=np.float32)), reference, linear=True))


def _on(grid, array: np.ndarray):
    """An (X, Y, Z) array as a SimpleITK image with ``grid``'s geometry."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.CopyInformation(grid)
    return image


def nifti_on(grid, array: np.ndarray, dtype=np.float32, descrip: str = "") -> nib.Nifti1Image:
    """An (X, Y, Z) array on a SimpleITK grid as a NIfTI image (sform and qform set, scanner space)."""
    affine = ras_affine(grid)
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header["descrip"] = descrip[:79].encode()
    return image
