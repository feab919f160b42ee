"""Lesion-wise evaluation as the BraTS challenges score it: lesions, matching, per-lesion scores, case scores.

Why: a region's voxel Dice is dominated by its largest lesion, so a model that misses three small lesions next to
a big one still scores ~0.95. Since 2023 BraTS ranks lesion by lesion instead. Two published rule sets give
different numbers for the same case, so every output names the one used. Stages: `lesions` (connected
components), a rule set's scorer (matching + per-lesion Dice/HD95 + case score), `case_rows`, `summarise`.

``brats-eval`` (default) reproduces the organisers' current package ``brats-evaluation`` (PyPI, 0.0.10 read) with
its glioma configuration ``brats_evaluation/configs/config_gli.yaml``, which runs ``panoptica`` (2.1.7 read):

- lesions: 26-connected components of each region mask, no dilation, no size limit
  (``ConnectedComponentsInstanceApproximator`` -> ``panoptica._functionals._connected_components``, cc3d default);
- matching: one-to-one, maximising the summed Dice of pairs whose Dice >= 1e-6, i.e. that overlap at all
  (config_gli.yaml ``MaxBipartiteMatching {matching_metric: DSC, matching_threshold: 0.000001}``;
  ``panoptica.instance_matcher.MaxBipartiteMatching._create_cost_matrix``: cost 1 - Dice, otherwise 1 + 1e-6,
  scipy ``linear_sum_assignment``, a pair is matched when its cost < 1);
- per matched pair: Dice and HD95 of the expert lesion against its matched predicted lesion only
  (``panoptica.instance_evaluator._evaluate_instance``); HD95 pools both directions' surface distances
  (``panoptica.metrics._surface_distances._hd95_from_pair``, `neuromap.metrics.hd95_mm` "panoptica"), spacing
  from the NIfTI header;
- case score: mean Dice and mean HD95 over matched lesions (``Evaluation_List_Metric.AVG`` = ``sq_dsc`` /
  ``sq_hd95``, the ``lesionwise_*_mean`` of ``brats_evaluation.metrics_parser.parse_seg_results``). Missed and
  extra lesions do not lower it; they are counted (fn = expert - matched, fp = predicted - matched,
  ``panoptica.panoptica_result.fn/fp``);
- no matched lesion (config_gli.yaml ``edge_case_handler``, ``MetricZeroTPEdgeCaseHandling``): Dice 0 and HD95 inf
  when either side has a lesion; undefined (NaN) when neither has. The package keeps inf in the lesion-wise HD95
  (its parser turns only the global HD95 into 373), and pandas' mean over cases skips NaN;
- regions wt = labels {1,2,3}, tc = {1,3}, et = {3} (BraTS 2023 labels). NeuroMap reads every convention into
  its internal labels first; the package itself reads label 4 of BraTS 2017-21 files as resection cavity, so
  convert such files to BraTS 2023 labels before comparing with it.

``brats2023`` reproduces the 2023 challenge's original code, ``rachitsaluja/BraTS-2023-Metrics``
``brats_2023_metrics/surface_distance/brats_metrics.py`` (same logic in its ``eval.py``), BraTS-GLI parameters
(``get_challenge_parameters``: dilation factor 3, volume threshold 50):

- expert lesions: 26-connected components of the expert mask dilated 3 times with scipy's
  ``generate_binary_structure(3, 2)`` (the 18-connected 3x3x3 element); each lesion is the expert voxels of one
  dilated component, so lesions closer than the dilation merge (``get_gt_seg_combined_by_dilation``);
- a predicted 26-connected component belongs to every expert lesion whose own dilation (same element and
  iterations) it touches, even without overlap (one-to-many allowed); it is extra if it belongs to none
  (``get_lesion_wise_score``);
- per expert lesion: Dice against the union of its predicted components; HD95 = DeepMind surface-distance
  ``compute_robust_hausdorff(compute_surface_distances(gt, pred, spacing), 95)`` (`hd95_mm` "deepmind"); a missed
  lesion scores Dice 0 and HD95 374 (inf replaced by 374);
- lesions of volume <= 50 mm^3 (voxels x voxel volume: 50 voxels at BraTS' 1 mm) are left out of the score and
  of the matched/missed counts; predicted components touching them are not extra; extra components of any
  size count (``get_lesion_wise_results``);
- case score: Dice = sum(Dice of kept lesions) / (kept + extra); HD95 = (sum(HD95 of kept) + 374 x extra) /
  (kept + extra); when both are 0 (0/0) Dice 1 and HD95 0.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from neuromap.errors import NeuroMapError
from neuromap.labels import REGIONS
from neuromap.metrics import hd95_mm
from neuromap.tasks import get_task

RULE_SETS = ("brats-eval", "brats2023")
DEFAULT_RULES = "brats-eval"
OUTPUT_NAME = "lesion_metrics.csv"
# brats-eval (panoptica MaxBipartiteMatching): pairs below this Dice are not matchable; others cost 1 + 1e-6.
MATCH_MIN_DICE = 1e-6
NO_MATCH_COST = 1.0 + 1e-6
# brats2023 (BraTS-GLI): dilation element and iterations, volume threshold, penalty of a missed/extra lesion.
DILATION_ELEMENT = ndimage.generate_binary_structure(3, 2)
DILATION_ITERATIONS = 3
MAX_IGNORED_MM3 = 50.0
PENALTY_HD95_MM = 374.0
RULE_TITLES = {"brats-eval": "BraTS organisers' brats-evaluation package (panoptica, glioma config)",
               "brats2023": "BraTS 2023 challenge rules (BraTS-2023-Metrics, BraTS-GLI)"}
RULE_TEXT = {
    "brats-eval": (
        "BraTS organisers' brats-evaluation package (panoptica, glioma config): lesions = 26-connected "
        "components; one-to-one matching maximising Dice over overlapping pairs; lesion-wise Dice/HD95 = mean over "
        "matched lesions (missed and extra lesions are counted, not scored); no match: Dice 0 and HD95 inf, or "
        "undefined when neither side has a lesion; HD95 = 95th percentile of both directions' surface distances "
        "pooled."
    ),
    "brats2023": (
        "BraTS 2023 challenge rules (BraTS-2023-Metrics, BraTS-GLI): expert lesions merged by 3 dilations with the "
        "18-connected 3x3x3 element; predicted components touching a dilated expert lesion belong to it; expert "
        "lesions <= 50 mm^3 ignored; missed and extra lesions score Dice 0 and HD95 374 mm; score = sum over "
        "lesions / (expert lesions + extra); nothing to score: Dice 1, HD95 0; HD95 = DeepMind robust Hausdorff."
    ),
}
COLUMNS = ("case_id", "region", "rules", "lesion_dice", "lesion_hd95", "gt_lesions", "pred_lesions", "matched",
           "missed", "extra", "ignored_small")
COUNTS = ("matched", "missed", "extra", "ignored_small")


@dataclass
class RegionScore:
    """One region of one case. ``lesion_hd95`` is None when HD95 was not asked for; NaN = undefined."""

    lesion_dice: float
    lesion_hd95: float | None
    gt_lesions: int
    pred_lesions: int
    matched: int
    missed: int
    extra: int
    ignored_small: int = 0


def check_request(lesion_wise: bool, rules: str | None, task: str) -> str | None:
    """The rule set to use, or None for no lesion-wise evaluation; a mistaken request is a NeuroMapError."""
    if not lesion_wise:
        if rules is not None:
            raise NeuroMapError(f"lesion rules '{rules}' given without lesion-wise evaluation. "
                                "Fix: add --lesion-wise (lesion_wise=True).")
        return None
    rules = rules or DEFAULT_RULES
    if rules not in RULE_SETS:
        raise NeuroMapError(f"unknown lesion rules '{rules}'. Fix: use one of {', '.join(RULE_SETS)}.")
    if not get_task(task).scores_lesions:
        raise NeuroMapError("lesion-wise evaluation scores the BraTS regions WT/TC/ET. Fix: use it with --task brats.")
    return rules


def lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the connected components of ``mask`` with full connectivity (26 in 3D, cc3d's default, which both
    official codes use); labels 1..n, 0 = background."""
    labelled, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    return labelled, int(count)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _pair_dice(gt_cc: np.ndarray, n_gt: int, pred_cc: np.ndarray, n_pred: int) -> np.ndarray:
    """(n_gt, n_pred) Dice of every expert/predicted lesion pair, from one pass over the voxels both cover."""
    both = (gt_cc > 0) & (pred_cc > 0)
    codes, shared = np.unique(gt_cc[both].astype(np.int64) * (n_pred + 1) + pred_cc[both], return_counts=True)
    g, p = codes // (n_pred + 1), codes % (n_pred + 1)
    gt_size = np.bincount(gt_cc.ravel(), minlength=n_gt + 1)
    pred_size = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)
    dice = np.zeros((n_gt, n_pred))
    dice[g - 1, p - 1] = 2.0 * shared / (gt_size[g] + pred_size[p])
    return dice


