"""Training augmentation: some sequences of a sample replaced by a copy of another (`AugmentConfig.stand_in`).

Why: LGG kaggle_3m fills a sequence the scanner did not acquire with the FLAIR image (Buda et al.'s data
description), so some patients reach the model with their pre- or post-contrast channel, or both, equal to FLAIR.
A model that never saw that in training reads the copy as a real contrast and finds nothing (out of fold, the shared
patient whose three channels are one FLAIR scored Dice 0.02). MONAI has channel dropout-like transforms
(RandCoarseDropout drops boxes, not whole channels) but nothing that copies one channel over others, so this is
written here.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from itertools import combinations

import numpy as np
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_numpy


class RandStandInd(RandomizableTransform, MapTransform):
    """With probability ``prob``, a uniformly chosen non-empty set of the other sequences is overwritten by
    ``source``. ``channels`` names each channel's sequence in order (a 2.5D sample has each sequence's neighbouring
    slices as consecutive channels, so slice j of a sequence is replaced by slice j of the source)."""

    def __init__(self, keys: str | Sequence[str], channels: Sequence[str], source: str, prob: float) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        if source not in channels:
            raise ValueError(f"stand-in source {source!r} is not among the channels {list(dict.fromkeys(channels))}")
        groups = {name: [i for i, n in enumerate(channels) if n == name] for name in dict.fromkeys(channels)}
        self.source = groups.pop(source)
        self.choices = [sum(chosen, []) for size in range(1, len(groups) + 1)
                        for chosen in combinations(groups.values(), size)]
        self.targets: list[int] = []

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        if self._do_transform and self.choices:
            self.targets = self.choices[int(self.R.randint(len(self.choices)))]

    def __call__(self, data: Mapping[Hashable, np.ndarray]) -> dict[Hashable, np.ndarray]:
        out = dict(data)
        self.randomize()
        if not self._do_transform or not self.choices:
            return out
        for key in self.key_iterator(out):
            image = convert_to_numpy(out[key]).copy()
            for position, target in enumerate(self.targets):
                image[target] = image[self.source[position % len(self.source)]]
            out[key] = image
        return out
