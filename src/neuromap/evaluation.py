"""Evaluate a folder of predicted label maps against ground truth: metrics.csv, summary.json, boxplot.png.

Pairing is by case id. Label files are found and read by the layouts (`neuromap.io.layouts`): label NIfTIs
(``<case_id>_seg.nii.gz`` as ``neuromap segment`` writes them, flat or in case folders, or a dataset whose case
folders hold images and a segmentation) and slice folders (LGG kaggle_3m: per-slice mask TIFFs, paired slice by
slice). Scoring is the task's (`neuromap.tasks`): "brats" scores the regions WT/TC/ET and classes NCR/ED/ET,
"binary" one "abnormality" mask. Where a layout's files store no voxel size, HD95 is in voxels and sizes are
voxel counts; where it reads slice stacks, each slice is also scored in 2D (metrics_per_slice.csv) under the
empty-mask conventions of `neuromap.metrics`: a slice where both masks are empty scores Dice 1, and since most
slices are empty the summary also gives the mean over the slices whose ground truth has abnormality.

Label conventions are per file: "auto" takes the convention of the dataset layout when it fixes one (MSD, BraTS
2023) and otherwise guesses from the values present (`neuromap.labels.guess_convention`). A BraTS 2012-2016 file
that happens to contain 3 but no 4 is read as BraTS 2023 by the guess, so name such datasets explicitly
(``gt_labels="brats2012"``). The conventions used are counted in summary.json.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from neuromap import lesionwise
from neuromap.errors import NeuroMapError
from neuromap.evaluation_tables import boxplot_png, csv_bytes, hd95_short, summarise
from neuromap.io import label_files, write_bytes_atomic
from neuromap.io.folder_roles import check_prediction_folder
from neuromap.io.layout import LabelFile
from neuromap.io.output_checks import check_writable_folder
from neuromap.labels import CONVENTIONS
from neuromap.metrics import CONVENTIONS_TEXT
from neuromap.report import RESEARCH_NOTICE
from neuromap.tasks import TASKS, get_task

OUTPUT_NAMES = ("metrics.csv", "summary.json", "boxplot.png")
SLICE_OUTPUT = "metrics_per_slice.csv"
HD95_UNITS = {True: "mm", False: "voxels (spacing unknown; pixels within a slice)"}  # keyed by "spacing known"
SLICE_CONVENTION = (
    "Per slice: 2D metrics on each slice, HD95 in pixels. Empty masks follow the conventions above: a slice "
    "where prediction and ground truth are both empty scores dice/iou/sensitivity/precision/specificity 1 and "
    "hd95 0; a false positive on an empty slice scores dice 0 and hd95 = the slice diagonal. Most slices are "
    "empty, which inflates the mean over all slices: 'slices_with_ground_truth' averages only the slices whose "
    "ground truth has abnormality."
)


@dataclass
class PairResult:
    """Metric rows of one matched pair: per case, per slice for slice stacks, per region's lesions (else empty)."""

    rows: list[dict]
    conventions: dict[str, str]
    slice_rows: list[dict]
    lesion_rows: list[dict] = field(default_factory=list)


def _index(files: list[LabelFile], side: str) -> dict[str, LabelFile]:
    by_id: dict[str, LabelFile] = {}
    for item in files:
        if item.case_id in by_id:
            raise NeuroMapError(
                f"{side}: two files for case '{item.case_id}': {by_id[item.case_id].path} and {item.path}. "
                "Fix: keep one label map per case."
            )
        by_id[item.case_id] = item
    return by_id