def score_brats_eval(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], hd95: bool = True) -> RegionScore:
    """One region under ``brats-eval`` (module docstring): one-to-one matching, mean over matched lesions."""
    gt_cc, n_gt = lesions(gt)
    pred_cc, n_pred = lesions(pred)
    pairs: list[tuple[int, int, float]] = []
    if n_gt and n_pred:
        dice = _pair_dice(gt_cc, n_gt, pred_cc, n_pred)
        cost = np.where(dice >= MATCH_MIN_DICE, 1.0 - dice, NO_MATCH_COST)
        rows, cols = linear_sum_assignment(cost)
        pairs = [(int(r) + 1, int(c) + 1, float(dice[r, c])) for r, c in zip(rows, cols, strict=True) if cost[r, c] < 1]
    if pairs:
        lesion_dice = float(np.mean([d for _, _, d in pairs]))
        distances = [hd95_mm(pred_cc == p, gt_cc == g, spacing, "panoptica") for g, p, _ in pairs] if hd95 else []
        lesion_hd95 = float(np.mean(distances)) if hd95 else None
    else:  # panoptica's zero-TP edge cases in config_gli.yaml
        undefined = n_gt == 0 and n_pred == 0
        lesion_dice = math.nan if undefined else 0.0
        lesion_hd95 = (math.nan if undefined else math.inf) if hd95 else None
    matched = len(pairs)
    return RegionScore(lesion_dice, lesion_hd95, n_gt, n_pred, matched, n_gt - matched, n_pred - matched)


