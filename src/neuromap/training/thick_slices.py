"""Training augmentation: a sample's sequences as if acquired in thick axial slices and resampled to 1 mm
(`AugmentConfig.thick_slices`).

Why: older and clinical scans are acquired in 3-6 mm slices; BraTS-2013 cases were resampled to 1 mm from such
scans, and the raw path (`--raw`) resamples them the same way. Each 1 mm slice of such a volume is a linear blend of
two thick slices, each the mean over its thickness, so faint edema is averaged with its neighbours through-plane.
The shipped models never saw this: on two of the 22 shared cases made raw with 5 mm slices the whole-tumour Dice
fell by 0.08-0.11 with the registration right (docs/experiments/raw_registration.md). MONAI's
RandSimulateLowResolution zooms every spatial axis of what it gets, and a 2.5D sample is three slices, too few to
hold one thick slice, so the dataset crops a taller slab, this transform blurs it through-plane, and the dataset
keeps the centre slices (`neuromap.training.data.PatchDataset`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_numpy
from scipy.ndimage import uniform_filter1d


def _along_z(volume: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``volume`` (..., Z) linearly interpolated at fractional slice ``positions`` (clamped to the ends)."""
    positions = np.clip(positions, 0, volume.shape[-1] - 1)
    low = np.floor(positions).astype(int)
    high = np.minimum(low + 1, volume.shape[-1] - 1)
    weight = (positions - low).astype(volume.dtype)
    return volume[..., low] * (1 - weight) + volume[..., high] * weight


def thick_slices(volume: np.ndarray, thickness: float, phase: float) -> np.ndarray:
    """``volume`` (..., Z) at 1 mm slices, acquired in slices ``thickness`` mm thick (each the mean over its
    thickness) whose first centre lies ``phase`` mm from the first slice, then resampled linearly to 1 mm."""
    depth = volume.shape[-1]
    blurred = uniform_filter1d(volume, size=max(1, round(thickness)), axis=-1, mode="nearest")
    centres = np.arange(phase, depth, thickness)
    acquired = _along_z(blurred, centres)
    return _along_z(acquired, np.interp(np.arange(depth), centres, np.arange(len(centres)))).astype(volume.dtype)


class RandThickSlicesd(RandomizableTransform, MapTransform):
    """With probability ``prob``, ``keys`` (C, X, Y, Z) become `thick_slices` of a thickness drawn uniformly from
    ``thickness`` (mm, 1 mm slices) at a uniform phase. Labels are not touched: the truth stays at 1 mm."""

    def __init__(self, keys: str | Sequence[str], thickness: tuple[float, float], prob: float) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.thickness = thickness
        self.chosen = (1.0, 0.0)

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        if self._do_transform:
            value = float(self.R.uniform(*self.thickness))
            self.chosen = (value, float(self.R.uniform(0, value)))

    def __call__(self, data: Mapping[Hashable, np.ndarray]) -> dict[Hashable, np.ndarray]:
        out = dict(data)
        self.randomize()
        if not self._do_transform:
            return out
        for key in self.key_iterator(out):
            out[key] = thick_slices(convert_to_numpy(out[key]).astype(np.float32), *self.chosen)
        return out
