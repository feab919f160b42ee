"""How far to trust one segmentation: ``report["quality"] = {"score", "flag", "reasons", ...}``.

The model is excellent on some unseen patients and fails on others, and its labels alone do not tell which. This
stage measures, per case, signals that can tell, and turns them into an estimate of the case's mean region Dice:

- ``flip_dice``: the model is run once more on the left-right mirrored scan (it was trained with flips, so it
  should give the mirrored answer) and the two label maps are compared, Dice per region, averaged. A model that
  changes its mind when the brain is mirrored is guessing. Slice models on scans of known voxel size run the
  mirrored pass on a sample of axial slices only (`neuromap.inference.agreement_sample`: every other slice near
  the tumour, the coarse pass's slices elsewhere) and the Dice is taken there, each slice weighted by the slices
  it stands for.
- ``tumour_entropy``: the mean voxel uncertainty (`neuromap.uncertainty`) inside the predicted tumour.
- ``core_fraction`` (tumour core / whole tumour volume) and ``core_largest_share`` (share of the core in its
  largest 26-connected piece): a tiny or fragmented core is how region models fail on unusual tumours.
- input checks against the scans the model was trained on, from an intensity profile (z-scored intensity
  quantiles inside the brain per sequence and the correlations between sequences): ``swap_margin`` (how much
  better the profile fits the training sequences with the files renamed: swapped or mislabelled sequences) and
  ``intensity_distance`` (root-mean-square z against the training cases': another protocol or preparation);
  voxel size, brain extent (field of view) and a tumour that reaches the edge of the scanned volume.

The score is a small monotone model of a few signals, fitted on out-of-fold predictions of cross-validation by
``scripts/fit_quality.py`` and shipped as ``weights/quality_<model>.json`` (coefficients, the training cases'
reference statistics, the thresholds and the leave-one-out validation); the measured numbers are in
``docs/experiments/quality_score.md``. The flag says "review" when the score is below the calibration's threshold
(declared, not fitted) or an input check fails. A model whose recipe has no calibration file gets no score and is
always flagged for review: an estimate that was never checked against true Dice is not given.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from scipy import ndimage

from neuromap.labels import REGIONS, region_masks

if TYPE_CHECKING:
    from neuromap.checkpoint import ModelSpec
    from neuromap.inference import SliceSample
    from neuromap.io import Volume
    from neuromap.preprocess import Prepared
    from neuromap.tasks import Task

WEIGHTS_DIR = Path(__file__).parent / "weights"
CALIBRATION_PREFIX = "quality_"
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
LEFT_RIGHT = 1  # the RAS x axis of a prepared (C, X, Y, Z) image
ESTIMATE = "mean Dice of the regions WT, TC, ET (BraTS), or of the abnormality (binary)"


class Predictor(Protocol):
    """One pass of the case's model(s), no TTA: prepared image -> probabilities, of the axial ``slices`` only
    when given (`neuromap.inference.predict_probs`)."""

    def __call__(self, image: np.ndarray, slices: np.ndarray | None = None) -> np.ndarray: ...


def recipe_key(spec: ModelSpec) -> str:
    """What makes predictions comparable: architecture, options, preprocessing, task and outputs, not the weights
    or the training cases. Fold models of a cross-validation and the model trained on all cases share it, so a
    calibration fitted on the folds' out-of-fold predictions applies to the shipped model of the same recipe."""
    recipe = {k: v for k, v in spec.to_dict().items() if k != "info"}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Calibration:
    """A fitted quality model (``weights/quality_<model>.json``, see ``scripts/fit_quality.py``)."""

    path: Path
    data: dict

    def score(self, signals: dict[str, float | None]) -> float | None:
        """The estimated mean region Dice in [0, 1]; None when a signal it needs is missing (no tumour found)."""
        model = self.data["model"]
        values = [signals.get(name) for name in model["features"]]
        if any(v is None for v in values):
            return None
        linear = model["intercept"] + sum(c * v for c, v in zip(model["coef"], values, strict=True))
        return float(np.clip(linear, 0.0, 1.0))

    @property
    def flag_below(self) -> float:
        return float(self.data["flag_below"])

    @property
    def reference(self) -> dict:
        return self.data["reference"]

    def summary(self) -> dict:
        """What the report says about where the score comes from."""
        validation = self.data["validation"]
        return {"file": self.path.name, "fitted_on": self.data["fitted_on"], "n": validation["n"],
                "loo_spearman": validation["loo_spearman"], "details": self.data["docs"]}


