"""Label conventions and tumour regions, in one table.

Internally every segmentation is 0 background, 1 NCR/NET, 2 ED, 3 ET. Each public convention maps onto that
scheme; the inverse is used on output. BraTS 2012-2016 and MSD are many-to-one or permuted, so only
``brats`` (1, 2, 4), ``brats2023``/``internal`` (1, 2, 3) and ``msd`` can be written back.
"""

from __future__ import annotations

import numpy as np

from neuromap.errors import NeuroMapError

BACKGROUND, NCR, ED, ET = 0, 1, 2, 3
CLASS_NAMES: dict[int, str] = {NCR: "NCR/NET", ED: "ED", ET: "ET"}
CLASS_KEYS: dict[int, str] = {NCR: "NCR", ED: "ED", ET: "ET"}
# Regions as nnU-Net and the BraTS challenge define them: sets of internal labels.
REGIONS: dict[str, tuple[int, ...]] = {"WT": (NCR, ED, ET), "TC": (NCR, ET), "ET": (ET,)}
# Training only: tumour whose class is unknown (slices labelled with the whole tumour alone, e.g. LGG kaggle_3m masks
# mixed into BraTS training by `neuromap.training.auxiliary`); it counts for WT and the loss ignores TC and ET there.
UNKNOWN_TUMOUR = 255

# convention name -> {label in that convention: internal label}
CONVENTIONS: dict[str, dict[int, int]] = {
    "internal": {0: 0, 1: NCR, 2: ED, 3: ET},
    "brats2023": {0: 0, 1: NCR, 2: ED, 3: ET},
    "brats": {0: 0, 1: NCR, 2: ED, 4: ET},  # BraTS 2017-2021
    "brats2012": {0: 0, 1: NCR, 2: ED, 3: NCR, 4: ET},  # 3 = non-enhancing core, merged into NCR/NET
    "msd": {0: 0, 1: ED, 2: NCR, 3: ET},  # MSD Task01: 1 edema, 2 non-enhancing, 3 enhancing
    "binary": {0: 0, 1: 1},  # LGG kaggle_3m: FLAIR abnormality
}
# Conventions that can be written back one-to-one.
WRITABLE = ("brats", "brats2023", "internal", "msd", "binary")


def _lookup(mapping: dict[int, int]) -> np.ndarray:
    table = np.full(max(mapping) + 1, 255, dtype=np.uint8)
    for src, dst in mapping.items():
        table[src] = dst
    return table


def as_integral(arr: np.ndarray, source: str = "segmentation") -> np.ndarray:
    """Accept float/int label arrays whose values are whole numbers; refuse anything else."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise NeuroMapError(f"{source}: label map contains NaN/inf. Fix: save the segmentation as integers.")
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise NeuroMapError(
                f"{source}: label map has non-integral values (e.g. {arr[rounded != arr].flat[0]:g}); "
                "it looks like a probability map or was resampled with interpolation. "
                "Fix: provide a hard label map (nearest-neighbour resampling)."
            )
        arr = rounded.astype(np.int32)
    elif arr.dtype.kind not in "iub":
        raise NeuroMapError(f"{source}: label map has dtype {arr.dtype}; expected integers.")
    return arr


def to_internal(arr: np.ndarray, convention: str, source: str = "segmentation") -> np.ndarray:
    """Convert a label map in ``convention`` to internal labels (uint8); unknown labels are an error."""
    mapping = _convention(convention)
    arr = as_integral(arr, source)
    values = np.unique(arr)
    unknown = [int(v) for v in values if int(v) not in mapping]
    if unknown:
        raise NeuroMapError(
            f"{source}: labels {unknown} are not part of the '{convention}' convention "
            f"(allowed: {sorted(mapping)}). Fix: pass the right --labels convention or correct the file."
        )
    return _lookup(mapping)[arr.astype(np.int64)]


def from_internal(arr: np.ndarray, convention: str) -> np.ndarray:
    """Convert internal labels to ``convention`` for output (uint8)."""
    if convention not in WRITABLE:
        raise NeuroMapError(f"labels cannot be written as '{convention}'; choose one of {list(WRITABLE)}.")
    inverse = {dst: src for src, dst in _convention(convention).items()}
    return _lookup(inverse)[np.asarray(arr, dtype=np.int64)]


def guess_convention(values: np.ndarray | list[int]) -> str:
    """Pick the convention from the label values present: 4 without 3 is BraTS 2017-21, 3 and 4 is 2012-16.

    MSD cannot be told apart from BraTS 2023 by values alone; callers that know the layout pass it explicitly.
    """
    present = {int(v) for v in np.asarray(values).ravel()}
    if 4 in present:
        return "brats2012" if 3 in present else "brats"
    return "brats2023"


def region_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean WT/TC/ET masks from an internal label map."""
    return {name: np.isin(labels, members) for name, members in REGIONS.items()}


def _convention(name: str) -> dict[int, int]:
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise NeuroMapError(f"unknown label convention '{name}'; known: {sorted(CONVENTIONS)}.") from None