def _folder(root: str | Path, side: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise NeuroMapError(f"{root}: {side} folder does not exist (or is a file). Fix: give a folder.")
    return root


def prediction_files(root: str | Path) -> dict[str, LabelFile]:
    """Predicted label maps by case id, as every layout finds them (see `Layout.label_files`)."""
    root = _folder(root, "prediction")
    found = label_files(root, predicted=True)
    if not found:
        raise NeuroMapError(
            f"{root}: no predictions found (expected <case_id>_seg.nii.gz files, case folders holding one, or case "
            "folders of <slice>_pred_mask.tif). Fix: point to the output folder of `neuromap segment`."
        )
    return _index(found, "predictions")


def ground_truth_files(root: str | Path) -> dict[str, LabelFile]:
    """Ground-truth label maps by case id: label files, flat or in case folders (with or without the images),
    or a dataset folder whose cases have a segmentation."""
    root = _folder(root, "ground-truth")
    found = label_files(root, predicted=False)
    if not found:
        raise NeuroMapError(
            f"{root}: no ground truth found. Fix: point to labelled data (e.g. <case>_seg.nii.gz next to the images "
            "or alone in case folders), to a folder of label NIfTIs, or to LGG patient folders with masks."
        )
    return _index(found, "ground truth")


def pair_cases(
    predictions: dict[str, LabelFile], truths: dict[str, LabelFile], allow_missing: bool = False
) -> tuple[list[tuple[LabelFile, LabelFile]], dict[str, list[str]]]:
    """Matched (prediction, ground truth) pairs sorted by case id, and the unmatched ids of each side.

    Unmatched ids are an error unless ``allow_missing``; then they are a warning (and still an error when
    nothing matches at all).
    """
    common = sorted(predictions.keys() & truths.keys())
    unmatched = {
        "predictions_without_ground_truth": sorted(predictions.keys() - truths.keys()),
        "ground_truth_without_prediction": sorted(truths.keys() - predictions.keys()),
    }
    if any(unmatched.values()):
        text = "; ".join(f"{k.replace('_', ' ')}: {', '.join(v)}" for k, v in unmatched.items() if v)
        if not common or not allow_missing:
            raise NeuroMapError(
                f"case ids do not match ({text}). Fix: name predictions <case_id>_seg.nii.gz after the ground-truth "
                "case ids" + ("" if not common else ", or pass allow_missing=True (--allow-missing) to evaluate "
                f"only the {len(common)} matched case(s)") + "."
            )
        warnings.warn(f"evaluating {len(common)} matched case(s) only; unmatched: {text}", stacklevel=2)
    return [(predictions[i], truths[i]) for i in common], unmatched


def _check_convention(name: str, what: str) -> None:
    if name != "auto" and name not in CONVENTIONS:
        raise NeuroMapError(
            f"{what}: unknown label convention '{name}'. Fix: use 'auto' or one of {sorted(CONVENTIONS)}."
        )


def _check_kinds(pred: LabelFile, gt: LabelFile) -> None:
    if pred.layout is not gt.layout:
        raise NeuroMapError(
            f"case '{gt.case_id}': {pred.path} ({pred.layout.description}) and {gt.path} ({gt.layout.description}) "
            "are different kinds of label files. Fix: compare predictions with ground truth of the same kind "
            "(e.g. LGG slice predictions with the LGG patient folders)."
        )


def evaluate_pair(
    pred: LabelFile, gt: LabelFile, pred_labels: str = "auto", gt_labels: str = "auto", hd95: bool = True,
    task: str = "brats", lesion_rules: str | None = None,
) -> PairResult:
    """Metric rows (with case_id) for one matched pair, the label conventions used for each side, for slice
    stacks one row per slice (with its slice number), scored in 2D by the same metrics function, and with
    ``lesion_rules`` the lesion-wise rows of `neuromap.lesionwise`."""
    _check_kinds(pred, gt)
    scorer = get_task(task)
    pair = gt.layout.read_pair(pred, gt, pred_labels, gt_labels, scorer)
    rows = [{"case_id": gt.case_id, **row} for row in scorer.metric_rows(pair.pred, pair.truth, pair.spacing, hd95)]
    slice_rows = [
        {"case_id": gt.case_id, "slice": number, **row}
        for z, number in enumerate(pair.slice_numbers or [])
        for row in scorer.metric_rows(pair.pred[..., z], pair.truth[..., z], None, hd95)
    ]
    lesions = []
    if lesion_rules:
        lesions = lesionwise.case_rows(gt.case_id, pair.pred, pair.truth, pair.spacing, lesion_rules, hd95)
    return PairResult(rows, pair.conventions, slice_rows, lesions)


def evaluate(
    pred_dir: str | Path, gt_dir: str | Path, out_dir: str | Path, pred_labels: str = "auto", gt_labels: str = "auto",
    hd95: bool = True, overwrite: bool = False, allow_missing: bool = False, task: str = "brats",
    lesion_wise: bool = False, lesion_rules: str | None = None,
) -> dict:
    """Score every prediction in ``pred_dir`` against ``gt_dir`` and write metrics.csv, summary.json and
    boxplot.png into ``out_dir`` (for slice stacks also metrics_per_slice.csv); returns the summary (as
    written to summary.json). ``lesion_wise`` adds lesion_metrics.csv and summary["lesion_wise"] under
    ``lesion_rules`` ("brats-eval" by default, or "brats2023"; see `neuromap.lesionwise`).

    ``task`` "brats" scores the regions WT/TC/ET and classes NCR/ED/ET; "binary" scores one "abnormality"
    mask (nonzero voxels). Pairing, voxel grids and existing outputs are checked before any metric is
    computed; nothing is written unless every case was scored.
    """
    if task not in TASKS:
        raise NeuroMapError(f"unknown evaluation task '{task}'. Fix: use one of {list(TASKS)}.")
    _check_convention(pred_labels, "predictions")
    _check_convention(gt_labels, "ground truth")
    lesion_rules = lesionwise.check_request(lesion_wise, lesion_rules, task)
    out = Path(out_dir)
    check_writable_folder(out, "evaluation results")
    check_prediction_folder(_folder(pred_dir, "prediction"), _folder(gt_dir, "ground-truth"))
    pairs, unmatched = pair_cases(prediction_files(pred_dir), ground_truth_files(gt_dir), allow_missing)
    layouts = {gt.layout for _, gt in pairs}
    if len(layouts) > 1:
        kinds = " and ".join(sorted(layout.description for layout in layouts))
        raise NeuroMapError(f"the ground truth mixes {kinds}. Fix: evaluate them apart.")
    (layout,) = layouts
    if task not in layout.scored_as:
        raise NeuroMapError(
            f"{layout.description} hold {' or '.join(layout.scored_as)} labels. Fix: pass --task {layout.scored_as[0]}."
        )
    per_slice = layout.scores_slices
    extra_outputs = (*((SLICE_OUTPUT,) if per_slice else ()), *((lesionwise.OUTPUT_NAME,) if lesion_rules else ()))
    targets = {name: out / name for name in (*OUTPUT_NAMES, *extra_outputs)}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise NeuroMapError(f"output exists: {', '.join(existing)}. Fix: choose another output folder or --overwrite.")
    for pred, gt in pairs:  # headers only: a grid mismatch in the last case fails before minutes of work
        _check_kinds(pred, gt)
        layout.check_pair(pred, gt)

    rows: list[dict] = []
    slice_rows: list[dict] = []
    lesion_rows: list[dict] = []
    used: dict[str, Counter] = {"prediction": Counter(), "ground_truth": Counter()}
    for pred, gt in pairs:
        result = evaluate_pair(pred, gt, pred_labels, gt_labels, hd95, task, lesion_rules)
        rows += result.rows
        slice_rows += result.slice_rows
        lesion_rows += result.lesion_rows
        for side, name in result.conventions.items():
            used[side][name] += 1

    summary = {
        "research_use_only": True,
        "notice": RESEARCH_NOTICE,
        "task": task,
        "n_cases": len(pairs),
        "cases": [gt.case_id for _, gt in pairs],
        "unmatched": unmatched,
        "label_conventions": {side: dict(counts) for side, counts in used.items()},
        "conventions": CONVENTIONS_TEXT,
        "hd95_unit": HD95_UNITS[layout.spacing_known],
        "std": "sample standard deviation (ddof=1) over cases; 0 for a single case",
        "structures": summarise(rows),
    }
    if per_slice:
        summary["per_slice"] = {
            "convention": SLICE_CONVENTION,
            "n_slices": len({(r["case_id"], r["slice"]) for r in slice_rows}),
            "std": "sample standard deviation (ddof=1) over slices",
            "all_slices": summarise(slice_rows),
            "slices_with_ground_truth": summarise([r for r in slice_rows if r["vol_gt_voxels"] > 0]),
        }
    if lesion_rules:
        summary["lesion_wise"] = lesionwise.summarise(lesion_rows, lesion_rules)
    summary["files"] = {name: str(path) for name, path in targets.items()}
    write_bytes_atomic(targets["metrics.csv"], csv_bytes(rows), overwrite)
    if per_slice:
        write_bytes_atomic(targets[SLICE_OUTPUT], csv_bytes(slice_rows), overwrite)
    if lesion_rules:
        write_bytes_atomic(targets[lesionwise.OUTPUT_NAME], lesionwise.csv_bytes(lesion_rows), overwrite)
    write_bytes_atomic(targets["summary.json"], json.dumps(summary, indent=2).encode(), overwrite)
    write_bytes_atomic(targets["boxplot.png"], boxplot_png(rows, len(pairs), hd95_short(summary)), overwrite)
    return summary
