"""Is what a valid file holds a usable MRI sequence? Decided here, once, for every loader of scans (NIfTI cases,
MSD files, DICOM studies), after the voxels are read and before any model runs.

A file can be perfectly valid NIfTI and still not be an MRI sequence: a constant image is segmented into a huge
"tumour", a label map passed as an image gives a plausible-looking wrong answer, values near the float32 limit
overflow the normalisation into "no tumour", and the same scan given for two sequences is accepted. The rules
were set from what the shared real scans look like (22 BraTS 2018 cases, a BraTS 2023 case, a metastasis case,
a raw clinical study: 92 sequences; `scripts/plausibility_survey.py`, `docs/experiments/plausibility.md`):

- every real sequence has 266 to 11,263 distinct values; their label maps have 4. At most ``MAX_LABEL_LEVELS``
  distinct values (constant images, masks, label maps) is refused; fewer than ``FEW_LEVELS`` is warned about.
- real intensities stay below 2e4 and are never negative. Magnitudes above ``MAX_MAGNITUDE`` are refused (the
  float32 normalisation squares deviations and sums ~10^7 of them, which overflows beyond ~5e15); more than
  ``NEGATIVE_SHARE`` negative voxels is warned about (already normalised data?).
- inside the brain the coefficient of variation is 0.14-0.60 (1.3 with skull); below ``LOW_CONTRAST`` is warned
  about. The most common value fills at most 8% of the voxels with signal (above ``SIGNAL_LEVEL`` of the 99th
  percentile); above ``DOMINANT_SHARE`` is warned about (saturated or clipped).
- two different sequences of one patient correlate at most 0.88 inside the brain. Identical voxel data, or a
  correlation of ``COPY_CORRELATION`` or more (a rescaled copy), is refused; from ``SIMILAR_CORRELATION`` it is
  warned about.
- skull-stripped scans have 13-20% nonzero voxels, scans with skull and background noise 90-97%: more than
  ``SKULL_SHARE`` is warned about, since the BraTS models were trained on skull-stripped brains.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from neuromap.errors import NeuroMapError
from neuromap.io.case import ImageRef

MAX_LABEL_LEVELS = 16
FEW_LEVELS = 64
MAX_MAGNITUDE = 1e15
NEGATIVE_SHARE = 0.01
LOW_CONTRAST = 0.05
DOMINANT_SHARE = 0.25
COPY_CORRELATION = 0.999
SIMILAR_CORRELATION = 0.95
SKULL_SHARE = 0.5
SIGNAL_LEVEL = 0.05  # share of a sequence's 99th percentile above which a voxel counts as signal, not background
SAMPLE = 200_000  # voxels per sequence the statistics are computed on (exact answers need no more)


@dataclass
class Findings:
    """What the checks found: ``problems`` refuse the case (raised together by the loader), ``warnings`` go to the
    volume's warnings and from there into the report."""

    problems: list[str]
    warnings: list[str]


def check_distinct_files(refs: Mapping[str, ImageRef]) -> None:
    """Refuse one file (or one channel of a 4D file) given for two sequences, before anything is read; links and
    different spellings of a path count as the same file. A missing file is left to the opener's message."""
    seen: dict[tuple[int, int, int | None], str] = {}
    for modality, ref in refs.items():
        if not ref.path.is_file():
            continue
        stat = ref.path.stat()
        key = (stat.st_dev, stat.st_ino, ref.channel)
        if key in seen:
            raise NeuroMapError(
                f"{ref}: given for both {seen[key]} and {modality}; each sequence needs its own scan. "
                "Fix: map every sequence to a different file (--map t1ce=FILE flair=FILE ...)."
            )
        seen[key] = modality


def check_sequence(data: np.ndarray, modality: str, source: str) -> Findings:
    """The rules one sequence can be judged by alone (raw scans, each on its own grid, are checked this way)."""
    findings = Findings([], [])
    _check_one(data, modality, source, findings)
    return findings


def check_sequences(channels: Sequence[np.ndarray], modalities: Sequence[str], sources: Sequence[str]) -> Findings:
    """Check each sequence alone, then the sequences against each other and the case's background (see the
    module doc for the rules). ``sources`` name each channel's file or series in the messages."""
    findings = Findings([], [])
    usable = [i for i, (data, mod, source) in enumerate(zip(channels, modalities, sources, strict=True))
              if _check_one(data, mod, source, findings)]
    if not usable:
        return findings
    _check_pairs([channels[i] for i in usable], [modalities[i] for i in usable], [sources[i] for i in usable],
                 findings)
    nonzero = float(np.mean(np.logical_or.reduce([channels[i] != 0 for i in usable])))
    if nonzero > SKULL_SHARE:
        findings.warnings.append(
            f"{nonzero:.0%} of the voxels are nonzero (skull-stripped scans: about 13-20%): the scans look not "
            "skull-stripped, and the BraTS models were trained on skull-stripped brains; expect false positives "
            "outside the brain."
        )
    return findings