def _window(box: tuple[slice, ...], shape: Sequence[int], margin: int) -> tuple[slice, ...]:
    """``box`` grown by ``margin`` voxels, clipped to the image: the dilation of a lesion never leaves it."""
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape, strict=True))


def score_brats2023(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], hd95: bool = True) -> RegionScore:
    """One region under ``brats2023`` (module docstring): dilation-merged expert lesions, small ones ignored,
    missed and extra lesions penalised. Each lesion's dilation is computed in its own window (exact: 3
    iterations of a 3x3x3 element reach 3 voxels), not over the whole image as the original does."""
    pred_cc, n_pred = lesions(pred)
    grouped, n_gt = lesions(ndimage.binary_dilation(gt, DILATION_ELEMENT, DILATION_ITERATIONS))
    grouped[~gt] = 0  # expert voxels labelled by their dilated component
    voxel_mm3 = float(np.prod(spacing))
    belongs = np.zeros(n_pred + 1, dtype=bool)
    kept_dice: list[float] = []
    kept_hd95: list[float] = []
    missed = ignored = 0
    for label, box in enumerate(ndimage.find_objects(grouped), start=1):
        if box is None:
            continue
        window = _window(box, gt.shape, DILATION_ITERATIONS)
        lesion_in_window = grouped[window] == label
        reach = ndimage.binary_dilation(lesion_in_window, DILATION_ELEMENT, DILATION_ITERATIONS)
        hits = np.unique(pred_cc[window][reach])
        hits = hits[hits > 0]
        belongs[hits] = True
        if np.count_nonzero(lesion_in_window) * voxel_mm3 <= MAX_IGNORED_MM3:
            ignored += 1
            continue
        lesion, found = grouped == label, np.isin(pred_cc, hits)
        missed += int(hits.size == 0)
        kept_dice.append(_dice(lesion, found))
        if hd95:
            kept_hd95.append(hd95_mm(found, lesion, spacing, "deepmind") if hits.size else PENALTY_HD95_MM)
    extra = n_pred - int(np.count_nonzero(belongs[1:]))
    scored = len(kept_dice) + extra
    lesion_dice = sum(kept_dice) / scored if scored else 1.0
    lesion_hd95 = ((sum(kept_hd95) + PENALTY_HD95_MM * extra) / scored if scored else 0.0) if hd95 else None
    return RegionScore(lesion_dice, lesion_hd95, n_gt, n_pred, len(kept_dice) - missed, missed, extra, ignored)


SCORERS: dict[str, Callable[..., RegionScore]] = {"brats-eval": score_brats_eval, "brats2023": score_brats2023}


