"""Uncertainty and probability maps in the input grid (``neuromap segment --uncertainty / --probabilities``).

The measure is the entropy of the model's own probabilities (the task names it, `neuromap.tasks.Task`): it needs
no extra model pass and is defined for every voxel. For region outputs (the default model's WT/TC/ET sigmoids)
each region is its own yes/no question, so the map is the binary entropy of each region's probability, the
maximum over regions: a voxel unsure whether it is enhancing shows up even when it is surely tumour. With
``--tta`` the probabilities (and so the map) are the flip-averaged ones, so disagreement between flips raises it.

Both maps are written as uint8 images on the input's grid and header: value = round(255 x) for x in [0, 1]
(divide by 255). uint8 rather than float: a quarter of the size, and 1/255 is finer than these numbers mean.
No NIfTI slope is stored, because nibabel resets it when saving an in-memory uint8 array; the encoding is in the
header's description and in the report. Probabilities are one 4D file, channels last in `probability_names`
order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from neuromap.export import crop_probabilities, crop_to_input_grid, uint8_image
from neuromap.io.layout import PROBABILITIES, UNCERTAINTY

if TYPE_CHECKING:
    import nibabel as nib

    from neuromap.config import InferenceConfig
    from neuromap.preprocess import Inverse
    from neuromap.tasks import Task

SCALE = 255
ENCODING = "uint8, value = round(255 x): divide by 255 for x in [0, 1]"


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of a yes/no probability: 0 at p = 0 or 1, 1 at p = 0.5."""
    p = np.clip(np.asarray(p, dtype=np.float32), 1e-7, 1 - 1e-7)  # 0 log 0 = 0, without warnings
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def max_binary_entropy(probs: np.ndarray) -> np.ndarray:
    """The largest binary entropy over independent channels (K, ...) -> (...). The entropy is symmetric about 0.5
    and falls as p moves away from it, so the largest is that of the channel nearest 0.5: one entropy per voxel
    instead of K (the logarithms were 5 % of a `segment` run)."""
    p = np.asarray(probs, dtype=np.float32)
    return binary_entropy(0.5 - np.abs(p - 0.5).min(axis=0))


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy of a distribution over K classes (K, ...) divided by log K, so it lies in [0, 1]."""
    p = np.clip(np.asarray(probs, dtype=np.float32), 1e-7, 1.0)
    return np.clip(-(p * np.log(p)).sum(axis=0) / np.log(len(p)), 0.0, 1.0)


def requested_maps(cfg: InferenceConfig) -> tuple[str, ...]:
    """The optional map outputs an InferenceConfig asks for, as output keys (`neuromap.io.layout.Layout`)."""
    return tuple(key for key, wanted in ((UNCERTAINTY, cfg.uncertainty), (PROBABILITIES, cfg.probabilities))
                 if wanted)


def map_images(probs: np.ndarray, inverse: Inverse, task: Task, reference: nib.Nifti1Image,
               wanted: tuple[str, ...]) -> dict[str, nib.Nifti1Image]:
    """The requested maps as images on the reference's grid. Computed on the brain crop at input resolution
    (where labels are decided) and placed into the grid: outside the crop the model saw only background, so the
    maps are 0 there (certain; probability 0 of every region or tumour class)."""
    if not wanted:
        return {}
    crop = crop_probabilities(probs, inverse)
    images = {}
    if UNCERTAINTY in wanted:
        images[UNCERTAINTY] = uint8_image(_scaled(crop_to_input_grid(task.uncertainty(crop), inverse)), reference,
                                          f"NeuroMap uncertainty (entropy) x{SCALE}")
    if PROBABILITIES in wanted:
        channels = crop_to_input_grid(task.foreground_probabilities(crop), inverse)
        images[PROBABILITIES] = uint8_image(np.moveaxis(_scaled(channels), 0, -1), reference,
                                            f"NeuroMap P({','.join(task.probability_names)}) x{SCALE}")
    return images


def _scaled(values: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(values, 0.0, 1.0) * SCALE).astype(np.uint8)


def report_entries(task: Task, wanted: tuple[str, ...]) -> dict:
    """What the report says about the maps written: the measure, the channels, the encoding."""
    entries = {}
    if UNCERTAINTY in wanted:
        entries["uncertainty_map"] = {"measure": task.uncertainty_measure, "encoding": ENCODING}
    if PROBABILITIES in wanted:
        entries["probability_maps"] = {"channels": list(task.probability_names), "axis": "last (4D image)",
                                       "encoding": ENCODING}
    return entries