def _check_one(data: np.ndarray, modality: str, source: str, findings: Findings) -> bool:
    """Single-sequence rules; True when the sequence is usable for the pairwise checks."""
    fix = f"Fix: check that this file is the {modality} scan."
    if not np.all(np.isfinite(data)):
        findings.problems.append(f"{source}: contains NaN or infinite values. Fix: re-export the {modality} image.")
        return False
    values = data[data != 0]
    if values.size == 0:
        findings.problems.append(f"{source}: the {modality} image is all zero (empty).")
        return False
    largest = float(np.abs(values).max())
    if largest > MAX_MAGNITUDE:
        findings.problems.append(
            f"{source}: intensities reach {largest:.3g} in magnitude, beyond {MAX_MAGNITUDE:g} (real MRI stays below "
            f"1e5; normalisation would overflow). {fix}"
        )
        return False
    sample = _sample(values)
    distinct = np.unique(sample).size
    if distinct <= MAX_LABEL_LEVELS:
        every = np.unique(values)  # the sample may miss a rare value: decide on every voxel
        if every.size <= MAX_LABEL_LEVELS:
            findings.problems.append(_few_levels(every, values.size < data.size, modality, source))
            return False
        distinct = every.size
    if distinct < FEW_LEVELS:
        findings.warnings.append(f"{source}: only {distinct} distinct intensities (real scans: hundreds to "
                                 "thousands); heavily quantised or not an MRI sequence.")
    negative = float(np.mean(sample < 0))
    if negative > NEGATIVE_SHARE:
        findings.warnings.append(f"{source}: {negative:.0%} of the nonzero voxels are negative; MRI magnitude "
                                 "images are not (already normalised? NeuroMap normalises raw intensities itself).")
    contrast = float(sample.std() / abs(sample.mean())) if sample.mean() else np.inf
    if contrast < LOW_CONTRAST:
        findings.warnings.append(f"{source}: almost no contrast (intensities vary by {contrast:.1%} of their mean; "
                                 "real brains 14-60%).")
    # Judged on signal voxels only: 8-bit slices with skull (LGG) keep their air as a few low noise values, which
    # fill a quarter of the nonzero pixels without anything being clipped.
    signal = sample[np.abs(sample) > SIGNAL_LEVEL * np.percentile(np.abs(sample), 99)]
    levels, counts = np.unique(signal, return_counts=True)
    dominant = float(counts.max() / signal.size) if signal.size else 0.0
    if dominant > DOMINANT_SHARE:
        findings.warnings.append(f"{source}: one value ({levels[counts.argmax()]:g}) fills {dominant:.0%} of the "
                                 "voxels with signal (real scans: at most 8%); saturated or clipped?")
    return True


def _few_levels(levels: np.ndarray, has_zero: bool, modality: str, source: str) -> str:
    """The message for a sequence of at most MAX_LABEL_LEVELS distinct nonzero values."""
    if levels.size == 1 and not has_zero:
        return (f"{source}: constant image (every voxel is {levels[0]:g}), not an MRI scan. "
                f"Fix: check that this file is the {modality} scan.")
    values = np.union1d(levels, [0]) if has_zero else levels
    shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if values.size > 8 else "")
    return (f"{source}: only {values.size} distinct values ({shown}): a label map or mask, not an MRI sequence "
            f"(real scans have hundreds). Fix: give the {modality} scan here, not a segmentation or mask.")


def signal_correlation(channels: Sequence[np.ndarray]) -> np.ndarray:
    """Pearson correlations between sequences on the voxels where every one has signal: above ``SIGNAL_LEVEL`` of
    its own 99th percentile. That leaves out the background, which would otherwise make any two sequences of a
    scan with skull and noise look alike (the head-versus-air contrast is shared by all of them)."""
    levels = [SIGNAL_LEVEL * np.percentile(_sample(c[c != 0]), 99) for c in channels]
    signal = np.logical_and.reduce([c > level for c, level in zip(channels, levels, strict=True)])
    step = max(1, int(np.count_nonzero(signal)) // SAMPLE)
    with np.errstate(invalid="ignore", divide="ignore"):  # a sequence constant on the sample: r is NaN, no finding
        return np.corrcoef(np.stack([c[signal][::step].astype(np.float64) for c in channels]))


def _sample(values: np.ndarray) -> np.ndarray:
    return values[:: max(1, values.size // SAMPLE)].astype(np.float64)


def _check_pairs(channels: list[np.ndarray], modalities: list[str], sources: list[str], findings: Findings) -> None:
    """Identical or linearly related sequences: one scan given twice, perhaps rescaled."""
    if len(channels) < 2:
        return
    correlation = signal_correlation(channels)
    for i, j in combinations(range(len(channels)), 2):
        pair = f"{sources[j]} ({modalities[j]}) and {sources[i]} ({modalities[i]})"
        if np.array_equal(channels[i], channels[j]):
            findings.problems.append(f"{pair} hold identical voxel data: one scan given for two sequences. "
                                     f"Fix: give the real {modalities[j]} scan.")
        elif correlation[i, j] >= COPY_CORRELATION:
            findings.problems.append(
                f"{pair} correlate at r = {correlation[i, j]:.4f}: one is a rescaled copy of the other (different "
                f"sequences of a patient: at most 0.88). Fix: give the real {modalities[j]} scan."
            )
        elif correlation[i, j] >= SIMILAR_CORRELATION:
            findings.warnings.append(
                f"{pair} are unusually similar (r = {correlation[i, j]:.3f}; different sequences of a patient: at "
                "most 0.88); check that they are different sequences."
            )