def case_rows(
    case_id: str, pred_labels: np.ndarray, gt_labels: np.ndarray, spacing: Sequence[float], rules: str,
    hd95: bool = True,
) -> list[dict]:
    """One row per region (WT, TC, ET) of a case, from two internal label maps on the same grid.

    Everything is computed inside the bounding box of both tumours grown by the dilation reach, ~15x fewer
    voxels on a BraTS case and the same result: components, dilations and distances never cross empty space
    that far, and the crop ends at the image edge where the tumour touches it."""
    if gt_labels.ndim != 3:
        raise NeuroMapError(f"case '{case_id}': lesion-wise evaluation needs 3D label maps, got {gt_labels.ndim}D.")
    tumour = ndimage.find_objects(((pred_labels > 0) | (gt_labels > 0)).astype(np.uint8))
    if tumour:
        window = _window(tumour[0], gt_labels.shape, DILATION_ITERATIONS)
        pred_labels, gt_labels = pred_labels[window], gt_labels[window]
    score = SCORERS[rules]
    return [
        {"case_id": case_id, "region": region, "rules": rules,
         **asdict(score(np.isin(pred_labels, members), np.isin(gt_labels, members), spacing, hd95))}
        for region, members in REGIONS.items()
    ]


def _stats(values: list[float | None]) -> dict:
    """mean/std (ddof=1)/median/n over the finite values; undefined (NaN) and infinite ones are counted apart
    because a single inf would make the mean inf and NaN has no place in JSON."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    has = finite.size > 0
    return {
        "mean": float(finite.mean()) if has else None,
        "std": float(finite.std(ddof=1)) if finite.size > 1 else (0.0 if has else None),
        "median": float(np.median(finite)) if has else None,
        "n": int(finite.size),
        "n_undefined": sum(v is not None and math.isnan(v) for v in values),
        "n_infinite": sum(v is not None and math.isinf(v) for v in values),
    }


def summarise(rows: list[dict], rules: str) -> dict:
    """summary.json's "lesion_wise" entry: the rule set, its definition and per-region statistics over cases."""
    regions = []
    for region in REGIONS:
        mine = [r for r in rows if r["region"] == region]
        entry = {"region": region, "lesion_dice": _stats([r["lesion_dice"] for r in mine])}
        if mine and mine[0]["lesion_hd95"] is not None:
            entry["lesion_hd95"] = _stats([r["lesion_hd95"] for r in mine])
        regions.append({**entry, **{k: sum(r[k] for r in mine) for k in COUNTS}})
    return {
        "rules": rules, "definition": RULE_TEXT[rules], "per_case_file": OUTPUT_NAME, "hd95_unit": "mm",
        "statistics": "mean, sample std (ddof=1), median and n over cases with a finite value; n_undefined counts "
                      "cases scored NaN (no lesion on either side), n_infinite cases scored inf (no matched lesion); "
                      "matched/missed/extra/ignored_small are totals over cases",
        "regions": regions,
    }


def csv_bytes(rows: list[dict]) -> bytes:
    """lesion_metrics.csv: one row per case and region; NaN and inf are written as 'nan' and 'inf'."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return buffer.getvalue().encode()


def _cell(stat: dict | None, digits: int) -> str:
    if stat is None:
        return "-"
    text = "n/a" if stat["mean"] is None else f"{stat['mean']:.{digits}f}±{stat['std']:.{digits}f}"
    flags = [f"{stat[k]} {word}" for k, word in (("n_undefined", "undef"), ("n_infinite", "inf")) if stat[k]]
    return text + (f" ({', '.join(flags)})" if flags else "")


def format_table(lesion_summary: dict) -> str:
    """Fixed-width table for the CLI: lesion-wise Dice and HD95 (mean±std over cases) and lesion totals
    (small = expert lesions ignored for their size, brats2023 only)."""
    header = (f"{'region':<6}  {'lesion Dice':>22}  {'lesion HD95 (mm)':>26}  {'matched':>7}  {'missed':>6}  "
              f"{'extra':>5}  {'small':>5}")
    rules = lesion_summary["rules"]
    lines = [f"lesion-wise, rules {rules}: {RULE_TITLES[rules]} (definition in summary.json)", header,
             "-" * len(header)]
    for e in lesion_summary["regions"]:
        lines.append(f"{e['region']:<6}  {_cell(e['lesion_dice'], 3):>22}  {_cell(e.get('lesion_hd95'), 2):>26}  "
                     f"{e['matched']:>7}  {e['missed']:>6}  {e['extra']:>5}  {e['ignored_small']:>5}")
    return "\n".join(lines)
