"""A synthetic multimodal 'brain with a tumour', for the demo on a fresh machine and for unit tests.

It is not anatomy: an ellipsoid head with grey/white-like texture, a tumour made of an enhancing rim around a
necrotic core, surrounded by edema, with sequence-specific contrasts roughly like real scans (edema bright on
T2/FLAIR, rim bright on T1ce). The repo may not contain third-party scans, so this is what `make demo` can
always run on.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from neuromap.labels import ED, ET, NCR, from_internal

# Mean intensity per tissue (background, brain, NCR, ED, ET) for each sequence.
CONTRAST = {
    "t1": (0, 500, 250, 380, 420),
    "t1ce": (0, 500, 200, 400, 950),
    "t2": (0, 400, 900, 800, 600),
    "flair": (0, 350, 500, 900, 650),
}
NAMES = {
    "brats": {"t1": "{id}_t1", "t1ce": "{id}_t1ce", "t2": "{id}_t2", "flair": "{id}_flair", "seg": "{id}_seg"},
    "brats2023": {"t1": "{id}-t1n", "t1ce": "{id}-t1c", "t2": "{id}-t2w", "flair": "{id}-t2f", "seg": "{id}-seg"},
    "plain": {"t1": "t1", "t1ce": "t1c", "t2": "t2", "flair": "flair", "seg": "seg"},
}


def synthetic_arrays(shape: tuple[int, int, int] = (96, 96, 64), seed: int = 0) -> tuple[dict, np.ndarray]:
    """(images by modality as int16 arrays, internal label map)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    brain = (grid ** 2 / np.array([0.8, 0.9, 0.8])[:, None, None, None] ** 2).sum(0) < 1
    centre = rng.uniform(-0.3, 0.3, 3)
    radius = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
    r = rng.uniform(0.18, 0.25)
    labels = np.zeros(shape, np.uint8)
    labels[(radius < r * 1.8) & brain] = ED
    labels[(radius < r) & brain] = ET
    labels[(radius < r * 0.6) & brain] = NCR
    texture = rng.normal(0, 1, shape)
    images = {}
    for mod, means in CONTRAST.items():
        tissue = np.choose(np.where(brain, labels.astype(int) + 1, 0), means).astype(np.float32)
        images[mod] = np.where(brain, tissue * (1 + 0.08 * texture), 0).astype(np.int16)
    return images, labels


def write_synthetic_case(
    folder: str | Path, case_id: str = "Synthetic_001", shape: tuple[int, int, int] = (96, 96, 64), seed: int = 0,
    layout: str = "brats", affine: np.ndarray | None = None, with_seg: bool = True,
) -> Path:
    """Write one case in the given naming ``layout`` (brats, brats2023, plain); returns the case folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = synthetic_arrays(shape, seed)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) if affine is None else affine  # LPS like BraTS by default
    names = NAMES[layout]
    for mod, data in images.items():
        nib.save(nib.Nifti1Image(data, affine), str(folder / f"{names[mod].format(id=case_id)}.nii.gz"))
    if with_seg:
        convention = "brats2023" if layout == "brats2023" else "brats"
        seg = from_internal(labels, convention).astype(np.int16)
        nib.save(nib.Nifti1Image(seg, affine), str(folder / f"{names['seg'].format(id=case_id)}.nii.gz"))
    return folder
