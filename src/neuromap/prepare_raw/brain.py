"""Brain extraction of raw (skull-on) scans with deepbet, offline on the CPU.

Why deepbet (Fisch et al., Comput Biol Med 2024; MIT licence): its two TorchScript networks (a coarse
bounding-box net at 128^3 and the mask net at 256^3) ship inside its PyPI wheel, so nothing is downloaded at run
time, and it needs only torch (no torchvision, no CUDA build), cc3d and fill_voids. HD-BET and SynthStrip fetch
their weights on first use, which this tool must not do. The dependency check is in
`docs/experiments/raw_registration.md`.

deepbet is trained on T1-weighted scans, so it reads the native T1 when the case has one (co-registered, on the
1 mm working grid), else the T1ce, else the reference; arrays are turned to RAS first (the orientation it was
trained on) and the mask turned back. Its own post-processing keeps the largest component and fills enclosed
voids, which keeps a tumour inside the brain in the mask.
"""

from __future__ import annotations

from functools import lru_cache

import nibabel as nib
import numpy as np

from neuromap.errors import NeuroMapError

PREFERRED = ("t1", "t1ce")  # deepbet's training contrast first
THRESHOLD = 0.5  # deepbet's default probability cut


@lru_cache(maxsize=1)
def _extractor():
    """The two deepbet networks, loaded once per process (~8 s on a busy 2-core CPU)."""
    try:
        from deepbet import BrainExtraction
    except ImportError as exc:
        raise NeuroMapError(
            f"brain extraction of raw scans needs the deepbet package ({exc}). Fix: pip install --no-deps deepbet "
            "connected-components-3d fill_voids fastremap (its networks are inside the wheel), or pass "
            "--skull-stripped when the scans are already skull-stripped."
        ) from None
    return BrainExtraction(no_gpu=True)


def mask_source(modalities: list[str], reference: str) -> str:
    """The sequence deepbet reads: its training contrast when present."""
    return next((m for m in PREFERRED if m in modalities), reference)


def extract_brain(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Boolean brain mask of an (X, Y, Z) image on a ~1 mm grid with RAS ``affine``."""
    import torch

    bet = _extractor()
    to_ras = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(("R", "A", "S")))
    ras = np.ascontiguousarray(nib.orientations.apply_orientation(image, to_ras), dtype=np.float32)
    with torch.inference_mode():
        probability = bet.run_model(ras)
    mask = bet.postprocess(probability > THRESHOLD)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                           nib.orientations.io_orientation(affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(mask, back)).astype(bool)


def foreground(image: np.ndarray) -> np.ndarray:
    """For scans that are already skull-stripped: the non-zero voxels (as NeuroMap's prepared path uses)."""
    return np.asarray(image) != 0