@cache
def _calibrations() -> dict[str, Calibration]:
    found = {}
    for path in sorted(WEIGHTS_DIR.glob(f"{CALIBRATION_PREFIX}*.json")):
        data = json.loads(path.read_text())
        found[data["recipe"]] = Calibration(path, data)
    return found


def calibration_for(spec: ModelSpec) -> Calibration | None:
    return _calibrations().get(recipe_key(spec))


# ------------------------------------------------------------------------------------------------- signals


def intensity_profile(image: np.ndarray, modalities: list[str]) -> dict[str, float]:
    """Scale-free description of the intensities inside the brain of a prepared (z-scored) image (C, X, Y, Z):
    quantiles per sequence and the correlation of each pair of sequences. z-scoring removes each scanner's gain
    and offset; what remains is contrast, which is what a swapped or unfamiliar sequence changes."""
    brain = np.any(image != 0, axis=0)  # z-scoring sets everything outside the brain mask to exactly 0
    values = image[:, brain][:, ::4]  # every 4th voxel: the quantiles move by < 0.01, 4x less sorting
    profile = {}
    for name, channel in zip(modalities, values, strict=True):
        profile.update({f"{name}_q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, np.quantile(
            channel, QUANTILES), strict=True)})
    correlations = np.corrcoef(values)
    for i, a in enumerate(modalities):
        for j in range(i + 1, len(modalities)):
            profile[f"corr_{a}_{modalities[j]}"] = float(correlations[i, j])
    return profile


def _squared_z(profile: dict[str, float], reference: dict[str, dict[str, float]]) -> np.ndarray:
    """The profile's squared z-scores against the training cases' mean and std, over the features both have (a
    model on fewer sequences is compared on its own)."""
    shared = [k for k in profile if k in reference["mean"]]
    return np.array([((profile[k] - reference["mean"][k]) / max(reference["std"][k], 1e-6)) ** 2 for k in shared])


def intensity_distance(profile: dict[str, float], reference: dict[str, dict[str, float]]) -> float:
    """Root mean square z-score of the profile against the training cases'."""
    return float(np.sqrt(np.mean(_squared_z(profile, reference))))


def renamed(profile: dict[str, float], naming: dict[str, str], modalities: list[str]) -> dict[str, float]:
    """The profile as it would read if the file given as sequence ``m`` were named ``naming[m]``: quantiles and
    correlations belong to the files, so renaming the files renames the keys."""
    out = {}
    for key, value in profile.items():
        if key.startswith("corr_"):
            first, second = sorted((naming[m] for m in key.split("_")[1:]), key=modalities.index)
            out[f"corr_{first}_{second}"] = value
        else:
            name, quantile = key.split("_")
            out[f"{naming[name]}_{quantile}"] = value
    return out


def best_renaming(profile: dict[str, float], reference: dict[str, dict[str, float]],
                  modalities: list[str]) -> tuple[float, dict[str, str]]:
    """Do the files look swapped? Every other assignment of the files to the sequence names is tried; returns how
    much better (summed squared z; > 0 is better) the best one fits the training sequences than the names given,
    and the files it renames. One distance over all sequences barely moves when two are exchanged (T1 and T1ce
    look alike after z-scoring); comparing namings of the same case does."""
    given = float(_squared_z(profile, reference).sum())
    best, naming = -np.inf, {}
    for order in itertools.permutations(modalities):
        candidate = dict(zip(modalities, order, strict=True))
        if order == tuple(modalities):
            continue
        gain = given - float(_squared_z(renamed(profile, candidate, modalities), reference).sum())
        if gain > best:
            best, naming = gain, {m: n for m, n in candidate.items() if m != n}
    return best, naming


def _dice(a: np.ndarray, b: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Dice of two masks; with ``weight``, (…, Z) masks whose axial slices count ``weight`` times each."""
    def count(mask: np.ndarray) -> float:
        return float(mask.sum()) if weight is None else float(mask.reshape(-1, mask.shape[-1]).sum(0) @ weight)

    total = count(a) + count(b)
    return 1.0 if total == 0 else 2.0 * count(a & b) / total


def flip_dice(labels: np.ndarray, flipped_labels: np.ndarray, task: Task,
              sample: SliceSample | None = None) -> dict[str, float]:
    """Dice between two label maps per region of the task (an empty pair agrees fully); on the ``sample``'s
    axial slices only, each weighted by the slices it stands for, when given."""
    if sample is not None:
        labels, flipped_labels = labels[..., sample.index], flipped_labels[..., sample.index]
    a, b = region_masks(labels), region_masks(flipped_labels)
    weight = None if sample is None else sample.weight
    return {r: _dice(a[r], b[r], weight) for r in task.validation_regions}


def core_signals(internal: np.ndarray) -> dict[str, float]:
    """Tumour core volume as a share of the whole tumour, and the share of the core in its largest piece
    (1 when there is no core: nothing is fragmented)."""
    masks = region_masks(internal)
    wt, tc = int(masks["WT"].sum()), masks["TC"]
    pieces, n = ndimage.label(tc, structure=np.ones((3, 3, 3)))
    largest = int(np.bincount(pieces.ravel())[1:].max()) if n else 0
    return {"core_fraction": float(tc.sum() / wt) if wt else 0.0,
            "core_largest_share": largest / int(tc.sum()) if n else 1.0}


def measure(prepared: Prepared, probs: np.ndarray, flipped: np.ndarray, internal: np.ndarray, volume: Volume,
            task: Task, modalities: list[str], sample: SliceSample | None = None) -> dict:
    """Every signal of one case. ``probs`` and ``flipped`` are one model pass on the prepared image and on its
    mirror (mirrored back), (K, X, Y, Z), the mirrored one run on the ``sample``'s slices when given;
    ``internal`` the final labels in the input grid."""
    labels = task.labels(probs)
    tumour = labels > 0
    uncertainty = task.uncertainty(probs)
    inverse = prepared.inverse
    agreement = flip_dice(labels, task.labels(flipped), task, sample)
    signals: dict = {
        "flip_dice": float(np.mean(list(agreement.values()))),
        "flip_dice_regions": agreement,
        "tumour_entropy": float(uncertainty[tumour].mean()) if tumour.any() else None,
        # voxels the model is unsure about (p between ~0.11 and ~0.89) anywhere, per predicted tumour voxel: also
        # counts doubt outside the mask, where an under-segmenting model leaves the tumour it missed
        "uncertain_ratio": float((uncertainty > 0.5).sum() / tumour.sum()) if tumour.any() else None,
        "tumour_voxels": int(internal.astype(bool).sum()),
        "tumour_ml": float(internal.astype(bool).sum() * volume.voxel_ml) if volume.spacing_known else None,
        "intensity_profile": intensity_profile(prepared.image, modalities),
        "spacing_mm": list(volume.spacing) if volume.spacing_known else None,
        "brain_extent_mm": [round((b - a) * s, 1) for (a, b), s in zip(inverse.bbox, inverse.ras_spacing,
                                                                       strict=True)],
        "touches_edge": bool(_on_faces(internal > 0)),
    }
    if set(REGIONS) <= set(task.validation_regions):
        signals.update(core_signals(internal))
    return signals


def _on_faces(mask: np.ndarray) -> bool:
    return any(np.take(mask, i, axis=a).any() for a in range(mask.ndim) for i in (0, -1))


# ------------------------------------------------------------------------------------------------- verdict


def input_checks(signals: dict, reference: dict) -> list[str]:
    """Reasons the input is unlike the training scans (voxel size, field of view, intensities), or the tumour may
    continue outside the scan."""
    reasons = []
    if signals["swap_margin"] > reference["swap_margin_max"]:
        renaming = ", ".join(f"the {given} file as {other}" for given, other in signals["looks_like"].items())
        reasons.append(f"the sequences look swapped: the intensities fit the training scans much better reading "
                       f"{renaming} (by {signals['swap_margin']:.0f}; the check fires above "
                       f"{reference['swap_margin_max']:g}). Fix: check which file is which (--map)")
    distance = signals["intensity_distance"]
    if distance > reference["intensity_distance_max"]:
        reasons.append(f"intensities inside the brain are unlike the training scans (distance {distance:.1f}; the "
                       f"check fires above {reference['intensity_distance_max']:.1f}): another protocol or "
                       "preparation, or a wrong sequence")
    allowed, spacing = reference["spacing_mm_allowed"], signals.get("spacing_mm")
    low, high = allowed or (0.0, np.inf)  # None: the training scans stored no voxel size (LGG slice folders)
    if spacing is not None and not all(low <= s <= high for s in spacing):
        reasons.append(f"voxel size {' x '.join(f'{s:.2g}' for s in spacing)} mm is outside {low:g}-{high:g} mm, "
                       "the range around the training scans' voxel sizes")
    short = [f"{axis} {e:.0f} mm (the check wants >= {m:.0f})" for axis, e, m in
             zip("RAS", signals["brain_extent_mm"], reference["brain_extent_min_mm"], strict=True) if e < m]
    if short:
        reasons.append(f"the brain covers less of the scan than in training ({', '.join(short)}): partial field of "
                       "view or a failed brain mask")
    if signals["touches_edge"]:
        reasons.append("the predicted tumour reaches the edge of the scanned volume: it may continue outside it")
    return reasons


def review_reasons(signals: dict, score: float | None, reference: dict, flag_below: float) -> list[str]:
    """Why a case needs review (empty: it does not): no tumour, a low score, or a failed input check."""
    reasons = input_checks(signals, reference)
    if signals["tumour_voxels"] == 0:
        reasons.insert(0, "no tumour found: check the input (a tumour model has nothing to say about healthy scans)")
    elif score is not None and score < flag_below:
        reasons.insert(0, f"estimated Dice {score:.2f} is below {flag_below:.2f}: the model is unsure "
                          f"(mirrored-scan agreement {signals['flip_dice']:.2f})")
    return reasons


def assess(prepared: Prepared, probs: np.ndarray, predict: Predictor, tta: bool, internal: np.ndarray,
           volume: Volume, spec: ModelSpec, task: Task,
           sample_for: Callable[[np.ndarray], SliceSample | None] = lambda tumour: None) -> dict:
    """``report["quality"]`` of one case. ``probs`` are the case's probabilities, ``predict`` runs one pass of
    the same model(s) without TTA; with ``tta`` the unmirrored pass is run again, because the signals were fitted
    on single passes and the TTA average already contains the mirrored one. ``sample_for`` gives, from which
    axial slices hold tumour, the slices the mirrored pass runs (None: all; `neuromap.inference.agreement_sample`).
    """
    image = prepared.image
    single = predict(image) if tta else probs
    sample = sample_for(task.labels(single).reshape(-1, image.shape[-1]).any(0))
    mirrored = np.ascontiguousarray(np.flip(image, LEFT_RIGHT))
    flipped = np.flip(predict(mirrored, slices=None if sample is None else sample.index), LEFT_RIGHT)
    signals = measure(prepared, single, flipped, internal, volume, task, spec.modalities, sample)
    profile = signals.pop("intensity_profile")
    calibration = calibration_for(spec)
    if calibration is None:
        return {"score": None, "flag": "review", "estimate_of": ESTIMATE, "signals": _rounded(signals),
                "reasons": ["no quality estimate: this model's recipe was never calibrated against true Dice "
                            "(only recipes with a weights/quality_*.json are); check the result"]}
    intensity = calibration.reference["intensity"]
    signals["intensity_distance"] = intensity_distance(profile, intensity)
    signals["swap_margin"], renaming = best_renaming(profile, intensity, spec.modalities)
    # Named only when the swap check fires: the best other naming of a normal case is noise, not a suspicion.
    signals["looks_like"] = renaming if signals["swap_margin"] > calibration.reference["swap_margin_max"] else {}
    score = calibration.score(signals)
    reasons = review_reasons(signals, score, calibration.reference, calibration.flag_below)
    return {"score": None if score is None else round(score, 3), "flag": "review" if reasons else "ok",
            "reasons": reasons, "estimate_of": ESTIMATE, "signals": _rounded(signals),
            "calibration": calibration.summary()}


def _rounded(signals: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else _rounded(v) if isinstance(v, dict) else v
            for k, v in signals.items()}


def quality_text(quality: dict) -> str:
    """'quality 0.83 ok' or 'quality 0.41 REVIEW' for summary lines and picture titles."""
    score = "n/a" if quality["score"] is None else f"{quality['score']:.2f}"
    return f"quality {score} {'ok' if quality['flag'] == 'ok' else 'REVIEW'}"
